"""The Agones SDK sidecar's image, followed from the agones-controller Deployment onto the bus.

Every GameServer pod runs the Agones SDK sidecar next to the game, so every node needs its image
as much as the Fleet's own. Agones names it in one place: the ``SIDECAR_IMAGE`` environment
variable of the ``agones-controller`` Deployment (Helm chart ``templates/controller.yaml``). The
broadcaster reads that Deployment (``get`` on it alone: RBAC ``resourceNames``) and publishes the
image on the node-images stream, so every syncer pulls it and an Agones upgrade needs no change
here.

One ``GET`` every ``refresh`` (default ``1m``): an Agones upgrade is rare and takes minutes, a
watch would hold a connection open for one field. A Deployment that is missing, unreadable or
without the variable is logged once (and again when it recovers), counted, and publishes
nothing: what syncers hold stays as last published.

The node-images stream is held to the Fleet log's guarantees. Each refresh compares the
Deployment with what the *bus* holds (one direct get), not with what this process published last,
so a stream lost and re-created empty is published again at the next refresh. A publish is
conditioned on the message it read (``Nats-Expected-Last-Subject-Sequence``), and only a newer
Deployment (uid and resourceVersion, :func:`broadcaster.ordering.newer`) replaces what the bus
holds: a deposed leader's delayed publish of an older version is refused and, re-planned against
the bus, dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from nats.js import JetStreamContext
from prometheus_client import Counter

from broadcaster.ordering import Recorded, newer
from broadcaster.settings import SidecarSettings
from wire.contract import AGONES_SDK_SOURCE, ContractError, NodeImages
from wire.eventlog import (
    LogConflict,
    LogSettings,
    ensure_node_images_stream,
    last_node_images,
    publish_node_images,
)
from wire.natsconn import RETRYABLE

__all__ = ["SIDECAR_ENV", "SidecarWatcher", "sidecar_image"]

log = logging.getLogger(__name__)

SIDECAR_ENV = "SIDECAR_IMAGE"

SIDECAR_ERRORS = Counter(
    "image_syncer_broadcaster_sidecar_errors",
    "Failed reads of the agones-controller Deployment's SIDECAR_IMAGE, by reason "
    "(forbidden, not_found, no_variable, api, publish).",
    ["reason"],
)
SIDECAR_PUBLISHED = Counter(
    "image_syncer_broadcaster_sidecar_published",
    "SDK sidecar images published on the node-images stream (changes, and a bus that lost them).",
)
SIDECAR_SUPERSEDED = Counter(
    "image_syncer_broadcaster_sidecar_superseded",
    "SDK sidecar publishes not made because the bus holds a newer Deployment version.",
)


def sidecar_image(deployment: dict[str, Any]) -> str | None:
    """``SIDECAR_IMAGE`` of the Deployment's containers (a plain ``value``), or None."""
    spec = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    for container in spec.get("containers") or []:
        for env in container.get("env") or []:
            if env.get("name") == SIDECAR_ENV and env.get("value"):
                return str(env["value"])
    return None


class SidecarWatcher:
    """Re-reads the controller Deployment every ``refresh`` and publishes a changed image."""

    def __init__(
        self,
        api_client: client.ApiClient,
        js: JetStreamContext,
        log_settings: LogSettings,
        settings: SidecarSettings,
    ) -> None:
        self.apps = client.AppsV1Api(api_client)
        self.js = js
        self.log_settings = log_settings
        self.settings = settings
        self.origin = f"{settings.namespace}/{settings.deployment}"
        self._problem: str | None = None
        self._wake = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        """Until ``stopping``, or cancelled (this replica loses its lease); at once when woken."""
        while not stopping.is_set():
            await self.refresh_once()
            waits = [
                asyncio.ensure_future(stopping.wait()),
                asyncio.ensure_future(self._wake.wait()),
            ]
            try:
                await asyncio.wait(
                    waits, timeout=self.settings.refresh, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for wait in waits:
                    wait.cancel()
            self._wake.clear()

    def wake(self) -> None:
        """Refresh now (the streams were re-created: the bus may hold nothing)."""
        self._wake.set()

    async def refresh_once(self) -> bool:
        """Read the Deployment and settle it on the bus; True when the bus holds its image (or a
        newer version's)."""
        try:
            deployment = await asyncio.to_thread(self._read)
        except ApiException as e:
            reason = {403: "forbidden", 401: "forbidden", 404: "not_found"}.get(e.status, "api")
            return self._failed(reason, f"{e.status} {e.reason}")
        except (OSError, ValueError) as e:  # urllib3 connection errors are OSErrors
            return self._failed("api", repr(e))
        image = sidecar_image(deployment)
        if image is None:
            return self._failed("no_variable", f"no {SIDECAR_ENV} in its containers")
        meta = deployment.get("metadata") or {}
        message = NodeImages(
            AGONES_SDK_SOURCE,
            [image],
            self.origin,
            str(meta.get("resourceVersion", "")),
            str(meta.get("uid", "")),
        )
        try:
            await self._settle(message)
        except RETRYABLE as e:
            return self._failed("publish", repr(e))
        except ContractError as e:
            return self._failed("no_variable", str(e))
        return self._recovered()

    async def _settle(self, message: NodeImages) -> None:
        """Publish ``message`` unless the bus holds its images or a newer version; conditioned
        on what was read, so a conflict re-reads and decides again."""
        prefix = self.log_settings.prefix
        while True:
            held = await last_node_images(self.js, prefix, message.source)
            current, seq = held if held is not None else (None, 0)
            if current is not None and current.images == message.images:
                return
            if current is not None and not newer(
                _versioned(message), False, _recorded(current, seq)
            ):
                SIDECAR_SUPERSEDED.inc()
                log.info(
                    "agones sdk sidecar image superseded by the bus, not published",
                    extra={
                        "image": message.images[0],
                        "resource_version": message.resource_version,
                        "bus_image": ",".join(current.images),
                        "bus_resource_version": current.resource_version,
                    },
                )
                return
            if held is None:
                # Nothing there: maybe no stream at all (a server lost its store).
                await ensure_node_images_stream(self.js, self.log_settings)
            try:
                await publish_node_images(
                    self.js, self.log_settings, message, expected_last_seq=seq
                )
            except LogConflict:
                continue  # someone wrote since we read: decide again against that
            SIDECAR_PUBLISHED.inc()
            log.info(
                "agones sdk sidecar image published",
                extra={
                    "image": message.images[0],
                    "deployment": self.origin,
                    "resource_version": message.resource_version,
                    "previous": ",".join(current.images) if current else "",
                },
            )
            return

    def _read(self) -> dict[str, Any]:
        # The raw body: the typed model would turn the env list into objects we only search.
        response: Any = self.apps.read_namespaced_deployment(
            self.settings.deployment,
            self.settings.namespace,
            _preload_content=False,
            _request_timeout=self.settings.request_timeout,
        )
        doc: dict[str, Any] = json.loads(response.data)
        return doc

    def _failed(self, reason: str, detail: str) -> bool:
        SIDECAR_ERRORS.labels(reason).inc()
        if self._problem != reason:
            self._problem = reason
            log.warning(
                "cannot follow the agones sdk sidecar image, syncers keep the last published",
                extra={"deployment": self.origin, "reason": reason, "error": detail},
            )
        return False

    def _recovered(self) -> bool:
        if self._problem is not None:
            self._problem = None
            log.info("agones sdk sidecar image followed again", extra={"deployment": self.origin})
        return True


def _versioned(message: NodeImages) -> dict[str, Any]:
    """The message as the object it was read from, for :func:`broadcaster.ordering.newer`."""
    return {"metadata": {"uid": message.uid, "resourceVersion": message.resource_version}}


def _recorded(message: NodeImages | None, seq: int) -> Recorded:
    # An unreadable message says nothing about versions: any readable one replaces it.
    return Recorded(_versioned(message) if message is not None else {}, seq)
