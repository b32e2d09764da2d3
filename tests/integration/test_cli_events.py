"""`image-syncer events` against a real nats-server: the log as text and JSON, per Fleet,
malformed messages shown and skipped over, and --follow seeing new events as they land."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import IO

import pytest
from nats.js import JetStreamContext
from typer.testing import CliRunner, Result

from image_syncer.cli import app
from image_syncer.fleets import build_fleet
from image_syncer.sandbox.nats_server import NatsServer
from wire.eventlog import LogSettings, publish_event

# A CLI command bound to the test's NATS: arguments in, the run's result out.
Cli = Callable[..., Awaitable[Result]]


async def cli(*args: str) -> Result:
    """Run the CLI in a thread (it runs its own event loop) and keep pytest's log handlers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return await asyncio.to_thread(CliRunner().invoke, app, list(args))
    finally:
        root.handlers[:], root.level = handlers, level


@pytest.fixture
def events(nats_server: NatsServer, prefix: str) -> Cli:
    async def run(*args: str) -> Result:
        return await cli("events", *args, "--nats-url", nats_server.url, "--subject-prefix", prefix)

    return run


def rows(text: str) -> list[list[str]]:
    """The text listing's lines, split into columns; the header is checked and dropped."""
    header, *lines = text.splitlines()
    assert header.split() == ["SEQ", "TIME", "EVENT", "FLEET", "IMAGES"]
    return [re.split(r"\s{2,}", line.strip(), maxsplit=4) for line in lines]


async def test_events_lists_the_log_as_text_and_as_json(
    events: Cli, js: JetStreamContext, log_settings: LogSettings
) -> None:
    web = build_fleet("web", ["nginx:1.27", "redis"], init_images=["busybox"])
    lobby = build_fleet("lobby.v2", ["127.0.0.1:5000/lobby:3"], namespace="games")
    await publish_event(js, log_settings, "fleet.events.added", web)
    await publish_event(js, log_settings, "fleet.events.added", lobby)
    await publish_event(js, log_settings, "fleet.events.added", build_fleet("arena", ["nginx:1"]))
    # The update supersedes arena's added message, which the log then purges.
    await publish_event(js, log_settings, "fleet.events.updated", build_fleet("arena", ["nginx:2"]))

    text = await events()
    as_json = await events("--json")

    assert text.exit_code == 0, text.output
    listed = rows(text.stdout)
    assert [(r[0], r[2], r[3], r[4]) for r in listed] == [
        ("1", "fleet.events.added", "default/web", "busybox,nginx:1.27,redis"),
        ("2", "fleet.events.added", "games/lobby.v2", "127.0.0.1:5000/lobby:3"),
        ("4", "fleet.events.updated", "default/arena", "nginx:2"),
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r[1]) for r in listed)
    assert as_json.exit_code == 0, as_json.output
    docs = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [d["seq"] for d in docs] == [1, 2, 4]
    assert docs[0]["time"] == listed[0][1]
    assert docs[0]["event_type"] == "fleet.events.added"
    assert docs[0]["fleet"] == "default/web"
    assert docs[0]["subject"] == f"{log_settings.prefix}.fleet.events.added.default.web"
    assert docs[0]["images"] == ["busybox", "nginx:1.27", "redis"]
    assert docs[0]["containers"][0] == {"name": "init", "image": "busybox"}
    assert docs[1]["resource_version"] == lobby["metadata"]["resourceVersion"]


async def test_events_filters_by_fleet(
    events: Cli, js: JetStreamContext, log_settings: LogSettings
) -> None:
    for namespace, name in [("default", "web"), ("games", "lobby.v2"), ("games", "lobby")]:
        fleet = build_fleet(name, ["nginx"], namespace=namespace)
        await publish_event(js, log_settings, "fleet.events.added", fleet)
    await publish_event(js, log_settings, "fleet.events.updated", build_fleet("web", ["redis"]))

    web = await events("--fleet", "default/web", "--json")
    dotted = await events("--fleet", "games/lobby.v2")
    nothing = await events("--fleet", "games/absent")
    malformed = await events("--fleet", "lobby")

    # web's added message was superseded (and purged) by its update.
    assert [(d["seq"], d["fleet"]) for d in map(json.loads, web.stdout.splitlines())] == [
        (4, "default/web"),
    ]
    assert [(r[0], r[3]) for r in rows(dotted.stdout)] == [("2", "games/lobby.v2")]
    assert nothing.exit_code == 0 and rows(nothing.stdout) == []
    assert malformed.exit_code == 2
    assert malformed.stderr.splitlines() == ["error: --fleet 'lobby' must be NAMESPACE/NAME"]


async def test_events_shows_malformed_messages_with_their_error_and_keeps_going(
    events: Cli, js: JetStreamContext, log_settings: LogSettings
) -> None:
    prefix = log_settings.prefix
    await publish_event(js, log_settings, "fleet.events.added", build_fleet("a", ["nginx"]))
    await js.publish(f"{prefix}.fleet.events.added.default.junk", b"\x00garbage")
    wrong_type = b'{"header":{"headers":{"event_type":"fleet.events.exploded"}},"message":{}}'
    await js.publish(f"{prefix}.fleet.events.exploded.default.odd", wrong_type)
    await publish_event(js, log_settings, "fleet.events.added", build_fleet("b", ["redis"]))

    text = await events()
    as_json = await events("--json")

    assert text.exit_code == 0, text.output
    listed = rows(text.stdout)
    assert [r[2] for r in listed] == [
        "fleet.events.added",
        "MALFORMED",
        "MALFORMED",
        "fleet.events.added",
    ]
    assert listed[1][3] == "default/junk"
    assert listed[1][4].startswith("error: not an event envelope")
    assert listed[2][3] == f"{prefix}.fleet.events.exploded.default.odd"
    assert "unknown event type 'fleet.events.exploded'" in listed[2][4]
    assert listed[3][3:] == ["default/b", "redis"]
    docs = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [d.get("malformed", False) for d in docs] == [False, True, True, False]
    assert docs[1]["fleet"] == "default/junk" and "error" in docs[1]
    assert docs[2]["fleet"] is None


async def test_events_on_a_log_that_does_not_exist_is_one_line(events: Cli, prefix: str) -> None:
    result = await events()
    assert result.exit_code == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "does not exist" in line and f"stream init --subject-prefix {prefix}" in line


class Lines:
    """A subprocess' output, line by line, with a deadline instead of a blocking read."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def until(self, wanted: Callable[[str], bool], timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError("the command exited before printing the line")
            if wanted(line):
                return line
        raise AssertionError(f"no such line within {timeout:.0f}s")


# The `events --follow --json` process and its stdout, line by line.
Follow = tuple["subprocess.Popen[str]", Lines]


@pytest.fixture
def follow(nats_server: NatsServer, prefix: str) -> Iterator[Follow]:
    command = [sys.executable, "-m", "image_syncer", "events", "--follow", "--json"]
    process = subprocess.Popen(
        [*command, "--nats-url", nats_server.url, "--subject-prefix", prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        yield process, Lines(process.stdout)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def fleet_is(name: str) -> Callable[[str], bool]:
    return lambda line: json.loads(line)["fleet"] == f"default/{name}"


async def test_follow_prints_new_events_until_ctrl_c(
    follow: Follow, js: JetStreamContext, log_settings: LogSettings
) -> None:
    process, lines = follow
    await publish_event(js, log_settings, "fleet.events.added", build_fleet("a", ["nginx"]))
    await asyncio.to_thread(lines.until, fleet_is("a"))

    await publish_event(js, log_settings, "fleet.events.added", build_fleet("b", ["redis"]))
    line = await asyncio.to_thread(lines.until, fleet_is("b"))

    assert json.loads(line)["images"] == ["redis"]
    assert process.poll() is None, "--follow must keep running"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130
    assert process.stderr is not None
    assert "Traceback" not in process.stderr.read()


async def test_follow_waits_for_a_log_that_does_not_exist_yet(
    follow: Follow, nats_server: NatsServer, prefix: str
) -> None:
    process, lines = follow
    published = await cli(
        "publish", "added", "--name", "first", "--image", "nginx",
        "--nats-url", nats_server.url, "--subject-prefix", prefix,
    )  # fmt: skip
    assert published.exit_code == 0, published.output
    await asyncio.to_thread(lines.until, fleet_is("first"))
    process.terminate()
