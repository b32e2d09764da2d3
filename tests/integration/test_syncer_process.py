"""The syncer as an operator sees its process: its name in ``ps``, a quiet clean stop.

The real ``image-syncer syncer`` runs as a subprocess (it replaces itself with the lean syncer
process) against the real nats-server and containerd.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from support.polling import eventually
from support.syncer_harness import settings_fixture  # noqa: F401  (fixture)

from image_syncer.sandbox.processes import free_port
from syncer.settings import SyncerSettings

pytestmark = [pytest.mark.nats, pytest.mark.cri]


def title_of(pid: int) -> str:
    """What ``ps`` shows: the command line, and the short name ``top`` shows."""
    proc = Path(f"/proc/{pid}")
    cmdline = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return f"{cmdline.strip()} | {proc.joinpath('comm').read_text().strip()}"


async def test_the_syncer_process_is_named_after_its_node_and_stops_without_a_warning(
    settings: SyncerSettings,
    js: JetStreamContext,  # the log's streams, created as the install does
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "NODE_NAME": settings.node_name,
        "CONN_TARGET": settings.runtime.endpoint,
        "NATS_URL": settings.nats.servers[0],
        "SUBJECT_PREFIX": settings.subject_prefix,
        "METRICS_ADDR": f"127.0.0.1:{port}",
        "LOG_FORMAT": "logfmt",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "image_syncer",
        "syncer",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    lines: list[str] = []

    async def read() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            lines.append(line.decode(errors="replace").rstrip())

    reader = asyncio.create_task(read())
    try:
        await eventually(
            lambda: any('msg="consumer ready"' in line for line in lines),
            lambda: "the syncer running:\n" + "\n".join(lines),
        )
        # The short name is all prctl can set; setproctitle sets the whole command line.
        short = f"syncer {settings.node_name}"[:15]
        title = title_of(process.pid)
        assert settings.node_name in title or short in title, title
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 60)
        await reader
    assert code == 0, "\n".join(lines)
    assert any('msg="syncer stopped"' in line for line in lines)
    warnings = [line for line in lines if "level=warning" in line or "level=error" in line]
    assert warnings == [], "\n".join(lines)
