"""``status`` and ``wait`` as a terminal shows them: 30 Fleets, 6 nodes, two Fleets failing.

Rendered by the real CLI at 80 and 120 columns (``COLUMNS``) against the real nats-server; the
test plays six syncers through the status contract. Two Fleets cannot be pulled on five nodes,
each node reporting the runtime's raw error (the image reference three times in it); the sixth
node's selector excludes every Fleet.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
from nats.js import JetStreamContext
from support.fleetdicts import fleet
from support.status_harness import cli_args, finish, report

from image_syncer.sandbox.nats_server import NatsServer
from wire.eventlog import LogSettings, publish_event
from wire.nodestatus import StatusSettings

pytestmark = pytest.mark.nats

FLEETS = [f"default/fleet-{i}" for i in range(1, 31)]
NODES = [f"node-{i}" for i in range(1, 7)]
NOT_FOUND = "default/fleet-7"
UNAUTHORIZED = "default/fleet-12"


def image(fleet: str) -> str:
    return f"registry.local/{fleet.split('/')[1]}:v1"


def raw_error(ref: str, answer: str) -> str:
    """What containerd says through CRI, the reference three times over."""
    return (
        f'rpc error: code = Unknown desc = failed to pull and unpack image "{ref}": failed to '
        f'resolve reference "{ref}": {answer}: {ref}'
    )


@pytest.fixture
def settings(prefix: str) -> StatusSettings:
    return StatusSettings(prefix=prefix)


@pytest.fixture
async def cluster(js: JetStreamContext, settings: StatusSettings) -> None:
    desired = {fleet: [image(fleet)] for fleet in FLEETS}
    failed = {
        image(NOT_FOUND): raw_error(image(NOT_FOUND), "not found"),
        image(UNAUTHORIZED): raw_error(image(UNAUTHORIZED), "401 Unauthorized"),
    }
    present = {image(f) for f in FLEETS} - set(failed)
    for node in NODES[:5]:
        await report(js, settings, node, desired=desired, present=present, failed=failed)
    await report(js, settings, NODES[5], desired={}, excluded=set(FLEETS))


async def run_at(columns: int, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1", "TERM": "dumb"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "image_syncer",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    return await finish(process)


def section(out: str, title: str) -> list[str]:
    """The lines of one titled table of ``out``, up to the next blank-titled block."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i] and lines[i][0] not in "┏┃┡│└ "),
        len(lines),
    )
    return lines[start:end]


def first_cells(lines: list[str]) -> list[str]:
    return [line.split("│")[1].strip() for line in lines if line.startswith("│")]


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.usefixtures("cluster")
async def test_status_summarizes_then_groups_the_failures_by_image_and_reason(
    nats_server: NatsServer, prefix: str, columns: int
) -> None:
    code, out, err = await run_at(columns, *cli_args(nats_server, prefix, "status"))
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert (
        lines[0] == "30 Fleets, 6 live nodes: 28 ready everywhere, 2 failing, 1 node wants no Fleet"
    )
    # The runtime's words are for --fleet/--node/--json: each broken image is named once.
    assert "failed to pull and unpack" not in out
    for broken in (NOT_FOUND, UNAUTHORIZED):
        assert " ".join(out.split()).count(image(broken)) == 1, out
    problems = section(out, "Problems")
    text = " ".join(" ".join(problems).split())
    assert "not found" in text and "unauthorized" in text
    assert text.count("5 nodes: node-1, node-2, node-3 +2") == 2
    assert len(problems) <= 12, "\n".join(problems)
    # Problems first: the failing Fleets lead the Fleets table, then the rest in natural order.
    fleets = first_cells(section(out, "Fleets (live nodes)"))
    named = [cell for cell in fleets if cell.startswith("default/")]
    assert named[:2] == [NOT_FOUND, UNAUTHORIZED]
    assert named[2:] == [f for f in FLEETS if f not in (NOT_FOUND, UNAUTHORIZED)]
    # The node whose selector excludes every Fleet is flagged, and listed first.
    nodes = section(out, "Nodes")
    assert first_cells(nodes)[0] == "node-6"
    assert "wants no Fleet" in " ".join(" ".join(nodes).split())
    assert lines.index(problems[0]) < out.splitlines().index(section(out, "Fleets")[0])
    assert len(lines) <= 60, f"{len(lines)} lines at {columns} columns"

    code, _, err = await run_at(columns, *cli_args(nats_server, prefix, "status", "--exit-code"))
    assert code == 3, err


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.usefixtures("cluster")
async def test_the_matrix_draws_fleets_by_numbered_nodes_when_they_fit(
    nats_server: NatsServer, prefix: str, columns: int
) -> None:
    code, out, err = await run_at(columns, *cli_args(nats_server, prefix, "status", "--matrix"))
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= columns
    header = next(line for line in lines if line.startswith("┃"))
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["Fleet", *"123456"]
    rows = {line.split("│")[1].strip(): line for line in lines if line.startswith("│ default/")}
    assert rows[NOT_FOUND].count("0/1") == 5 and rows["default/fleet-3"].count("ok") == 5
    legend = " ".join(" ".join(lines).split())
    assert "1=node-1 2=node-2" in legend and "6=node-6" in legend


async def test_the_matrix_lists_the_cells_not_ok_when_the_nodes_do_not_fit(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    desired = {fleet: [image(fleet)] for fleet in FLEETS[:3]}
    present = {image(f) for f in FLEETS[:3]}
    for i in range(1, 21):
        held = present if i != 13 else present - {image(FLEETS[1])}
        await report(js, settings, f"node-{i}", desired=desired, present=held)
    code, out, err = await run_at(80, *cli_args(nats_server, prefix, "status", "--matrix"))
    assert code == 0, err
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "the cells not ok" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    assert set(rows) == {FLEETS[1]} and "node-13 0/1" in rows[FLEETS[1]]


@pytest.mark.usefixtures("cluster")
async def test_wait_groups_its_timeout_report_like_status(
    js: JetStreamContext, nats_server: NatsServer, prefix: str
) -> None:
    # The nodes above never folded this Fleet: all six are behind the log.
    obj = fleet("simple", image(NOT_FOUND))
    await publish_event(js, LogSettings(prefix=prefix), "fleet.events.added", obj)
    code, out, err = await run_at(
        80,
        *cli_args(nats_server, prefix, "wait", "--fleet", "default/simple", "--timeout", "300ms"),
    )
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[1] == "  behind the log on 6 nodes (node-1, node-2, node-3 +3)", err
    assert len(lines) == 3, err


@pytest.mark.usefixtures("cluster")
async def test_status_json_carries_the_summary_and_the_groups_with_the_full_errors(
    nats_server: NatsServer, prefix: str
) -> None:
    code, out, err = await run_at(80, *cli_args(nats_server, prefix, "status", "--json"))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["summary"].startswith("30 Fleets, 6 live nodes: 28 ready everywhere, 2 failing")
    groups = {(g["image"], g["reason"]): g for g in doc["problems"]}
    group = groups[(image(NOT_FOUND), "not found")]
    assert group["nodes"] == NODES[:5] and group["fleets"] == [NOT_FOUND] and group["failing"]
    assert group["error"] == raw_error(image(NOT_FOUND), "not found")
    assert doc["nodes"]["node-6"]["problems"] == ["wants no Fleet: all 30 excluded"]
