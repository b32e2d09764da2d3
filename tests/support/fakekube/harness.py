"""What broadcaster tests share: Agones objects to create, and the event log's state to wait for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.js import JetStreamContext

from image_syncer.fleets import GAME_SERVER_PORT, fleet_object
from image_syncer.sandbox.fakekube import FakeKube
from wire.contract import Event, Kind, decode_event
from wire.eventlog import read_log, stream_name

__all__ = [
    "LoggedObject",
    "controller",
    "fleet",
    "gameserver",
    "log_messages",
    "log_state",
    "set_sidecar",
    "wait_for_log",
]


def fleet(
    name: str,
    image: str = "registry.example/game:1",
    *,
    namespace: str = "default",
    labels: dict[str, str] | None = None,
    replicas: int = 1,
) -> dict[str, Any]:
    """A Fleet as kubectl would create it, with managedFields the broadcaster must drop."""
    return fleet_object(
        name,
        [{"name": "game", "image": image}],
        namespace=namespace,
        replicas=replicas,
        metadata={
            "labels": labels or {},
            "managedFields": [{"manager": "kubectl", "operation": "Update"}],
        },
        game_server={"ports": [{"name": "default", "containerPort": GAME_SERVER_PORT}]},
    )


def gameserver(
    name: str, image: str = "registry.example/game:1", namespace: str = "default"
) -> dict[str, Any]:
    return {
        "apiVersion": "agones.dev/v1",
        "kind": "GameServer",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"template": {"spec": {"containers": [{"name": "game", "image": image}]}}},
    }


def controller(image: str | None, namespace: str = "agones-system") -> dict[str, Any]:
    """The agones-controller Deployment as the Agones Helm chart renders it (trimmed)."""
    env = [
        {"name": "PROMETHEUS_EXPORTER", "value": "true"},
        {"name": "SIDECAR_CPU_REQUEST", "value": "30m"},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if image is not None:
        env.insert(1, {"name": "SIDECAR_IMAGE", "value": image})
    return {
        "metadata": {"name": "agones-controller", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"agones.dev/role": "controller"}},
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "agones-controller",
                            "image": "us-docker.pkg.dev/agones-images/release/agones-controller:1.44.0",
                            "env": env,
                        }
                    ]
                }
            },
        },
    }


def set_sidecar(kube: FakeKube, image: str | None) -> None:
    current = kube.get("deployments", "agones-system", "agones-controller")
    assert current is not None
    fresh = controller(image)
    fresh["metadata"] = current["metadata"]
    kube.update("deployments", fresh)


def with_image(obj: dict[str, Any], image: str) -> dict[str, Any]:
    containers = obj["spec"]["template"]["spec"]["template"]["spec"]["containers"]
    containers[0]["image"] = image
    return obj


@dataclass(frozen=True)
class LoggedMessage:
    seq: int
    subject: str
    headers: dict[str, str]
    event: Event


@dataclass(frozen=True)
class LoggedObject:
    """The newest event the log holds for one object."""

    event_type: str
    uid: str
    resource_version: str
    image: str


async def log_messages(
    js: JetStreamContext, prefix: str, kind: Kind = Kind.FLEET
) -> list[LoggedMessage]:
    return [
        LoggedMessage(m.seq, m.subject, m.headers, decode_event(m.data))
        async for m in read_log(js, stream_name(prefix, kind))
    ]


async def log_state(
    js: JetStreamContext, prefix: str, kind: Kind = Kind.FLEET
) -> dict[tuple[str, str], LoggedObject]:
    """The fold of the log: live objects only, keyed (namespace, name)."""
    state: dict[tuple[str, str], LoggedObject | None] = {}
    for message in await log_messages(js, prefix, kind):
        event = message.event
        meta = event.obj.metadata
        containers = event.obj.pod_spec.containers or []
        image = containers[0].image if containers else ""
        logged = LoggedObject(event.event_type, meta.uid, meta.resource_version, image)
        state[(meta.namespace, meta.name)] = None if event.action == "deleted" else logged
    return {key: value for key, value in state.items() if value is not None}


def cluster_state(objects: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    return {
        (o["metadata"]["namespace"], o["metadata"]["name"]): o["metadata"]["resourceVersion"]
        for o in objects
    }


async def wait_for_log(
    js: JetStreamContext,
    prefix: str,
    done: Callable[[dict[tuple[str, str], LoggedObject]], bool],
    *,
    kind: Kind = Kind.FLEET,
    timeout: float = 30.0,
    what: str = "the expected log state",
) -> dict[tuple[str, str], LoggedObject]:
    """Poll the log's fold until ``done`` holds; fail with the last state seen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = await log_state(js, prefix, kind)
        except (nats.errors.Error, TimeoutError) as e:
            # NATS restarting under the test: keep polling until the deadline.
            state = {"unreadable": repr(e)}  # type: ignore[dict-item]
        else:
            if done(state):
                return state
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the log holds {state}")
        await asyncio.sleep(0.1)


async def wait_converged(
    js: JetStreamContext, prefix: str, objects: list[dict[str, Any]], **kwargs: Any
) -> dict[tuple[str, str], LoggedObject]:
    """Wait until the log's live objects are exactly ``objects`` at their resourceVersions."""
    wanted = cluster_state(objects)
    return await wait_for_log(
        js,
        prefix,
        lambda state: {k: v.resource_version for k, v in state.items()} == wanted,
        what=f"the log to hold exactly {wanted}",
        **kwargs,
    )
