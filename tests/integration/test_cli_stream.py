"""`image-syncer stream init|info` against a real nats-server: idempotent, and the settings stick."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from support.fleetdicts import fleet as fleet_dict
from typer.testing import CliRunner, Result

from image_syncer.cli import app
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port, wait_until
from wire.contract import Kind
from wire.eventlog import LogSettings, publish_event, stream_name
from wire.natsconn import NatsSettings, connect


async def cli(*args: str, stdin: str | None = None) -> Result:
    """Run the CLI in a thread (it runs its own event loop) and keep pytest's log handlers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return await asyncio.to_thread(CliRunner().invoke, app, list(args), input=stdin)
    finally:
        root.handlers[:], root.level = handlers, level


def fleet(name: str, rv: str) -> dict[str, Any]:
    return fleet_dict(name, "nginx", rv=rv)


async def test_stream_init_twice_is_idempotent_and_sets_the_log_settings(
    nats_server: NatsServer, nc: Client, prefix: str
) -> None:
    args = ["stream", "init", "--nats-url", nats_server.url, "--subject-prefix", prefix]
    args += ["--replicas", "1", "--duplicate-window", "30s", "--tombstone-ttl", "1h"]
    args += ["--kinds", "fleet,gameserver"]
    first = await cli(*args)
    assert first.exit_code == 0, first.output
    js = nc.jetstream()
    await publish_event(js, LogSettings(prefix=prefix), "fleet.events.added", fleet("a", "1"))

    second = await cli(*args)

    assert second.exit_code == 0, second.output
    assert second.stdout == first.stdout
    assert f"stream {stream_name(prefix, Kind.FLEET)} ready" in second.stdout
    for kind in Kind:
        info = await js.stream_info(stream_name(prefix, kind))
        assert info.config.subjects == [f"{prefix}.{kind}.events.*.*.*"]
        assert info.config.max_msgs_per_subject == 1
        assert info.config.allow_msg_ttl is True
        assert info.config.duplicate_window == 30
        assert info.config.num_replicas == 1
    fleets = await js.stream_info(stream_name(prefix, Kind.FLEET))
    assert fleets.state.messages == 1, "a second init must not touch the log"


async def test_stream_init_brings_an_existing_stream_in_line(
    nats_server: NatsServer, nc: Client, prefix: str
) -> None:
    base = ["stream", "init", "--nats-url", nats_server.url, "--subject-prefix", prefix]
    assert (await cli(*base)).exit_code == 0
    js = nc.jetstream()
    assert (await js.stream_info(stream_name(prefix, Kind.FLEET))).config.duplicate_window == 120

    result = await cli(*base, "--duplicate-window", "45s")

    assert result.exit_code == 0, result.output
    assert "duplicate_window=45s" in result.stdout
    assert (await js.stream_info(stream_name(prefix, Kind.FLEET))).config.duplicate_window == 45


async def test_stream_init_reads_its_settings_from_the_environment(
    nats_server: NatsServer, nc: Client, prefix: str
) -> None:
    env = {"NATS_URL": nats_server.url, "SUBJECT_PREFIX": prefix, "DUPLICATE_WINDOW": "1m30s"}
    root = logging.getLogger()
    handlers = root.handlers[:]
    try:
        result = await asyncio.to_thread(CliRunner().invoke, app, ["stream", "init"], env=env)
    finally:
        root.handlers[:] = handlers
    assert result.exit_code == 0, result.output
    info = await nc.jetstream().stream_info(stream_name(prefix, Kind.FLEET))
    assert info.config.duplicate_window == 90


async def test_stream_init_reports_replicas_the_server_cannot_hold_in_one_line(
    nats_server: NatsServer, prefix: str
) -> None:
    result = await cli(
        "stream", "init", "--nats-url", nats_server.url, "--subject-prefix", prefix,
        "--replicas", "3",
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and "replicas" in line


async def test_stream_init_refuses_an_unknown_kind(nats_server: NatsServer, prefix: str) -> None:
    result = await cli(
        "stream", "init", "--nats-url", nats_server.url, "--subject-prefix", prefix,
        "--kinds", "fleet,pod",
    )  # fmt: skip
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert "--kinds" in line and "fleet, gameserver" in line


async def test_stream_info_shows_what_is_there_as_a_table_and_as_json(
    nats_server: NatsServer, nc: Client, prefix: str
) -> None:
    url = ["--nats-url", nats_server.url, "--subject-prefix", prefix]
    assert (await cli("stream", "init", *url, "--duplicate-window", "45s")).exit_code == 0
    js = nc.jetstream()
    settings = LogSettings(prefix=prefix)
    await publish_event(js, settings, "fleet.events.added", fleet("a", "1"))
    await publish_event(js, settings, "fleet.events.added", fleet("b", "1"))

    as_json = await cli("stream", "info", *url, "--json")
    table = await cli("stream", "info", *url)

    assert as_json.exit_code == 0, as_json.output
    [row] = json.loads(as_json.stdout)
    expected = {
        "name": stream_name(prefix, Kind.FLEET),
        "subjects": [f"{prefix}.fleet.events.*.*.*"],
        "messages": 2,
        "first_seq": 1,
        "last_seq": 2,
        "replicas": 1,
        "max_msgs_per_subject": 1,
        "allow_msg_ttl": True,
        "duplicate_window": "45s",
    }
    assert {k: row[k] for k in expected} == expected
    assert row["bytes"] > 0
    assert table.exit_code == 0, table.output
    [line] = [x for x in table.stdout.splitlines() if stream_name(prefix, Kind.FLEET) in x]
    cells = [c.strip() for c in line.strip("│ ").split("│")]
    assert cells[0] == stream_name(prefix, Kind.FLEET)
    assert cells[2:5] == ["2", str(row["bytes"]), "1"]
    assert cells[-2:] == ["yes", "45s"]


async def test_stream_info_without_streams_says_how_to_create_them(
    nats_server: NatsServer, prefix: str
) -> None:
    result = await cli("stream", "info", "--nats-url", nats_server.url, "--subject-prefix", prefix)
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert "stream init" in line


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three clustered JetStream servers on loopback, ready once a meta leader is elected."""
    ports = [free_port() for _ in range(3)]
    routes = [f"nats-route://127.0.0.1:{port}" for port in ports]
    servers = [
        NatsServer(tmp_path / f"n{i}", cluster_port=port, routes=routes, server_name=f"n{i}")
        for i, port in enumerate(ports)
    ]
    try:
        for server in servers:
            server.start(wait=False)
        for server in servers:
            server.wait_ready()
        # Plain /healthz answers 200 only once JetStream has a meta leader.
        wait_until(lambda: all(_healthy(s) for s in servers), timeout=30, what="nats cluster")
        yield servers
    finally:
        for server in servers:
            server.stop()


def _healthy(server: NatsServer) -> bool:
    with urllib.request.urlopen(f"{server.monitor_url}/healthz", timeout=1) as response:
        result: bool = response.status == 200
        return result


async def test_stream_init_sets_replicas_on_a_cluster(cluster: list[NatsServer]) -> None:
    urls = ",".join(server.url for server in cluster)
    result = await cli("stream", "init", "--nats-url", urls, "--replicas", "3")
    info = await cli("stream", "info", "--nats-url", urls, "--json")

    assert result.exit_code == 0, result.output
    assert "replicas=3" in result.stdout
    [row] = json.loads(info.stdout)
    assert row["replicas"] == 3
    nc = await connect(NatsSettings(servers=(cluster[1].url,)), name="tests")
    try:
        stream = await nc.jetstream().stream_info(stream_name("agones", Kind.FLEET))
    finally:
        await nc.close()
    assert stream.config.num_replicas == 3
    assert stream.cluster is not None and len(stream.cluster.replicas or []) == 2
