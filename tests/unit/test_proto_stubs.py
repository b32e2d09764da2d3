"""The committed CRI and containerd stubs are exactly what proto/ generates, with upstream numbers."""

from __future__ import annotations

from pathlib import Path

from syncer import containerd_api
from syncer.containerd_api import generate as containerd_generate
from syncer.containerd_api import images_pb2
from syncer.cri_api import api_pb2
from syncer.cri_api.generate import GENERATED, PACKAGE_DIR, generate


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    generate(tmp_path)

    stale = [
        name
        for name in GENERATED
        if (tmp_path / name).read_bytes() != (PACKAGE_DIR / name).read_bytes()
    ]

    assert not stale, f"stale CRI stubs {stale}: run `just proto` and commit the result"


def test_method_paths_are_the_cri_ones() -> None:
    service = api_pb2.DESCRIPTOR.services_by_name["ImageService"]

    assert service.full_name == "runtime.v1.ImageService"
    assert [m.name for m in service.methods] == [
        "ListImages",
        "ImageStatus",
        "PullImage",
        "RemoveImage",
        "ImageFsInfo",
    ]


def test_version_and_list_containers_are_the_cri_runtime_service_methods() -> None:
    service = api_pb2.DESCRIPTOR.services_by_name["RuntimeService"]

    assert service.full_name == "runtime.v1.RuntimeService"
    version, list_containers = service.methods
    assert version.name == "Version"
    assert version.input_type.full_name == "runtime.v1.VersionRequest"
    assert version.output_type.full_name == "runtime.v1.VersionResponse"
    assert list_containers.name == "ListContainers"
    assert list_containers.input_type.full_name == "runtime.v1.ListContainersRequest"
    assert list_containers.output_type.full_name == "runtime.v1.ListContainersResponse"


def _numbers(message: str) -> dict[str, int]:
    fields = api_pb2.DESCRIPTOR.message_types_by_name[message].fields
    return {f.name: f.number for f in fields}


def test_field_numbers_match_k8s_cri_api() -> None:
    # Pinned from k8s.io/cri-api pkg/apis/runtime/v1/api.proto; a renumbering breaks the wire.
    assert _numbers("ImageSpec") == {
        "image": 1,
        "annotations": 2,
        "user_specified_image": 18,
        "runtime_handler": 19,
    }
    assert _numbers("PullImageRequest") == {"image": 1, "auth": 2, "sandbox_config": 3}
    assert _numbers("PullImageResponse") == {"image_ref": 1}
    assert _numbers("AuthConfig") == {
        "username": 1,
        "password": 2,
        "auth": 3,
        "server_address": 4,
        "identity_token": 5,
        "registry_token": 6,
    }
    assert _numbers("Image") == {
        "id": 1,
        "repo_tags": 2,
        "repo_digests": 3,
        "size": 4,
        "uid": 5,
        "username": 6,
        "spec": 7,
        "pinned": 8,
        "image_source": 9,
    }
    assert _numbers("ImageStatusRequest") == {"image": 1, "verbose": 2}
    assert _numbers("ImageStatusResponse") == {"image": 1, "info": 2}
    assert _numbers("ListImagesRequest") == {"filter": 1}
    assert _numbers("ListImagesResponse") == {"images": 1}
    assert _numbers("RemoveImageRequest") == {"image": 1}
    assert _numbers("ImageFsInfoResponse") == {
        "image_filesystems": 1,
        "container_filesystems": 2,
    }
    assert _numbers("FilesystemUsage") == {
        "timestamp": 1,
        "fs_id": 2,
        "used_bytes": 3,
        "inodes_used": 4,
    }
    assert _numbers("PodSandboxConfig") == {
        "metadata": 1,
        "hostname": 2,
        "log_directory": 3,
        "labels": 6,
        "annotations": 7,
    }

    assert _numbers("VersionRequest") == {"version": 1}
    assert _numbers("VersionResponse") == {
        "version": 1,
        "runtime_name": 2,
        "runtime_version": 3,
        "runtime_api_version": 4,
    }
    assert _numbers("ListContainersRequest") == {"filter": 1}
    assert _numbers("ContainerFilter") == {
        "id": 1,
        "state": 2,
        "pod_sandbox_id": 3,
        "label_selector": 4,
    }
    assert _numbers("ContainerStateValue") == {"state": 1}
    assert _numbers("ListContainersResponse") == {"containers": 1}
    assert _numbers("ContainerMetadata") == {"name": 1, "attempt": 2}
    assert _numbers("Container") == {
        "id": 1,
        "pod_sandbox_id": 2,
        "metadata": 3,
        "image": 4,
        "image_ref": 5,
        "state": 6,
        "created_at": 7,
        "labels": 8,
        "annotations": 9,
        "image_id": 10,
    }
    states = api_pb2.DESCRIPTOR.enum_types_by_name["ContainerState"]
    assert {v.name: v.number for v in states.values} == {
        "CONTAINER_CREATED": 0,
        "CONTAINER_RUNNING": 1,
        "CONTAINER_EXITED": 2,
        "CONTAINER_UNKNOWN": 3,
    }


def test_a_pull_request_encodes_as_cri_expects() -> None:
    request = api_pb2.PullImageRequest(
        image=api_pb2.ImageSpec(image="nginx"),
        auth=api_pb2.AuthConfig(username="u"),
    )

    # field 1 (ImageSpec, length-delimited) holding field 1 "nginx"; field 2 (AuthConfig) "u".
    assert request.SerializeToString() == b"\n\x07\n\x05nginx\x12\x03\n\x01u"


def test_committed_containerd_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    containerd_generate.generate(tmp_path)
    package = Path(containerd_api.__file__).parent

    stale = [
        name
        for name in containerd_generate.GENERATED
        if (tmp_path / name).read_bytes() != (package / name).read_bytes()
    ]

    assert not stale, f"stale containerd stubs {stale}: run `just proto` and commit the result"


def test_containerd_images_service_is_upstreams() -> None:
    service = images_pb2.DESCRIPTOR.services_by_name["Images"]

    # containerd routes by these paths: /containerd.services.images.v1.Images/<Rpc>.
    assert service.full_name == "containerd.services.images.v1.Images"
    assert [(m.name, m.input_type.name, m.output_type.name) for m in service.methods] == [
        ("Get", "GetImageRequest", "GetImageResponse"),
        ("List", "ListImagesRequest", "ListImagesResponse"),
        ("Update", "UpdateImageRequest", "UpdateImageResponse"),
    ]


def _containerd_numbers(message: str) -> dict[str, int]:
    fields = images_pb2.DESCRIPTOR.message_types_by_name[message].fields
    return {f.name: f.number for f in fields}


def test_containerd_field_numbers_match_upstream() -> None:
    # Pinned from containerd/containerd api/services/images/v1/images.proto and
    # api/types/descriptor.proto; a renumbering breaks the wire.
    assert _containerd_numbers("Image") == {
        "name": 1,
        "labels": 2,
        "target": 3,
        "created_at": 7,
        "updated_at": 8,
    }
    assert _containerd_numbers("GetImageRequest") == {"name": 1}
    assert _containerd_numbers("GetImageResponse") == {"image": 1}
    assert _containerd_numbers("UpdateImageRequest") == {"image": 1, "update_mask": 2}
    assert _containerd_numbers("UpdateImageResponse") == {"image": 1}
    assert _containerd_numbers("ListImagesRequest") == {"filters": 1}
    assert _containerd_numbers("ListImagesResponse") == {"images": 1}
    image = images_pb2.DESCRIPTOR.message_types_by_name["Image"]
    descriptor = image.fields_by_name["target"].message_type
    assert descriptor is not None
    assert descriptor.full_name == "containerd.types.Descriptor"
    assert {f.name: f.number for f in descriptor.fields} == {
        "media_type": 1,
        "digest": 2,
        "size": 3,
        "annotations": 5,
    }
    mask = images_pb2.DESCRIPTOR.message_types_by_name["UpdateImageRequest"].fields_by_name[
        "update_mask"
    ]
    assert mask.message_type is not None
    assert mask.message_type.full_name == "google.protobuf.FieldMask"


def test_a_label_update_encodes_as_containerd_expects() -> None:
    request = images_pb2.UpdateImageRequest(
        image=images_pb2.Image(name="n", labels={"k": "v"}),
    )
    request.update_mask.paths.append("labels.k")

    # field 1 (Image): name (1) "n", labels (2) one map entry {key 1: "k", value 2: "v"};
    # field 2 (FieldMask): paths (1) "labels.k".
    assert request.SerializeToString() == (
        b"\n\x0b\n\x01n\x12\x06\n\x01k\x12\x01v\x12\n\n\x08labels.k"
    )
