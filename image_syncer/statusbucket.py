"""The node status bucket as the one-shot commands open it: ``status``, ``wait`` and ``replay``.

The bucket is the syncers' (:mod:`wire.nodestatus`); a command only reads it, or writes a
replay request, so a missing bucket means no syncer of that prefix ever ran and is said so in one
line rather than created.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from image_syncer.oneshot import CommandError, fail
from wire.contract import ContractError
from wire.nodestatus import StatusSettings, open_status_bucket

__all__ = ["open_bucket", "status_settings"]


def status_settings(prefix: str) -> StatusSettings:
    """The bucket's settings for ``prefix``; a bad prefix exits 2."""
    try:
        settings = StatusSettings(prefix=prefix)
        _ = settings.bucket
    except ContractError as e:
        fail(str(e), code=2)
    return settings


async def open_bucket(js: JetStreamContext, settings: StatusSettings) -> KeyValue:
    kv = await open_status_bucket(js, settings)
    if kv is None:
        raise CommandError(
            f"no node has reported status: bucket {settings.bucket} does not exist "
            f"(is a syncer running with --subject-prefix {settings.prefix}?)"
        )
    return kv
