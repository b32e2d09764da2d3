"""``image-syncer status``, ``wait`` and ``replay`` as an operator or a CD pipeline runs them.

The commands run as real subprocesses against the real nats-server; the test plays the syncers
by writing node entries through the same contract (wire.nodestatus) the reporter uses, and the
broadcaster by publishing Fleets to the real event log (``wait`` reads a Fleet's newest event).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nats.js import JetStreamContext

from image_syncer.fleetlog import fleet_filter, fold_fleet_log, target_of
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port
from syncer.replaycontrol import pending_replay
from wire.contract import encode_event, subject_for
from wire.eventlog import LogSettings, StoredMessage, publish_event
from wire.nodestatus import (
    SCHEMA,
    FleetTarget,
    NodeState,
    NodeStatus,
    StatusSettings,
    encode_status,
    ensure_status_bucket,
    node_key,
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
    seqs: dict[str, int] | None = None,
    schema: int = SCHEMA,
) -> NodeStatus:
    """Write a node's entry as its syncer would, ``age`` seconds after its last heartbeat.

    ``seqs``: the event each Fleet was last folded from (``fleet_seqs``); ``schema=1`` writes
    an entry as an older syncer did, without them.
    """
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
            fleet_seqs=seqs or {},
        ),
        schema=schema,
    )
    await ensure_status_bucket(js, settings)
    if schema < SCHEMA:
        # Exactly the bytes an older syncer wrote: a field it did not know is not there at all.
        doc = json.loads(encode_status(status))
        doc["state"].pop("fleet_seqs", None)
        subject = f"$KV.{settings.bucket}.{node_key(node)}"
        await js.publish(subject, json.dumps(doc).encode())
    else:
        await put_status(js, settings, status)
    return status


def fleet_obj(fleet: str, images: list[str], rv: str = "1") -> dict[str, Any]:
    namespace, _, name = fleet.partition("/")
    pod = {"containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]}
    return {
        "apiVersion": "agones.dev/v1",
        "kind": "Fleet",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "resourceVersion": rv,
        },
        "spec": {"template": {"spec": {"template": {"spec": pod}}}},
    }


async def publish(
    js: JetStreamContext, prefix: str, action: str, images: list[str] = IMAGES, rv: str = "1"
) -> int:
    """Publish FLEET to the test's event log as the broadcaster would; the event's sequence."""
    obj = fleet_obj(FLEET, images, rv)
    old = obj if action == "updated" else None
    ack = await publish_event(js, LogSettings(prefix=prefix), f"fleet.events.{action}", obj, old)
    return ack.seq


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


async def test_status_check_log_marks_nodes_behind_the_log(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    v1 = await publish(js, prefix, "added", IMAGES[:2])
    v2 = await publish(js, prefix, "updated", IMAGES, rv="2")
    await report(
        js,
        settings,
        "node-a",
        desired={FLEET: IMAGES[:2]},
        present=set(IMAGES[:2]),
        seqs={FLEET: v1},
    )
    await report(js, settings, "node-b", present=set(IMAGES), seqs={FLEET: v2})
    await report(
        js, settings, "node-c", desired={FLEET: IMAGES[:2]}, present=set(IMAGES[:2]), schema=1
    )
    code, out, err = await run_cli(*cli_args(nats_server, prefix, "status", "--check-log"))
    assert code == 0, err
    rows = {line.split()[1]: line for line in out.splitlines() if "node-" in line and "│" in line}
    assert "2/2 (behind)" in rows["node-a"]
    assert "3/3" in rows["node-b"] and "behind" not in rows["node-b"]
    assert "behind" not in rows["node-c"]  # an older syncer cannot say which version it has

    code, out, err = await run_cli(
        *cli_args(nats_server, prefix, "status", "--json", "--check-log")
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["log"] == {FLEET: {"seq": v2, "images": IMAGES, "behind": ["node-a"]}}
    assert doc["nodes"]["node-b"]["status"]["state"]["fleet_seqs"] == {FLEET: v2}
    code, out, _ = await run_cli(*cli_args(nats_server, prefix, "status"))
    assert "behind" not in out
    code, out, _ = await run_cli(*cli_args(nats_server, prefix, "status", "--json"))
    assert "log" not in json.loads(out)


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


# --- the log's side of wait: fold and target (pure) ------------------------------------------


async def stored(*messages: tuple[int, bytes]) -> AsyncIterator[StoredMessage]:
    for seq, data in messages:
        yield StoredMessage(seq=seq, time=None, subject="s", data=data, headers={})


def test_fleet_filter_matches_every_action_of_one_fleet_with_encoded_names() -> None:
    assert fleet_filter("agones", "default/game.v2") == "agones.fleet.events.*.default.game_v2"
    added = subject_for("p.q", "fleet.events.added", "ns", "game.v2")
    assert fleet_filter("p.q", "ns/game.v2") == added.replace(".added.", ".*.")


async def test_the_fold_keeps_each_fleets_newest_readable_event() -> None:
    v1 = fleet_obj(FLEET, ["nginx"])
    v2 = fleet_obj(FLEET, ["nginx", "127.0.0.1:5000/game:v2"], rv="2")
    newest = await fold_fleet_log(
        stored(
            (3, encode_event("fleet.events.added", v1)),
            (5, encode_event("fleet.events.updated", v2, v1)),
            (6, b'{"not": "an envelope"}'),  # terminated by the syncers: moves no node
        )
    )
    seq, event = newest[FLEET]
    target = target_of(FLEET, seq, event)
    assert target == FleetTarget(
        seq=5, images=("docker.io/library/nginx:latest", "127.0.0.1:5000/game:v2")
    )


async def test_a_deleted_or_imageless_fleet_has_nothing_to_wait_for() -> None:
    v1 = fleet_obj(FLEET, ["nginx"])
    newest = await fold_fleet_log(
        stored(
            (3, encode_event("fleet.events.added", v1)),
            (8, encode_event("fleet.events.deleted", v1)),
        )
    )
    assert target_of(FLEET, *newest[FLEET]) == (
        f"fleet {FLEET} was deleted (event seq 8): there is nothing to wait for"
    )
    bad = await fold_fleet_log(
        stored((4, encode_event("fleet.events.added", fleet_obj(FLEET, ["Bad Ref"]))))
    )
    assert (
        target_of(FLEET, *bad[FLEET])
        == f"fleet {FLEET} names no image a syncer can pull (event seq 4)"
    )


# --- wait -----------------------------------------------------------------------------------


async def test_wait_returns_once_every_live_node_has_the_images(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    seq = await publish(js, prefix, "added")
    at = {FLEET: seq}
    await report(js, settings, "node-a", present=set(IMAGES), seqs=at)
    await report(js, settings, "node-b", present=set(IMAGES[:1]), pulling=set(IMAGES[1:]), seqs=at)
    await report(js, settings, "node-c", age=3600)  # stale and empty: ignored
    await report(js, settings, "node-d", desired={}, excluded={FLEET}, seqs=at)  # not targeted
    process = await start_cli(*cli_args(nats_server, prefix, "wait", "--fleet", FLEET))

    async def watching() -> bool:
        return await watchers_on(js, settings) > 0

    await until(watching, "wait to watch the bucket")
    assert process.returncode is None  # node-b still pulls
    await report(js, settings, "node-b", present=set(IMAGES), seqs=at)
    code, out, err = await finish(process)
    assert code == 0, err
    assert out.strip() == (
        f"{FLEET}: all images present on 2 live nodes as of event seq {seq} "
        "(1 not targeted, 1 stale ignored)"
    )


async def test_wait_does_not_count_a_node_still_on_the_previous_version(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    # The CD race: v2 is published, the node's entry still speaks of v1, whose images are all
    # there. Before fleet_seqs, wait answered "done" from that entry.
    v1 = await publish(js, prefix, "added", IMAGES[:2])
    await report(
        js,
        settings,
        "node-a",
        desired={FLEET: IMAGES[:2]},
        present=set(IMAGES[:2]),
        seqs={FLEET: v1},
    )
    v2 = await publish(js, prefix, "updated", IMAGES, rv="2")
    args = cli_args(nats_server, prefix, "wait", "--fleet", FLEET, "--timeout", "500ms")
    code, out, err = await run_cli(*args)
    assert code == 1 and out == "", out
    assert err.splitlines() == [
        f"{FLEET} (event seq {v2}) not ready after 500ms: 1 of 1 live nodes not done",
        f"  node-a: behind: seq {v1} < {v2}",
    ]
    # Folded v2, the new image still pulling: not done either.
    await report(
        js, settings, "node-a", present=set(IMAGES[:2]), pulling={IMAGES[2]}, seqs={FLEET: v2}
    )
    code, _, err = await run_cli(*args)
    assert code == 1
    assert err.splitlines()[1] == f"  node-a: 2/3 present; missing {IMAGES[2]} (pulling)"
    await report(js, settings, "node-a", present=set(IMAGES), seqs={FLEET: v2})
    code, out, err = await run_cli(*args)
    assert code == 0, err
    assert out.strip() == f"{FLEET}: all images present on 1 live nodes as of event seq {v2}"


async def test_wait_times_out_naming_the_missing_nodes_and_why(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    old = await publish(js, prefix, "added", IMAGES[:1])
    seq = await publish(js, prefix, "updated", IMAGES, rv="2")
    at = {FLEET: seq}
    await report(js, settings, "node-a", present=set(IMAGES), seqs=at)
    await report(
        js,
        settings,
        "node-b",
        present={IMAGES[0]},
        pulling={IMAGES[1]},
        failed={IMAGES[2]: "not found"},
        seqs=at,
    )
    await report(js, settings, "node-c", desired={})
    await report(js, settings, "node-d", age=3600)
    await report(
        js, settings, "node-e", desired={FLEET: IMAGES[:1]}, present={IMAGES[0]}, seqs={FLEET: old}
    )
    await report(js, settings, "node-f", desired={FLEET: IMAGES[:1]}, present={IMAGES[0]}, schema=1)
    code, out, err = await run_cli(
        *cli_args(nats_server, prefix, "wait", "--fleet", FLEET, "--timeout", "500ms")
    )
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"{FLEET} (event seq {seq}) not ready after 500ms: 4 of 5 live nodes not done",
        f"  node-b: 1/3 present; missing {IMAGES[1]} (pulling), {IMAGES[2]} (failed: not found)",
        f"  node-c: behind: has not folded the Fleet yet (log at seq {seq})",
        f"  node-e: behind: seq {old} < {seq}",
        f"  node-f: 1/3 present; missing {IMAGES[1]}, {IMAGES[2]} (older syncer: judged by images alone)",
        "  older syncers, judged by images alone: node-f",
        "  ignored stale nodes: node-d",
    ]


async def test_wait_accepts_entries_of_older_syncers_by_their_images(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    seq = await publish(js, prefix, "added")
    await report(js, settings, "node-old", present=set(IMAGES), schema=1)
    await report(js, settings, "node-new", present=set(IMAGES), seqs={FLEET: seq})
    code, out, err = await run_cli(*cli_args(nats_server, prefix, "wait", "--fleet", FLEET))
    assert code == 0, err
    assert out.strip() == (
        f"{FLEET}: all images present on 2 live nodes as of event seq {seq} "
        "(1 older syncers judged by images alone)"
    )


async def test_wait_fails_at_once_for_a_fleet_not_in_the_log(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    await report(js, settings, "node-a", present=set(IMAGES))
    # No --timeout: the default 5m would show if wait waited instead of failing.
    code, out, err = await run_cli(
        *cli_args(nats_server, prefix, "wait", "--fleet", "default/nope")
    )
    assert code == 1 and out == ""
    stream = f"{prefix.upper()}_FLEETS"
    assert err == f"error: fleet default/nope is not in the event log (stream {stream})\n"


async def test_wait_fails_at_once_for_a_deleted_fleet(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    added = await publish(js, prefix, "added")
    await report(js, settings, "node-a", present=set(IMAGES), seqs={FLEET: added})
    deleted = await publish(js, prefix, "deleted", rv="2")
    code, out, err = await run_cli(*cli_args(nats_server, prefix, "wait", "--fleet", FLEET))
    assert code == 1 and out == ""
    assert err == (
        f"error: fleet {FLEET} was deleted (event seq {deleted}): there is nothing to wait for\n"
    )


async def test_wait_fails_clearly_when_no_live_node_reports(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    seq = await publish(js, prefix, "added")
    await report(js, settings, "node-a", age=3600, present=set(IMAGES), seqs={FLEET: seq})
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
    seq = await publish(js, prefix, "added")
    await report(js, settings, "node-a", present=set(IMAGES), seqs={FLEET: seq})
    await report(js, settings, "node-b", age=1.0)
    code, out, err = await run_cli(
        *cli_args(nats_server, prefix, "wait", "--fleet", FLEET, "--stale-after", "2s")
    )
    assert code == 0, err
    assert out.strip() == (
        f"{FLEET}: all images present on 1 live nodes as of event seq {seq} (1 stale ignored)"
    )


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
