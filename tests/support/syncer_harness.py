"""What the syncer's integration tests share: a syncer's settings, the real CLI as a subprocess.

``RunningSyncer`` runs ``syncer.runner.run`` in-process, so tests can read its log records and
health. Import the fixtures (``*_fixture``) into a test module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from image_syncer.sandbox.containerd import Containerd
from ops.flagfields import build, override
from ops.logs import fields_of
from ops.serving import Health
from support import polling
from support.fleetdicts import fleet
from syncer.folding.references import normalize
from syncer.runner import run
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
    "override",
    "push_tag",
    "settings_fixture",
    "settings_with",
    "status_json",
    "unpushed",
]


DEADLINE = 60.0


def settings_with(**flags: Any) -> SyncerSettings:
    """Syncer settings as these flags set them (``pull_timeout=30.0``, ``cri_endpoint=...``,
    named as the flags are, in whichever section they live), the rest at their defaults; change
    them further with :func:`override`."""
    return build(SyncerSettings, flags)


async def eventually(check: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    """Poll until ``check`` holds, in a thread: the syncer under test shares this event loop."""
    await polling.eventually(check, what, timeout, in_thread=True)


def logged(
    caplog: pytest.LogCaptureFixture, message: str, **fields: str
) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.getMessage() == message and all(getattr(r, k, None) == v for k, v in fields.items())
    ]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class RunningSyncer:
    def __init__(self, settings: SyncerSettings) -> None:
        self.settings = settings
        self.health = Health()
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[int] | None = None

    async def start(self) -> RunningSyncer:
        self.stopping = asyncio.Event()
        self.health = Health()
        # Not ready until run() itself says so (it has not started when the task is created).
        self.health.set("started", False)
        task = self.task = asyncio.create_task(run(self.settings, self.stopping, self.health))
        await eventually(lambda: self._ready() or task.done(), "syncer ready")
        assert not task.done(), task.result()
        return self

    def _ready(self) -> bool:
        checks = self.health._ready
        return "replay" in checks and all(
            ok for name, (ok, _) in checks.items() if name != "started"
        )

    async def stop(self) -> int:
        assert self.task is not None
        self.stopping.set()
        done, _ = await asyncio.wait({self.task}, timeout=DEADLINE)
        if not done:
            # What the syncer still waits for says why it did not stop: print every task's stack.
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.print_stack(file=sys.stdout)
            self.task.cancel()
            raise AssertionError(f"the syncer did not stop within {DEADLINE:g}s of stopping")
        return self.task.result()


@pytest.fixture(name="settings")
def settings_fixture(
    containerd: Containerd, nats_settings: NatsSettings, prefix: str
) -> SyncerSettings:
    return settings_with(
        node_name=f"node-{uuid.uuid4().hex[:6]}.example",
        cri_endpoint=containerd.endpoint,
        sync_period=1.0,
        pull_timeout=30.0,
        pull_backoff_min=0.2,
        pull_backoff_max=1.0,
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
    result: dict[str, Any] = json.loads(out)
    return result


def unpushed(push: Callable[..., str], tag: str) -> str:
    """A reference in a fresh repository whose ``tag`` is not in the registry (yet)."""
    return push().rsplit(":", 1)[0] + f":{tag}"


def push_tag(push: Callable[..., str], image: str) -> None:
    """Push ``image`` (made by :func:`unpushed`) now."""
    repository, tag = image.split("/", 1)[1].rsplit(":", 1)
    push(repository, tag)
