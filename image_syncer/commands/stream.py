"""Commands: ``stream init`` and ``stream info``, the JetStream streams that hold the event log.

The streams' settings (compaction, duplicate window, tombstone TTL, replicas) live in
:mod:`wire.eventlog`; these commands only turn flags into :class:`LogSettings` and show the
result. What every one-shot NATS command shares (connecting fail-fast, one line on stderr and a
non-zero exit for the errors a user can cause) is in :mod:`image_syncer.oneshot`.
"""

import json
from typing import Annotated, Any, TypeVar

import nats.errors
import nats.js.errors
import typer
from nats.js.api import StreamInfo
from rich.console import Console
from rich.table import Table

from image_syncer.oneshot import fail, jetstream, run_nats_command
from image_syncer.options import (
    DEFAULT_DUPLICATE_WINDOW,
    DEFAULT_PREFIX,
    DEFAULT_TOMBSTONE_TTL,
    DuplicateWindowOption,
    PrefixOption,
    TombstoneTtlOption,
    with_nats_options,
)
from ops.durations import format_duration
from wire.contract import ContractError, Kind, check_prefix
from wire.eventlog import LogSettings, ensure_streams, stream_name
from wire.natsconn import NatsSettings

__all__ = ["parse_kinds", "register"]

T = TypeVar("T")


def parse_kinds(text: str) -> tuple[Kind, ...]:
    """``fleet,gameserver`` -> (Kind.FLEET, Kind.GAMESERVER); an unknown kind exits 2."""
    names = [k.strip() for k in text.split(",") if k.strip()]
    try:
        kinds = tuple(dict.fromkeys(Kind(n) for n in names))
    except ValueError:
        fail(f"--kinds {text!r}: expected a comma-separated list of fleet, gameserver", code=2)
    if not kinds:
        fail("--kinds must name at least one of fleet, gameserver", code=2)
    return kinds


def _prefix(prefix: str) -> str:
    try:
        return check_prefix(prefix)
    except ContractError as e:
        fail(str(e), code=2)


def register(app: typer.Typer) -> None:
    """Add ``stream init`` and ``stream info`` to the root app."""
    group = typer.Typer(help="Create and inspect the JetStream streams of the event log.")
    group.command("init")(init)
    group.command("info")(info)
    app.add_typer(group, name="stream")


@with_nats_options
def init(
    nats: NatsSettings,
    replicas: Annotated[
        int,
        typer.Option(min=1, max=5, envvar="STREAM_REPLICAS", help="Stream replicas (3 in prod)."),
    ] = 1,
    subject_prefix: PrefixOption = DEFAULT_PREFIX,
    kinds: Annotated[
        str, typer.Option(envvar="KINDS", help="Streams to create: fleet, gameserver.")
    ] = "fleet",
    tombstone_ttl: TombstoneTtlOption = DEFAULT_TOMBSTONE_TTL,
    duplicate_window: DuplicateWindowOption = DEFAULT_DUPLICATE_WINDOW,
) -> None:
    """Create the streams, or bring existing ones in line with these settings (idempotent)."""
    settings = LogSettings(
        prefix=_prefix(subject_prefix),
        replicas=replicas,
        duplicate_window=duplicate_window,
        tombstone_ttl=tombstone_ttl,
    )
    infos = run_nats_command(_init(nats, settings, parse_kinds(kinds)))
    for stream in infos:
        config = stream.config
        typer.echo(
            f"stream {config.name} ready: subjects={','.join(config.subjects or [])}"
            f" replicas={config.num_replicas} max_msgs_per_subject={config.max_msgs_per_subject}"
            f" duplicate_window={format_duration(config.duplicate_window or 0)}"
            f" tombstone_ttl={format_duration(settings.tombstone_ttl)}"
        )


async def _init(
    nats_settings: NatsSettings, settings: LogSettings, kinds: tuple[Kind, ...]
) -> list[StreamInfo]:
    async with jetstream(nats_settings, "image-syncer-stream-init") as js:
        return await ensure_streams(js, settings, kinds)


@with_nats_options
def info(
    nats: NatsSettings,
    subject_prefix: PrefixOption = DEFAULT_PREFIX,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """Show the streams of the prefix: subjects, messages, bytes, sequences and settings."""
    rows = run_nats_command(_info(nats, _prefix(subject_prefix)))
    if not rows:
        fail(f"no streams for prefix {subject_prefix!r}; run: image-syncer stream init")
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"event log streams (prefix {subject_prefix})")
    for column in rows[0]:
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(*(_cell(v) for v in row.values()))
    Console(width=200).print(table)


async def _info(nats_settings: NatsSettings, prefix: str) -> list[dict[str, Any]]:
    rows = []
    async with jetstream(nats_settings, "image-syncer-stream-info") as js:
        for kind in Kind:
            try:
                stream = await js.stream_info(stream_name(prefix, kind))
            except nats.js.errors.NotFoundError:
                continue
            rows.append(_describe(stream))
    return rows


def _describe(stream: StreamInfo) -> dict[str, Any]:
    config, state = stream.config, stream.state
    return {
        "name": config.name,
        "subjects": list(config.subjects or []),
        "messages": state.messages,
        "bytes": state.bytes,
        "first_seq": state.first_seq,
        "last_seq": state.last_seq,
        "replicas": config.num_replicas,
        "max_msgs_per_subject": config.max_msgs_per_subject,
        "allow_msg_ttl": bool(config.allow_msg_ttl),
        "duplicate_window": format_duration(config.duplicate_window or 0),
    }


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
