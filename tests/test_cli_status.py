"""``image-syncer status``, ``wait`` and ``replay`` as an operator or a CD pipeline runs them.

The commands run as real subprocesses against the real nats-server; the test plays the syncers
by writing node entries through the same contract (wire.nodestatus) the reporter uses.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta

import pytest
from nats.js import JetStreamContext

from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port
from syncer.replaycontrol import pending_replay
from wire.nodestatus import (
    NodeState,
    NodeStatus,
    StatusSettings,
    ensure_status_bucket,
    put_status,
)

FLEET = "default/simple"
IMAGES = ["registry.local/game:1", "registry.local/sidecar:2", "registry.local/init:3"]


@pytest.fixture
def settings(prefix: str) -> StatusSettings:
    return StatusSettings(prefix=prefix)


def cli_args(nats_server: NatsServer, prefix: str, *args: str) -> list[str]:
    return [*args, "--nats-url", nats_server.url, "--subject-prefix", prefix]


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
) -> NodeStatus:
    """Write a node's entry as its syncer would, ``age`` seconds after its last heartbeat."""
    now = datetime.now(UTC)
    status = NodeStatus(
        node=node,
        version="9.9.9",
        reported_at=now - timedelta(seconds=age),
        started_at=now - timedelta(hours=2),
        state=NodeState(
            desired=desired if desired is not None else {FLEET: IMAGES},
            present=frozenset(present),
            pulling=frozenset(pulling),
            failed=failed or {},
            excluded=frozenset(excluded),
            last_reconcile=now - timedelta(seconds=age + 3),
        ),
    )
    await ensure_status_bucket(js, settings)
    await put_status(js, settings, status)
    return status


async def watchers_on(js: JetStreamContext, settings: StatusSettings) -> int:
    info = await js.stream_info(f"KV_{settings.bucket}")
    return info.state.consumer_count


async def until(check, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --- status ---------------------------------------------------------------------------------


async def two_nodes(js: JetStreamContext, settings: StatusSettings) -> None:
    await report(
        js,
        settings,
        "node-a",
        desired={FLEET: IMAGES},
        present=set(IMAGES[:2]),
        failed={IMAGES[2]: "401 Unauthorized"},
    )
    await report(
        js,
        settings,
        "node-b",
        age=3600,
        desired={FLEET: IMAGES, "games/other": ["registry.local/other:1"]},
        present={*IMAGES, "registry.local/other:1"},
    )


async def test_status_table_marks_stale_nodes_and_failures(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    await two_nodes(js, settings)
    code, out, err = await run_cli(*cli_args(nats_server, prefix, "status"))
    assert code == 0, err
    rows = {line.split()[1]: line for line in out.splitlines() if "node-" in line and "│" in line}
    assert set(rows) == {"node-a", "node-b"}
    assert "2/3 (1 failed)" in rows["node-a"] and " - " in rows["node-a"]
    assert "(stale)" in rows["node-b"] and "(stale)" not in rows["node-a"]
    assert rows["node-b"].count("3/3") == 1 and "1/1" in rows["node-b"]
    assert re.search(r"│ 1h\d+s ago", rows["node-b"]) and "9.9.9" in rows["node-a"]
    assert f"node-a: {IMAGES[2]}: 401 Unauthorized" in out


async def test_status_json_is_the_raw_view(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    await two_nodes(js, settings)
    code, out, err = await run_cli(*cli_args(nats_server, prefix, "status", "--json"))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["bucket"] == settings.bucket
    assert doc["nodes"]["node-a"]["stale"] is False
    assert doc["nodes"]["node-b"]["stale"] is True
    assert doc["nodes"]["node-a"]["status"]["state"]["failed"] == {IMAGES[2]: "401 Unauthorized"}
    assert doc["nodes"]["node-b"]["status"]["version"] == "9.9.9"
    fleet = doc["fleets"][FLEET]
    assert fleet["node-a"]["missing"] == [IMAGES[2]] and not fleet["node-a"]["complete"]
    assert fleet["node-b"]["complete"]
    assert set(doc["fleets"]["games/other"]) == {"node-b"}

    code, out, _ = await run_cli(
        *cli_args(nats_server, prefix, "status", "--json", "--stale-after", "2h")
    )
    assert json.loads(out)["nodes"]["node-b"]["stale"] is False


async def test_status_without_any_node_says_so(nats_server: NatsServer, prefix: str) -> None:
    code, out, err = await run_cli(*cli_args(nats_server, prefix, "status"))
    assert code == 1 and out == ""
    assert err.startswith("error: no node has reported status") and err.count("\n") == 1


async def test_commands_fail_in_one_line_without_nats(prefix: str) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    # Every command shares the connection path; the one a pipeline runs, and the one people run.
    for args in (["wait", "--fleet", FLEET], ["status"]):
        code, _, err = await run_cli(*args, "--nats-url", url, "--subject-prefix", prefix)
        assert code == 1, args
        assert err.startswith("error: cannot connect to NATS") and err.count("\n") == 1, err


# --- wait -----------------------------------------------------------------------------------


async def test_wait_returns_once_every_live_node_has_the_images(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    await report(js, settings, "node-a", present=set(IMAGES))
    await report(js, settings, "node-b", present=set(IMAGES[:1]), pulling=set(IMAGES[1:]))
    await report(js, settings, "node-c", age=3600)  # stale and empty: ignored
    await report(js, settings, "node-d", desired={}, excluded={FLEET})  # not targeted
    process = await start_cli(*cli_args(nats_server, prefix, "wait", "--fleet", FLEET))

    async def watching() -> bool:
        return await watchers_on(js, settings) > 0

    await until(watching, "wait to watch the bucket")
    assert process.returncode is None  # node-b still pulls
    await report(js, settings, "node-b", present=set(IMAGES))
    code, out, err = await finish(process)
    assert code == 0, err
    assert out.strip() == (
        f"{FLEET}: all images present on 2 live nodes (1 not targeted, 1 stale ignored)"
    )


async def test_wait_times_out_naming_the_missing_nodes_and_images(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    await report(js, settings, "node-a", present=set(IMAGES))
    await report(
        js,
        settings,
        "node-b",
        present={IMAGES[0]},
        pulling={IMAGES[1]},
        failed={IMAGES[2]: "not found"},
    )
    await report(js, settings, "node-c", desired={})
    await report(js, settings, "node-d", age=3600)
    code, out, err = await run_cli(
        *cli_args(nats_server, prefix, "wait", "--fleet", FLEET, "--timeout", "500ms")
    )
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[0] == f"{FLEET} not ready after 500ms: 2 of 3 live nodes miss images"
    assert lines[1] == (
        f"  node-b: 1/3 present; missing {IMAGES[1]} (pulling), {IMAGES[2]} (failed: not found)"
    )
    assert lines[2] == "  node-c: has not seen the Fleet yet"
    assert lines[3] == "  ignored stale nodes: node-d"


async def test_wait_fails_clearly_when_no_live_node_reports(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    await report(js, settings, "node-a", age=3600, present=set(IMAGES))
    code, _, err = await run_cli(
        *cli_args(nats_server, prefix, "wait", "--fleet", FLEET, "--timeout", "200ms")
    )
    assert code == 1
    assert err.strip() == (
        f"no live node reports status in bucket {settings.bucket} after 200ms (1 stale: node-a)"
    )


async def test_wait_stops_waiting_for_a_node_that_turns_stale(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    # node-b is live now but sends no more heartbeats; nothing else changes in the bucket, so
    # only the stale transition can end the wait before its (long) timeout.
    await report(js, settings, "node-a", present=set(IMAGES))
    await report(js, settings, "node-b", age=1.0)
    code, out, err = await run_cli(
        *cli_args(nats_server, prefix, "wait", "--fleet", FLEET, "--stale-after", "2s")
    )
    assert code == 0, err
    assert out.strip() == f"{FLEET}: all images present on 1 live nodes (1 stale ignored)"


async def test_wait_refuses_a_bad_fleet(nats_server: NatsServer, prefix: str) -> None:
    code, _, err = await run_cli(*cli_args(nats_server, prefix, "wait", "--fleet", "simple"))
    assert code == 2
    assert err.startswith("error: --fleet: Fleet 'simple' is not NAMESPACE/NAME")
    assert err.count("\n") == 1


# --- replay ---------------------------------------------------------------------------------


async def test_replay_one_node_writes_a_request_its_syncer_finds(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    code, out, err = await run_cli(*cli_args(nats_server, prefix, "replay", "--node", "node-a"))
    assert code == 0, err
    pending = await pending_replay(js, "node-a", settings=settings)
    assert pending is not None
    assert out.startswith(f"replay requested node=node-a request={pending.request.id}:")
    assert await pending_replay(js, "node-b", settings=settings) is None


async def test_replay_all_asks_every_reporting_node(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    code, _, err = await run_cli(*cli_args(nats_server, prefix, "replay", "--all"))
    assert code == 1 and "no node has reported status" in err

    await report(js, settings, "node-a")
    await report(js, settings, "node-b", age=3600)  # stale nodes replay when they come back
    code, out, err = await run_cli(*cli_args(nats_server, prefix, "replay", "--all"))
    assert code == 0, err
    assert [line.split()[2] for line in out.splitlines()] == ["node=node-a", "node=node-b"]
    for node in ("node-a", "node-b"):
        assert await pending_replay(js, node, settings=settings) is not None


async def test_replay_needs_nodes_or_all(nats_server: NatsServer, prefix: str) -> None:
    for args in ((), ("--all", "--node", "node-a"), ("--node", "Node A")):
        code, _, err = await run_cli(*cli_args(nats_server, prefix, "replay", *args))
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)
