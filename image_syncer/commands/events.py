"""Command: ``events``, the Fleet event log as the syncers will read it.

It reads through :func:`wire.eventlog.read_log` and decodes with the wire contract, so what it
shows (and what it calls malformed, with the contract's reason) is exactly what every syncer
sees. A malformed message is a line of output, never the end of the listing.
"""

import json
from datetime import UTC
from typing import Annotated, Any

import nats.js.errors
import typer
from nats.js import JetStreamContext

from image_syncer.fleetlog import ensure_stream_exists
from image_syncer.oneshot import CommandError, fail, jetstream, run_nats_command
from image_syncer.options import DEFAULT_PREFIX, PrefixOption, with_nats_options
from wire.contract import (
    ContractError,
    Kind,
    check_prefix,
    decode_event,
    decode_subject,
    images_of,
    object_filter,
)
from wire.eventlog import LogSettings, StoredMessage, read_log, stream_name
from wire.natsconn import NatsSettings

__all__ = ["describe", "register"]

_TEXT_HEADER = f"{'SEQ':>6}  {'TIME':<24}  {'EVENT':<20}  {'FLEET':<30}  IMAGES"


def register(app: typer.Typer) -> None:
    """Add ``events`` to the root app."""
    app.command("events")(events)


@with_nats_options
def events(
    nats: NatsSettings,
    follow: Annotated[
        bool, typer.Option("--follow", "-F", help="Keep printing new events until Ctrl-C.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    fleet: Annotated[
        str | None, typer.Option("--fleet", metavar="NAMESPACE/NAME", help="Only this Fleet.")
    ] = None,
    subject_prefix: PrefixOption = DEFAULT_PREFIX,
) -> None:
    """List the Fleet event log: sequence, time, event type, fleet, images."""
    try:
        check_prefix(subject_prefix)
        subject = _fleet_filter(subject_prefix, fleet) if fleet else None
    except ContractError as e:
        fail(str(e), code=2)
    settings = LogSettings(prefix=subject_prefix)
    run_nats_command(_list(nats, settings, subject, follow=follow, as_json=as_json))


def _fleet_filter(prefix: str, fleet: str) -> str:
    """The subject filter of every event of one Fleet, any action."""
    namespace, slash, name = fleet.partition("/")
    if not slash:
        raise ContractError(f"--fleet {fleet!r} must be NAMESPACE/NAME")
    return object_filter(prefix, Kind.FLEET, namespace, name)


async def _list(
    nats_settings: NatsSettings,
    settings: LogSettings,
    subject: str | None,
    *,
    follow: bool,
    as_json: bool,
) -> None:
    stream = stream_name(settings.prefix, Kind.FLEET)
    async with jetstream(nats_settings, "image-syncer-events") as js:
        if follow:
            # Waiting for the first event is the point of --follow: make sure there is a log.
            await ensure_stream_exists(js, settings, Kind.FLEET)
        else:
            await _check_stream(js, stream, settings.prefix)
        if not as_json:
            typer.echo(_TEXT_HEADER)
        async for message in read_log(js, stream, subject=subject, follow=follow):
            row = describe(settings.prefix, message)
            typer.echo(json.dumps(row) if as_json else _text(row))


async def _check_stream(js: JetStreamContext, stream: str, prefix: str) -> None:
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        hint = f"image-syncer stream init --subject-prefix {prefix}"
        raise CommandError(f"stream {stream} does not exist; create it with: {hint}") from None


def describe(prefix: str, message: StoredMessage) -> dict[str, Any]:
    """One stored message as a row: decoded, or marked malformed with the contract's reason."""
    row: dict[str, Any] = {
        "seq": message.seq,
        "time": _time(message),
        "subject": message.subject,
    }
    try:
        event = decode_event(message.data)
    except ContractError as e:
        return {**row, **_from_subject(prefix, message.subject), "malformed": True, "error": str(e)}
    images = images_of(event.obj)
    return {
        **row,
        "event_type": event.event_type,
        "fleet": event.key,
        "resource_version": event.obj.metadata.resource_version,
        "images": [image for _, image in images],
        "containers": [{"name": name, "image": image} for name, image in images],
    }


def _from_subject(prefix: str, subject: str) -> dict[str, Any]:
    # A malformed payload still says, through its subject, which Fleet it claims to be about.
    try:
        event_type, namespace, name = decode_subject(prefix, subject)
    except ContractError:
        return {"event_type": None, "fleet": None}
    return {"event_type": event_type, "fleet": f"{namespace}/{name}"}


def _time(message: StoredMessage) -> str | None:
    if message.time is None:
        return None
    return message.time.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(row: dict[str, Any]) -> str:
    head = f"{row['seq']:>6}  {row['time'] or '-':<24}"
    if row.get("malformed"):
        fleet = row["fleet"] or row["subject"]
        return f"{head}  {'MALFORMED':<20}  {fleet:<30}  error: {row['error']}"
    images = ",".join(row["images"]) or "-"
    return f"{head}  {row['event_type']:<20}  {row['fleet']:<30}  {images}"
