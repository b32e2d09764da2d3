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

from broadcaster.settings import SidecarSettings
from ops.lifecycle import every
from wire.contract import AGONES_SDK_SOURCE, ContractError, NodeImages
from wire.eventlog import LogSettings, ensure_node_images_stream, publish_node_images
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
    "SDK sidecar images published on the node-images stream (changes and start-up).",
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
        self.published: NodeImages | None = None
        self._problem: str | None = None

    async def run(self, stopping: asyncio.Event) -> None:
        """Until ``stopping``, or cancelled (this replica loses its lease)."""
        await every(self.settings.refresh, stopping, self.refresh_once)

    async def refresh_once(self) -> bool:
        """Read and publish if changed; True when the bus holds the Deployment's image."""
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
            AGONES_SDK_SOURCE, [image], self.origin, str(meta.get("resourceVersion", ""))
        )
        if self.published is not None and self.published.images == message.images:
            return self._recovered()
        try:
            await ensure_node_images_stream(self.js, self.log_settings)
            await publish_node_images(self.js, self.log_settings, message)
        except RETRYABLE as e:
            return self._failed("publish", repr(e))
        except ContractError as e:
            return self._failed("no_variable", str(e))
        SIDECAR_PUBLISHED.inc()
        log.info(
            "agones sdk sidecar image published",
            extra={"image": image, "deployment": self.origin, "previous": self._previous()},
        )
        self.published = message
        return self._recovered()

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

    def _previous(self) -> str:
        return self.published.images[0] if self.published and self.published.images else ""

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
