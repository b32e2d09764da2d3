"""What the syncer's integration tests share: a syncer's settings, the real CLI as a subprocess.

Builds on test_syncer.py's helpers (``RunningSyncer`` runs ``syncer.runner.run`` in-process, so
tests can read its log records and health). Import the fixtures (``*_fixture``) into a test module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from test_syncer import DEADLINE, RunningSyncer, eventually, fleet, logged, metric

from image_syncer.sandbox.containerd import Containerd
from ops.logs import fields_of
from syncer.references import normalize
from syncer.settings import SyncerSettings
from wire.natsconn import NatsSettings

__all__ = [
    "DEADLINE",
    "RunningSyncer",
    "cli",
    "eventually",
    "fleet",
    "info_logs_fixture",
    "logged",
    "metric",
    "norm",
    "settings_fixture",
    "status_json",
]


@pytest.fixture(name="settings")
def settings_fixture(
    containerd: Containerd, nats_settings: NatsSettings, prefix: str
) -> SyncerSettings:
    return SyncerSettings(
        node_name=f"node-{uuid.uuid4().hex[:6]}.example",
        cri_endpoint=containerd.endpoint,
        sync_period=1.0,
        pull_timeout=30.0,
        backoff_min=0.2,
        backoff_max=1.0,
        subject_prefix=prefix,
        metrics_addr="",
        status_interval=0.2,
        nats=nats_settings,
    )


@pytest.fixture(name="info_logs", autouse=True)
def info_logs_fixture(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO)
    yield
    for record in caplog.get_records("call"):
        if record.name.startswith("syncer"):
            print(record.levelname, record.getMessage(), fields_of(record))


def norm(image: str) -> str:
    return str(normalize(image))


async def cli(
    settings: SyncerSettings, *args: str, timeout: float = DEADLINE
) -> tuple[int, str, str]:
    """Run the real ``image-syncer`` with the test's NATS and prefix; (code, stdout, stderr)."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "image_syncer",
        *args,
        "--nats-url",
        settings.nats.servers[0],
        "--subject-prefix",
        settings.subject_prefix,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def status_json(settings: SyncerSettings) -> dict[str, Any]:
    code, out, err = await cli(settings, "status", "--json")
    assert code == 0, err
    return json.loads(out)
