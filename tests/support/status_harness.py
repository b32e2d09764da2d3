"""What the tests of ``status``, ``wait`` and ``replay`` share: the real CLI as a subprocess
against the test's NATS, and node entries written as a syncer writes them. Import the fixture
(``settings_fixture``) into a test module.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime, timedelta

import pytest
from nats.js import JetStreamContext

from image_syncer.sandbox.nats_server import NatsServer
from wire.nodestatus import (
    SCHEMA,
    NodeStatus,
    StatusSettings,
    ensure_status_bucket,
    node_key,
    put_status,
    summarize,
)

__all__ = [
    "FLEET",
    "IMAGES",
    "STALE_AFTER",
    "cli_args",
    "finish",
    "report",
    "run_cli",
    "settings_fixture",
    "start_cli",
]


FLEET = "default/simple"
IMAGES = ["registry.local/game:1", "registry.local/sidecar:2", "registry.local/init:3"]


@pytest.fixture(name="settings")
def settings_fixture(prefix: str) -> StatusSettings:
    return StatusSettings(prefix=prefix)


# Nodes the tests report as live (written just before the command) must stay live however slowly
# a loaded machine runs the commands after them; nodes reported stale are an hour old.
STALE_AFTER = "10m"


def cli_args(nats_server: NatsServer, prefix: str, *args: str) -> list[str]:
    """The command line of ``args`` against the test's NATS and prefix.

    ``status`` and ``wait`` get ``--stale-after STALE_AFTER`` unless the test gives its own.
    """
    extra = ["--nats-url", nats_server.url, "--subject-prefix", prefix]
    if args[0] in ("status", "wait") and "--stale-after" not in args:
        extra += ["--stale-after", STALE_AFTER]
    return [*args, *extra]


async def start_cli(*args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "image_syncer",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def run_cli(*args: str) -> tuple[int, str, str]:
    return await finish(await start_cli(*args))


async def report(
    js: JetStreamContext,
    settings: StatusSettings,
    node: str,
    *,
    age: float = 0.0,
    desired: dict[str, list[str]] | None = None,
    present: set[str] = frozenset(),  # type: ignore[assignment]
    pulling: set[str] = frozenset(),  # type: ignore[assignment]
    failed: dict[str, str] | None = None,
    excluded: set[str] = frozenset(),  # type: ignore[assignment]
    seqs: dict[str, int] | None = None,
    schema: int = SCHEMA,
) -> NodeStatus:
    """Write a node's entry as its syncer would, ``age`` seconds after its last heartbeat.

    ``seqs``: the event each Fleet was last folded from; ``schema=2`` writes the entry an older
    syncer wrote: every image string, no compact summary.
    """
    now = datetime.now(UTC)
    desired = desired if desired is not None else {FLEET: IMAGES}
    status = NodeStatus(
        node=node,
        version="9.9.9",
        reported_at=now - timedelta(seconds=age),
        started_at=now - timedelta(hours=2),
        summary=summarize(
            desired=desired,
            present=present,
            pulling=pulling,
            failed=failed,
            excluded=excluded,
            fleet_seqs=seqs or {},
            last_reconcile=now - timedelta(seconds=age + 3),
        ),
    )
    await ensure_status_bucket(js, settings)
    if schema < SCHEMA:
        # Exactly the shape an older syncer wrote.
        doc = {
            "node": node,
            "version": "0.9.0",
            "reported_at": status.reported_at.isoformat(),
            "started_at": status.started_at.isoformat(),
            "state": {"desired": desired, "present": sorted(present), "fleet_seqs": seqs or {}},
            "schema": schema,
        }
        subject = f"$KV.{settings.bucket}.{node_key(node)}"
        await js.publish(subject, json.dumps(doc).encode())
    else:
        await put_status(js, settings, status)
    return status
