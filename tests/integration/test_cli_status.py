"""``image-syncer status``, ``wait`` and ``replay`` as an operator or a CD pipeline runs them.

The commands run as real subprocesses against the real nats-server; the test plays the syncers
by writing node entries through the same contract (wire.nodestatus) the reporter uses, and the
broadcaster by publishing Fleets to the real event log (``wait`` reads a Fleet's newest event).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from support.fleetdicts import fleet
from support.polling import eventually as until
from support.status_harness import (
    FLEET,
    IMAGES,
    cli_args,
    finish,
    report,
    run_cli,
    start_cli,
)
from support.status_harness import settings_fixture as settings_fixture

from image_syncer.fleetlog import fleet_filter, fold_fleet_log, newest_event, read_fleets, target_of
from image_syncer.nodeview import describe_missing
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port
from syncer.reporting.replaykv import pending_replay
from wire.contract import encode_event, subject_for
from wire.eventlog import LogSettings, StoredMessage, publish_event
from wire.nodestatus import (
    Missing,
    MissingState,
    StatusSettings,
)
from wire.readiness import FleetTarget


def fleet_obj(fleet_name: str, images: list[str], rv: str = "1") -> dict[str, Any]:
    namespace, _, name = fleet_name.partition("/")
    return fleet(name, *images, namespace=namespace, rv=rv)


async def publish(
    js: JetStreamContext, prefix: str, action: str, images: list[str] = IMAGES, rv: str = "1"
) -> int:
    """Publish FLEET to the test's event log as the broadcaster would; the event's sequence."""
    obj = fleet_obj(FLEET, images, rv)
    old = obj if action == "updated" else None
    ack = await publish_event(js, LogSettings(prefix=prefix), f"fleet.events.{action}", obj, old)
    return ack.seq


async def bucket_reads(js: JetStreamContext, settings: StatusSettings) -> list[str]:
    """Every direct get of the status bucket sent from now on (``wait``'s first read of the
    bucket among them): a plain subscriber on the API subject hears each request too."""
    heard: list[str] = []

    async def record(msg: Msg) -> None:
        heard.append(msg.subject)

    nc = js._nc
    await nc.subscribe(f"$JS.API.DIRECT.GET.KV_{settings.bucket}", cb=record)
    await nc.flush()
    return heard


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


def table_rows(out: str, title: str) -> dict[str, str]:
    """The rows of one rich table of ``out`` by their first cell (continuation lines joined)."""
    section = re.split(rf"^{re.escape(title)} *$", out, maxsplit=1, flags=re.M)[1]
    section = section.split("┡", 1)[1]
    rows: dict[str, str] = {}
    last = None
    for line in section.splitlines()[1:]:
        if not line.startswith("│"):
            break
        first = line.split("│")[1].strip()
        if first:
            last = first.split()[0]
            rows[last] = line
        elif last is not None:
            rows[last] += line
    return rows


async def test_status_shows_fleets_ready_and_nodes_with_their_problems(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    await two_nodes(js, settings)
    await report(js, settings, "node-c", present=set(IMAGES))
    await report(js, settings, "node-z", schema=2)
    code, out, err = await run_cli(*cli_args(nats_server, prefix, "status"))
    assert code == 0, err
    fleets = table_rows(out, "Fleets (live nodes)")
    assert set(fleets) == {FLEET}  # games/other only on the stale node-b
    assert "1/2" in fleets[FLEET] and "unauthorized (1)" in fleets[FLEET]
    problems = " ".join(out.split("Fleets (live nodes)")[0].split())
    assert f"unauthorized │ {IMAGES[2]}" in problems and "1 node: node-a" in problems
    nodes = table_rows(out, "Nodes")
    assert set(nodes) == {"node-a", "node-b", "node-c"}
    assert "0/1" in nodes["node-a"] and "1 failed" in nodes["node-a"]
    assert "(stale)" in nodes["node-b"] and "2/2" in nodes["node-b"]
    # Written an hour ago: "1h ago" when read within the second, "1h3s ago" on a slow machine.
    assert re.search(r"│ 1h(\d+m)?(\d+s)? ago", nodes["node-b"])
    assert "(stale)" not in nodes["node-a"] and "1/1" in nodes["node-c"]
    assert (
        "unreadable entry for node node-z: status schema 2 written by image-syncer 0.9.0; this "
        "image-syncer reads schema 3: upgrade the syncer on node node-z"
    ) in " ".join(out.split())


async def test_status_drills_down_to_one_fleet_or_node_and_draws_the_matrix_on_request(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    await two_nodes(js, settings)
    await report(js, settings, "node-c", present=set(IMAGES), seqs={FLEET: 7})
    code, out, err = await run_cli(*cli_args(nats_server, prefix, "status", "--fleet", FLEET))
    assert code == 0, err
    rows = table_rows(out, f"{FLEET}: 1/2 live nodes ready")
    assert set(rows) == {"node-a", "node-c"}  # node-b is stale
    assert "2/3 images; missing" in rows["node-a"] and "│ 7 " in rows["node-c"]

    code, out, err = await run_cli(*cli_args(nats_server, prefix, "status", "--node", "node-c"))
    assert code == 0, err
    assert re.match(r"node node-c: image-syncer 9\.9\.9, started 2h[\dms]* ago, heartbeat ", out)
    rows = table_rows(out, "Fleets on node-c")
    assert "│ 7 " in rows[FLEET] and "ready" in rows[FLEET]
    code, _, err = await run_cli(*cli_args(nats_server, prefix, "status", "--node", "node-x"))
    assert code == 1 and err == "error: node node-x reports no status\n"
    code, _, err = await run_cli(*cli_args(nats_server, prefix, "status", "--fleet", "x"))
    assert code == 2 and err.startswith("error: Fleet 'x' is not NAMESPACE/NAME")

    code, out, err = await run_cli(*cli_args(nats_server, prefix, "status", "--matrix"))
    assert code == 0, err
    rows = table_rows(out, "Fleets x nodes (legend below)")
    cells = [cell.strip() for cell in rows[FLEET].split("│")[2:-1]]
    assert cells == ["2/3", "ok", "ok"]  # node-a, node-b, node-c
    assert "1=node-a 2=node-b (stale) 3=node-c" in " ".join(out.split())


async def test_status_json_has_the_rollups_and_the_raw_entries(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    await two_nodes(js, settings)
    code, out, err = await run_cli(*cli_args(nats_server, prefix, "status", "--json"))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["bucket"] == settings.bucket
    node_a, node_b = doc["nodes"]["node-a"], doc["nodes"]["node-b"]
    assert node_a["stale"] is False and node_b["stale"] is True
    assert node_a["status"]["summary"]["missing"] == {
        IMAGES[2]: {"state": "failed", "error": "401 Unauthorized"}
    }
    assert node_a["status"]["summary"]["gaps"] == {FLEET: [3, [IMAGES[2]]]}
    assert node_a["fleets_ready"] == 0 and node_a["problems"] == ["1 failed"]
    assert node_b["status"]["version"] == "9.9.9" and node_b["fleets_ready"] == 2
    assert doc["fleets"][FLEET]["ready"] == 0 and doc["fleets"][FLEET]["total"] == 1
    assert list(doc["fleets"][FLEET]["not_ready"]) == ["node-a"]

    code, out, _ = await run_cli(
        *cli_args(nats_server, prefix, "status", "--json", "--stale-after", "2h")
    )
    doc = json.loads(out)
    assert doc["nodes"]["node-b"]["stale"] is False
    assert doc["fleets"]["games/other"] == {"ready": 1, "total": 1, "not_ready": {}}


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
    code, out, err = await run_cli(*cli_args(nats_server, prefix, "status", "--check-log"))
    assert code == 0, err
    fleets = table_rows(out, "Fleets (live nodes)")
    assert "1/2" in fleets[FLEET] and "behind the log (1)" in fleets[FLEET]
    assert "behind the log" in out.split("Fleets (live nodes)")[0]  # among the problems
    nodes = table_rows(out, "Nodes")
    assert "behind the log on 1 Fleets" in nodes["node-a"] and "behind" not in nodes["node-b"]

    code, out, err = await run_cli(
        *cli_args(nats_server, prefix, "status", "--json", "--check-log")
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["fleets"][FLEET]["log_seq"] == v2
    assert doc["fleets"][FLEET]["not_ready"] == {"node-a": f"behind: seq {v1} < {v2}"}
    assert doc["nodes"]["node-b"]["status"]["summary"]["fleets"] == {FLEET: v2}
    code, out, _ = await run_cli(*cli_args(nats_server, prefix, "status"))
    assert "behind" not in out


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


async def test_the_newest_event_is_read_by_subject_as_the_whole_log_folds_it(
    js: JetStreamContext, prefix: str
) -> None:
    """``newest_event`` (one last-by-subject direct get) agrees with the fold of the whole log,
    also when the newest message does not decode (the fold skips it, so it reads the history)."""
    other = "default/other"
    ack = await publish_event(
        js, LogSettings(prefix=prefix), "fleet.events.added", fleet_obj(other, ["nginx"])
    )
    assert await newest_event(js, prefix, FLEET) == {}
    for rv in ("1", "2", "3"):
        await publish(js, prefix, "added" if rv == "1" else "updated", rv=rv)
    whole = await read_fleets(js, prefix, fleet_filter(prefix, FLEET))
    assert whole is not None
    assert await newest_event(js, prefix, FLEET) == {FLEET: whole[FLEET]}
    assert (await newest_event(js, prefix, other) or {})[other][0] == ack.seq
    # The log keeps one message per subject: the unreadable one on another action's subject
    # leaves the readable one in place, behind it.
    namespace, _, name = FLEET.partition("/")
    await js.publish(
        subject_for(prefix, "fleet.events.added", namespace, name), b'{"not": "an envelope"}'
    )
    assert await read_fleets(js, prefix, fleet_filter(prefix, FLEET)) == whole
    assert await newest_event(js, prefix, FLEET) == {FLEET: whole[FLEET]}


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
    reads = await bucket_reads(js, settings)
    process = await start_cli(*cli_args(nats_server, prefix, "wait", "--fleet", FLEET))
    await until(lambda: bool(reads), "wait to read the bucket")
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
        "  behind the log on 1 node (node-a)",
        f"  (each node's full errors: image-syncer status --fleet {FLEET})",
    ]
    # Folded v2, the new image still pulling: not done either.
    await report(
        js, settings, "node-a", present=set(IMAGES[:2]), pulling={IMAGES[2]}, seqs={FLEET: v2}
    )
    code, _, err = await run_cli(*args)
    assert code == 1
    assert err.splitlines()[1] == f"  {IMAGES[2]}: pulling on 1 node (node-a)"
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
    await report(js, settings, "node-f", present=set(IMAGES), schema=2)
    code, out, err = await run_cli(
        *cli_args(nats_server, prefix, "wait", "--fleet", FLEET, "--timeout", "500ms")
    )
    assert code == 1 and out == ""
    del old  # node-e folded it: behind like node-c, which never folded the Fleet
    # Grouped by image and reason: failures first, then what is on its way.
    assert err.splitlines() == [
        f"{FLEET} (event seq {seq}) not ready after 500ms: 4 of 5 live nodes not done",
        f"  {IMAGES[2]}: not found on 1 node (node-b)",
        "  behind the log on 2 nodes (node-c, node-e)",
        f"  {IMAGES[1]}: pulling on 1 node (node-b)",
        "  node-f: status schema 2 written by image-syncer 0.9.0; this image-syncer reads schema "
        "3: upgrade the syncer on node node-f",
        "  ignored stale nodes: node-d",
        f"  (each node's full errors: image-syncer status --fleet {FLEET})",
    ]


def test_an_image_that_keeps_failing_reads_failed_with_its_last_error_while_retried() -> None:
    # Between retries the node reports it failed, during one pulling (or waiting for a slot):
    # whichever moment wait or status reads, the person sees the failure and its last error.
    image = "registry.example/arena:v2"
    assert describe_missing(image, Missing(MissingState.FAILED, "not found")) == (
        f"{image} (failed: not found)"
    )
    assert describe_missing(image, Missing(MissingState.PULLING, "not found")) == (
        f"{image} (failed, pulling again: not found)"
    )
    assert describe_missing(image, Missing(MissingState.WAITING_SLOT, "not found")) == (
        f"{image} (failed, waiting for a cluster pull slot to retry: not found)"
    )
    assert describe_missing(image, Missing(MissingState.PULLING)) == f"{image} (pulling)"
    assert describe_missing(image, Missing(MissingState.WAITING_SLOT)) == (
        f"{image} (waiting for a cluster pull slot)"
    )
    assert describe_missing(image, Missing(MissingState.PENDING)) == f"{image} (pending)"
    held = "image filesystem at or above --max-image-fs-usage 80%"
    assert describe_missing(image, Missing(MissingState.PENDING, held)) == (
        f"{image} (held back: {held})"
    )


async def test_wait_before_any_syncer_reported_waits_for_the_bucket(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    # A fresh install: the Fleet is published, no syncer has created the status bucket yet.
    seq = await publish(js, prefix, "added")
    code, out, err = await run_cli(
        *cli_args(nats_server, prefix, "wait", "--fleet", FLEET, "--timeout", "300ms")
    )
    assert code == 1 and out == ""
    assert err == (
        f"no node reported status within 300ms: bucket {settings.bucket} does not exist "
        f"(is a syncer running with --subject-prefix {prefix}?)\n"
    )
    process = await start_cli(*cli_args(nats_server, prefix, "wait", "--fleet", FLEET))
    await report(js, settings, "node-a", present=set(IMAGES), seqs={FLEET: seq})
    code, out, err = await finish(process)
    assert code == 0, err
    assert out.strip() == f"{FLEET}: all images present on 1 live nodes as of event seq {seq}"


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
    # node-b is not done and turns stale a few seconds after its last entry; node-a is done.
    # After those entries nothing changes in the bucket, so only the stale transition of node-b
    # can end the wait before its (default, 5m) timeout, long after `finish` gives up. Both
    # entries are written once the wait watches, and node-a has minutes before it turns stale
    # too: a slow machine delays the wait, never changes its answer.
    stale_after, node_b_left = 120.0, 3.0
    seq = await publish(js, prefix, "added")
    await report(js, settings, "node-b")
    reads = await bucket_reads(js, settings)
    process = await start_cli(
        *cli_args(
            nats_server,
            prefix,
            "wait",
            "--fleet",
            FLEET,
            "--stale-after",
            f"{stale_after:.0f}s",
        )
    )
    await until(lambda: bool(reads), "wait to read the bucket")
    await report(js, settings, "node-a", present=set(IMAGES), seqs={FLEET: seq})
    await report(js, settings, "node-b", age=stale_after - node_b_left)
    code, out, err = await finish(process)
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
