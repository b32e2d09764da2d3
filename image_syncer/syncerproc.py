"""The syncer's own process: what ``image-syncer syncer`` becomes once its flags are checked.

One syncer runs on every node for weeks, so every megabyte it holds is paid a thousand times.
Parsing flags is the CLI's job, and the CLI's libraries stay in memory once imported: typer
coerces every option through pydantic (about 5 MB), plus click and rich. So ``image-syncer
syncer`` validates its flags, then replaces itself (``exec``, same pid, same signals) with
``python -m image_syncer.syncerproc``, which imports only the syncer, and hands over the settings
through an inherited pipe: never through argv or the environment, where the NATS password would
be visible to others.

nats-py imports aiohttp (8 MB) whenever it is installed, only for WebSocket connections; the
syncer image does not ship it, and the syncer process keeps it out in any install unless a NATS
URL asks for WebSocket (``ws://``, ``wss://``).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from syncer.settings import SyncerSettings

__all__ = ["exec_syncer", "main"]


def exec_syncer(settings: SyncerSettings) -> None:
    """Replace this process with the lean syncer process running ``settings``; never returns."""
    from ops.logs import configured

    level, fmt = configured()
    data = msgspec.json.encode({"settings": settings, "log_level": level, "log_format": fmt})
    read_end, write_end = os.pipe()
    if len(data) > 60_000:  # a pipe holds 64 KiB; the settings are a few hundred bytes
        raise ValueError("syncer settings too large to hand over")
    os.write(write_end, data)
    os.close(write_end)
    os.set_inheritable(read_end, True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "image_syncer.syncerproc", str(read_end)])


def main(argv: list[str]) -> int:
    with os.fdopen(int(argv[1]), "rb") as pipe:
        handover: dict[str, Any] = msgspec.json.decode(pipe.read())
    servers = handover["settings"]["nats"]["servers"]
    if not any(str(s).startswith(("ws://", "wss://")) for s in servers):
        sys.modules["aiohttp"] = None  # type: ignore[assignment]  # import fails: not loaded
    # Only now the imports that reach nats-py.
    from ops.lifecycle import run_until_signalled
    from ops.logs import configure
    from ops.proctitle import set_title
    from syncer.runner import run
    from syncer.settings import SyncerSettings

    settings = msgspec.convert(handover["settings"], type=SyncerSettings)
    # ps shows which node each syncer serves (several run side by side in the demo, in tests).
    set_title(f"image-syncer syncer {settings.node_name}", f"syncer {settings.node_name}")
    configure(handover["log_level"], "json" if handover["log_format"] == "json" else "logfmt")
    return run_until_signalled(lambda stopping: run(settings, stopping))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
