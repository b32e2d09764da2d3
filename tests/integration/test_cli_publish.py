"""`image-syncer publish` against a real nats-server: subjects, envelopes, compaction, duplicates,
and errors that name what is wrong and publish nothing."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import nats.js.errors
import pytest
import yaml
from nats.aio.client import Client
from nats.js import JetStreamContext
from typer.testing import CliRunner, Result

from image_syncer.cli import app
from image_syncer.fleets import build_fleet, fleet_uid, load_fleets
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port
from wire.contract import Kind, decode_event, images_of, message_id, next_images_of
from wire.eventlog import stream_name


async def cli(*args: str, stdin: str | None = None) -> Result:
    """Run the CLI in a thread (it runs its own event loop) and keep pytest's log handlers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return await asyncio.to_thread(CliRunner().invoke, app, list(args), input=stdin)
    finally:
        root.handlers[:], root.level = handlers, level


@pytest.fixture
def publish(nats_server: NatsServer, prefix: str) -> Callable[..., Awaitable[Result]]:
    async def run(*args: str, stdin: str | None = None) -> Result:
        common = ["--nats-url", nats_server.url, "--subject-prefix", prefix]
        return await cli("publish", *args, *common, stdin=stdin)

    return run


class Stored(NamedTuple):
    data: bytes
    headers: dict[str, str]


async def stored(js: JetStreamContext, subject: str) -> Stored:
    """The newest message on ``subject``: its data and headers, both there."""
    prefix = subject.split(".fleet.events.")[0]
    message = await js.get_last_msg(stream_name(prefix, Kind.FLEET), subject)
    assert message.data is not None and message.headers is not None
    return Stored(message.data, message.headers)


async def subjects_in(js: JetStreamContext, prefix: str) -> dict[str, int]:
    """Subject -> message count in the prefix's Fleet stream (empty when it does not exist)."""
    try:
        info = await js.stream_info(stream_name(prefix, Kind.FLEET), subjects_filter=">")
    except nats.js.errors.NotFoundError:
        return {}
    return dict(info.state.subjects or {})


TWO_FLEETS = textwrap.dedent(
    """\
    apiVersion: agones.dev/v1
    kind: Fleet
    metadata:
      name: simple-game-server
    spec:
      replicas: 2
      template:
        spec:
          ports:
          - name: default
            containerPort: 7654
          template:
            spec:
              containers:
              - name: simple-game-server
                image: us-docker.pkg.dev/agones-images/examples/simple-game-server:0.27
    ---
    ---
    apiVersion: agones.dev/v1
    kind: Fleet
    metadata:
      name: lobby.v2
      namespace: games
      uid: 0b5a6bb4-2d52-4a8e-9d4a-1c1c1c1c1c1c
      resourceVersion: "4242"
    spec:
      template:
        spec:
          template:
            spec:
              initContainers:
              - {name: fetch, image: busybox:1.36}
              containers:
              - {name: lobby, image: "127.0.0.1:5000/lobby@sha256:%s"}
              - {name: sidecar, image: envoyproxy/envoy:v1.30.1}
    """
    % ("a" * 64)
)


async def test_publish_by_flags_builds_a_fleet_that_reaches_the_stream(
    publish: Callable[..., Awaitable[Result]], js: JetStreamContext, prefix: str
) -> None:
    result = await publish(
        "added", "--name", "web", "--image", "nginx:1.27", "--image", "redis",
        "--init-image", "busybox",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    subject = f"{prefix}.fleet.events.added.default.web"
    assert result.stdout == f"{subject} seq=1\n"
    message = await stored(js, subject)
    event = decode_event(message.data)
    assert (event.event_type, event.key) == ("fleet.events.added", "default/web")
    assert images_of(event.obj) == [("init", "busybox"), ("gs", "nginx:1.27"), ("gs-2", "redis")]
    assert (event.obj.api_version, event.obj.kind) == ("agones.dev/v1", "Fleet")
    assert event.obj.metadata.uid == fleet_uid("default", "web")
    rv = event.obj.metadata.resource_version
    assert message.headers["Nats-Msg-Id"] == message_id(
        fleet_uid("default", "web"), rv, "fleet.events.added"
    )


async def test_publish_next_image_stages_it_on_the_fleet(
    publish: Callable[..., Awaitable[Result]], js: JetStreamContext, prefix: str
) -> None:
    result = await publish(
        "updated", "--name", "web", "--image", "nginx:1.27",
        "--next-image", "nginx:1.28", "--next-image", "redis:8",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    message = await stored(js, f"{prefix}.fleet.events.updated.default.web")
    event = decode_event(message.data)
    assert next_images_of(event.obj) == ["nginx:1.28", "redis:8"]
    assert images_of(event.obj) == [("gs", "nginx:1.27")]


async def test_each_publish_by_flags_is_a_new_change(
    publish: Callable[..., Awaitable[Result]], js: JetStreamContext, prefix: str
) -> None:
    first = await publish("updated", "--name", "web", "--namespace", "eu", "--image", "nginx")
    second = await publish("updated", "--name", "web", "--namespace", "eu", "--image", "nginx")

    subject = f"{prefix}.fleet.events.updated.eu.web"
    assert first.stdout == f"{subject} seq=1\n"
    assert second.stdout == f"{subject} seq=2\n"


async def test_republishing_the_same_state_is_reported_duplicate(
    publish: Callable[..., Awaitable[Result]], js: JetStreamContext, prefix: str
) -> None:
    flags = ["--name", "web", "--image", "nginx", "--resource-version", "17"]
    assert (await publish("added", *flags)).exit_code == 0
    again = await publish("added", *flags)
    first_file = await publish("added", "-f", "-", stdin=TWO_FLEETS)
    again_file = await publish("added", "-f", "-", stdin=TWO_FLEETS)

    assert again.exit_code == 0, again.output
    assert again.stdout == f"{prefix}.fleet.events.added.default.web seq=1 duplicate\n"
    # The manifest without a resourceVersion is a new change each time; the one with it is not.
    lobby = f"{prefix}.fleet.events.added.games.lobby_v2"
    assert f"{lobby} seq=3\n" in first_file.stdout
    assert f"{lobby} seq=3 duplicate\n" in again_file.stdout
    assert (await subjects_in(js, prefix))[lobby] == 1


async def test_publish_file_publishes_every_fleet_of_a_multi_document_yaml(
    publish: Callable[..., Awaitable[Result]], js: JetStreamContext, prefix: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "fleets.yaml"
    manifest.write_text(TWO_FLEETS)

    result = await publish("updated", "-f", str(manifest))

    assert result.exit_code == 0, result.output
    simple = f"{prefix}.fleet.events.updated.default.simple-game-server"
    lobby = f"{prefix}.fleet.events.updated.games.lobby_v2"
    assert result.stdout == f"{simple} seq=1\n{lobby} seq=2\n"
    event = decode_event((await stored(js, lobby)).data)
    assert event.key == "games/lobby.v2"
    assert event.obj.metadata.uid == "0b5a6bb4-2d52-4a8e-9d4a-1c1c1c1c1c1c"
    assert event.obj.metadata.resource_version == "4242"
    assert [image for _, image in images_of(event.obj)] == [
        "busybox:1.36",
        f"127.0.0.1:5000/lobby@sha256:{'a' * 64}",
        "envoyproxy/envoy:v1.30.1",
    ]
    simple_event = decode_event((await stored(js, simple)).data)
    assert simple_event.obj.metadata.uid == fleet_uid("default", "simple-game-server")
    assert simple_event.old is None


async def test_publish_file_gives_namespaceless_documents_the_namespace_flag(
    publish: Callable[..., Awaitable[Result]], js: JetStreamContext, prefix: str
) -> None:
    result = await publish("added", "-f", "-", "--namespace", "staging", stdin=TWO_FLEETS)
    assert result.exit_code == 0, result.output
    assert sorted(await subjects_in(js, prefix)) == [
        f"{prefix}.fleet.events.added.games.lobby_v2",
        f"{prefix}.fleet.events.added.staging.simple-game-server",
    ]


async def test_deleted_compacts_the_fleets_added_and_updated_messages_away(
    publish: Callable[..., Awaitable[Result]], js: JetStreamContext, prefix: str
) -> None:
    flags = ["--name", "web", "--image", "nginx"]
    for action in ("added", "updated", "updated"):
        assert (await publish(action, *flags)).exit_code == 0
    assert (await publish("added", "--name", "other", "--image", "redis")).exit_code == 0

    deleted = await publish("deleted", *flags, "--tombstone-ttl", "1h")

    assert deleted.exit_code == 0, deleted.output
    tombstone = f"{prefix}.fleet.events.deleted.default.web"
    assert deleted.stdout == f"{tombstone} seq=5\n"
    assert await subjects_in(js, prefix) == {
        f"{prefix}.fleet.events.added.default.other": 1,
        tombstone: 1,
    }
    message = await stored(js, tombstone)
    assert message.headers["Nats-TTL"] == "3600"
    assert decode_event(message.data).event_type == "fleet.events.deleted"


async def test_publish_leaves_an_operators_stream_settings_alone(
    nats_server: NatsServer, publish: Callable[..., Awaitable[Result]], nc: Client, prefix: str
) -> None:
    init = ["stream", "init", "--nats-url", nats_server.url, "--subject-prefix", prefix]
    assert (await cli(*init, "--duplicate-window", "45s")).exit_code == 0

    assert (await publish("added", "--name", "web", "--image", "nginx")).exit_code == 0

    info = await nc.jetstream().stream_info(stream_name(prefix, Kind.FLEET))
    assert info.config.duplicate_window == 45
    assert info.state.messages == 1


NOT_A_FLEET = TWO_FLEETS + "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\n"


@pytest.mark.parametrize(
    ("args", "stdin", "expected"),
    [
        (["-f", "-"], NOT_A_FLEET, "document 4 is v1 Service, not an agones.dev/v1 Fleet"),
        (["-f", "-"], "kind: Fleet\nmetadata: {name: [\n", "invalid YAML: line 3"),
        (["-f", "-"], "", "no Fleet found"),
        (["-f", "/nonexistent/fleet.yaml"], None, "cannot read /nonexistent/fleet.yaml"),
        (["-f", "-"], TWO_FLEETS.replace("busybox:1.36", "Busy Box"), "document 3: Fleet"),
        (["--name", "web", "--image", "nginx:"], None, "invalid image reference 'nginx:'"),
        (["--name", "Web", "--image", "nginx"], None, "name 'Web' is not a valid"),
        (["--name", "web"], None, "at least one --image"),
        (["--name", "web", "--image", "a", "-f", "-"], TWO_FLEETS, "cannot be combined"),
    ],
)
async def test_bad_input_is_one_line_and_publishes_nothing(
    publish: Callable[..., Awaitable[Result]],
    nc: Client,
    prefix: str,
    args: list[str],
    stdin: str | None,
    expected: str,
) -> None:
    result = await publish("added", *args, stdin=stdin)

    assert result.exit_code == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and expected in line, line
    assert await subjects_in(nc.jetstream(), prefix) == {}


def test_no_nats_is_one_line_and_a_non_zero_exit() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "image_syncer", "publish", "added", "--nats-url", url]
    done = subprocess.run(
        [*command, "--name", "web", "--image", "nginx"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: cannot connect to NATS at {url}: ")


def test_build_fleet_and_load_fleets_agree() -> None:
    built = build_fleet("web", ["nginx", "redis"], namespace="eu", init_images=["busybox"])
    [loaded] = load_fleets(yaml.safe_dump(built))
    assert loaded == built
    assert built["spec"]["template"]["spec"]["container"] == "gs"


@pytest.fixture
def guarded_server(tmp_path: Path) -> Iterator[NatsServer]:
    config = 'authorization { user: "alice", password: "s3cret-pw" }'
    with NatsServer(tmp_path / "nats", extra_config=config) as server:
        yield server


def test_credentials_come_from_the_environment_and_never_reach_the_error(
    guarded_server: NatsServer,
) -> None:
    command = [sys.executable, "-m", "image_syncer", "publish", "added", "--name", "web"]
    command += ["--image", "nginx", "--nats-url", guarded_server.url]
    good = {**os.environ, "NATS_USER": "alice", "NATS_PASSWORD": "s3cret-pw"}
    wrong = {**os.environ, "NATS_USER": "alice", "NATS_PASSWORD": "not-the-s3cret"}

    ok = subprocess.run(command, env=good, capture_output=True, text=True, timeout=60)
    refused = subprocess.run(command, env=wrong, capture_output=True, text=True, timeout=60)

    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "agones.fleet.events.added.default.web seq=1\n"
    assert refused.returncode == 1
    [line] = refused.stderr.splitlines()
    assert line.startswith(f"error: cannot connect to NATS at {guarded_server.url}")
    assert "uthorization" in line
    assert "s3cret" not in line


def test_usage_errors_of_the_console_script_are_one_line() -> None:
    for args, expected in (
        (["publish", "foo"], "'foo' is not one of"),
        (["syncer", "--sync-period", "10x"], "invalid duration '10x'"),
        (["no-such-command"], "No such command"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "image_syncer", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def fleet_yaml(name: str, namespace: str = "default") -> str:
    return yaml.safe_dump(
        build_fleet(name, [f"registry.local/{name}:v1"], namespace=namespace), sort_keys=False
    )


async def test_publish_many_fleets_from_files_a_directory_and_stdin_in_one_run(
    publish: Callable[..., Awaitable[Result]], js: JetStreamContext, prefix: str, tmp_path: Path
) -> None:
    directory = tmp_path / "fleets"
    directory.mkdir()
    for i in range(1, 29):
        (directory / f"fleet-{i}.yaml").write_text(fleet_yaml(f"fleet-{i}"))
    (directory / "README.md").write_text("not a manifest")
    single = tmp_path / "lobby.yml"
    single.write_text(fleet_yaml("lobby", "games"))

    result = await publish(
        "added", "-f", str(directory), "-f", str(single), "-f", "-", stdin=fleet_yaml("arena")
    )

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 30
    # A directory in natural order (fleet-2 before fleet-10), then the other sources as given.
    assert lines[1].startswith(f"{prefix}.fleet.events.added.default.fleet-2 ")
    assert lines[9].startswith(f"{prefix}.fleet.events.added.default.fleet-10 ")
    assert lines[28].startswith(f"{prefix}.fleet.events.added.games.lobby ")
    assert lines[29].startswith(f"{prefix}.fleet.events.added.default.arena ")
    assert len(await subjects_in(js, prefix)) == 30


async def test_publish_many_refuses_everything_when_one_source_is_bad(
    publish: Callable[..., Awaitable[Result]], js: JetStreamContext, prefix: str, tmp_path: Path
) -> None:
    good, twin, bad = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    good.write_text(fleet_yaml("arena"))
    twin.write_text(fleet_yaml("arena"))
    bad.write_text("kind: Fleet\nmetadata: {name: Bad_Name}\n")

    result = await publish("added", "-f", str(good), "-f", str(twin))
    assert result.exit_code == 2
    assert f"Fleet default/arena is in both {good} and {twin}" in result.output
    result = await publish("added", "-f", str(good), "-f", str(bad))
    assert result.exit_code == 2 and str(bad) in result.output
    result = await publish("added", "-f", str(tmp_path / "empty-dir-that-is-a-file.txt"))
    assert result.exit_code == 2
    assert await subjects_in(js, prefix) == {}
