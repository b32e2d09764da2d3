"""What the CRI runtime answers and what a pull carries, as plain frozen values.

:mod:`syncer.runtime.cri` turns its gRPC messages into these; everything above the client reads only
these, never a protobuf message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from syncer.cri_api import api_pb2

__all__ = [
    "ImageFilesystem",
    "RegistryAuth",
    "RuntimeContainer",
    "RuntimeImage",
    "RuntimeVersion",
    "images_in_use",
]

_EXITED = "CONTAINER_EXITED"


@dataclass(frozen=True)
class RuntimeImage:
    """An image as the runtime reports it."""

    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int

    @classmethod
    def from_proto(cls, image: api_pb2.Image) -> RuntimeImage:
        return cls(
            id=image.id,
            repo_tags=tuple(image.repo_tags),
            repo_digests=tuple(image.repo_digests),
            size=image.size,
        )


@dataclass(frozen=True)
class RuntimeContainer:
    """A container as ListContainers reports it; ``state`` is the CRI name (CONTAINER_RUNNING)."""

    id: str
    image: str  # the spec's image: a reference or an image id, as the kubelet asked for it
    image_ref: str  # what the runtime resolved it to (containerd: the image id)
    state: str
    image_id: str = ""  # newer runtimes only

    @classmethod
    def from_proto(cls, container: api_pb2.Container) -> RuntimeContainer:
        return cls(
            id=container.id,
            image=container.image.image,
            image_ref=container.image_ref,
            state=_state_name(container.state),
            image_id=container.image_id,
        )

    @property
    def exited(self) -> bool:
        return self.state == _EXITED

    def image_names(self) -> frozenset[str]:
        """Every non-empty way this container names its image (ids and references)."""
        return frozenset(n for n in (self.image, self.image_ref, self.image_id) if n)


def _state_name(state: int) -> str:
    try:
        return api_pb2.ContainerState.Name(api_pb2.ContainerState.ValueType(state))
    except ValueError:  # a state newer than our proto: not known to be exited
        return "CONTAINER_UNKNOWN"


def images_in_use(containers: list[RuntimeContainer]) -> frozenset[str]:
    """Image ids and references held by containers not EXITED (created, running or unknown)."""
    return frozenset(name for c in containers if not c.exited for name in c.image_names())


@dataclass(frozen=True)
class RuntimeVersion:
    """Which runtime answers (CRI Version): ``name`` is e.g. ``containerd`` or ``cri-o``."""

    name: str
    version: str
    api_version: str


@dataclass(frozen=True)
class ImageFilesystem:
    """Usage of one filesystem holding images (ImageFsInfo)."""

    mountpoint: str
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


@dataclass(frozen=True)
class RegistryAuth:
    """Registry credentials for one pull, as CRI's AuthConfig; secrets stay out of the repr."""

    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    server_address: str = ""
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def to_proto(self) -> api_pb2.AuthConfig:
        return api_pb2.AuthConfig(
            username=self.username,
            password=self.password,
            auth=self.auth,
            server_address=self.server_address,
            identity_token=self.identity_token,
            registry_token=self.registry_token,
        )

    def secrets(self) -> tuple[str, ...]:
        """The values that must never be shown, longest first so redaction cannot leave a tail."""
        values = (self.password, self.auth, self.identity_token, self.registry_token)
        return tuple(sorted((v for v in values if v), key=len, reverse=True))
