"""Command: ``publish added|updated|deleted``, Fleet events by hand, for testing without a cluster.

Events go through :func:`wire.eventlog.publish_event`, exactly as the broadcaster's do, so what
lands in the log (subject, envelope, Nats-Msg-Id, tombstone TTL, compaction on delete) is what a
real cluster would produce. Every Fleet is built or loaded and checked before the first publish:
a bad document refuses the whole file.
"""

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from image_syncer.fleetlog import ensure_stream_exists
from image_syncer.fleets import FleetError, build_fleet, load_fleets
from image_syncer.oneshot import CommandError, fail, jetstream, run_nats_command
from image_syncer.options import (
    DEFAULT_PREFIX,
    DEFAULT_TOMBSTONE_TTL,
    PrefixOption,
    TombstoneTtlOption,
    with_nats_options,
)
from wire.contract import Action, ContractError, EventType, Kind, check_prefix, subject_for
from wire.eventlog import LogSettings, publish_event
from wire.natsconn import NatsSettings

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add ``publish`` to the root app."""
    app.command("publish")(publish)


@with_nats_options
def publish(
    nats: NatsSettings,
    action: Annotated[Action, typer.Argument(help="The event to publish.")],
    name: Annotated[
        str | None,
        typer.Option("--name", metavar="NAME", help="Fleet name (builds a Fleet from --image)."),
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option(
            "--namespace",
            "-n",
            metavar="NAMESPACE",
            help="Fleet namespace; with -f, for documents without one.",
        ),
    ] = None,
    image: Annotated[
        list[str] | None,
        typer.Option("--image", metavar="IMAGE", help="A container image (repeatable)."),
    ] = None,
    init_image: Annotated[
        list[str] | None,
        typer.Option("--init-image", metavar="IMAGE", help="An init container image (repeatable)."),
    ] = None,
    next_image: Annotated[
        list[str] | None,
        typer.Option(
            "--next-image",
            metavar="IMAGE",
            help="An image to stage before a rollout: annotation "
            "image-syncer.octops.io/next-images (repeatable).",
        ),
    ] = None,
    replicas: Annotated[int, typer.Option(min=0, help="spec.replicas of a built Fleet.")] = 1,
    resource_version: Annotated[
        str | None,
        typer.Option(
            metavar="RV", help="resourceVersion of a built Fleet (default: new on every publish)."
        ),
    ] = None,
    file: Annotated[
        str | None,
        typer.Option(
            "--file",
            "-f",
            metavar="FILE",
            help="Fleet manifest(s), several YAML documents; - for stdin.",
        ),
    ] = None,
    subject_prefix: PrefixOption = DEFAULT_PREFIX,
    tombstone_ttl: TombstoneTtlOption = DEFAULT_TOMBSTONE_TTL,
) -> None:
    """Publish a Fleet event: a Fleet built around --image, or the Fleets of -f manifests."""
    try:
        check_prefix(subject_prefix)
        fleets = _fleets(
            name,
            namespace,
            image or [],
            init_image or [],
            replicas,
            resource_version,
            file,
            next_image or [],
        )
    except (FleetError, ContractError, CommandError) as e:
        fail(str(e), code=2)
    settings = LogSettings(prefix=subject_prefix, tombstone_ttl=tombstone_ttl)
    event_type = EventType(Kind.FLEET, action)
    run_nats_command(_publish(nats, settings, event_type, fleets))


def _fleets(
    name: str | None,
    namespace: str | None,
    images: list[str],
    init_images: list[str],
    replicas: int,
    resource_version: str | None,
    file: str | None,
    next_images: list[str],
) -> list[dict[str, Any]]:
    if file is not None:
        if name or images or init_images or next_images:
            raise CommandError(
                "-f cannot be combined with --name, --image, --init-image or --next-image"
            )
        return load_fleets(_read(file), namespace=namespace)
    if not name or not images:
        raise CommandError("give --name and at least one --image, or -f FILE")
    return [
        build_fleet(
            name,
            images,
            namespace=namespace or "default",
            init_images=init_images,
            replicas=replicas,
            resource_version=resource_version,
            next_images=next_images,
        )
    ]


def _read(file: str) -> str:
    try:
        return sys.stdin.read() if file == "-" else Path(file).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CommandError(f"cannot read {file}: {e}") from e


async def _publish(
    nats_settings: NatsSettings,
    settings: LogSettings,
    event_type: EventType,
    fleets: list[dict[str, Any]],
) -> None:
    async with jetstream(nats_settings, "image-syncer-publish") as js:
        await ensure_stream_exists(js, settings, Kind.FLEET)
        for fleet in fleets:
            ack = await publish_event(js, settings, event_type, fleet)
            metadata = fleet["metadata"]
            subject = subject_for(
                settings.prefix, event_type, metadata["namespace"], metadata["name"]
            )
            duplicate = " duplicate" if ack.duplicate else ""
            typer.echo(f"{subject} seq={ack.seq}{duplicate}")
