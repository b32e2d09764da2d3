"""Command: ``publish added|updated|deleted``, Fleet events by hand, for testing without a cluster.

Events go through :func:`wire.eventlog.publish_event`, exactly as the broadcaster's do, so what
lands in the log (subject, envelope, Nats-Msg-Id, tombstone TTL, compaction on delete) is what a
real cluster would produce. Every Fleet is built or loaded and checked before the first publish:
a bad document refuses the whole run. Many Fleets (several ``-f``, a directory, stdin) go out
from one process over one connection: 30 Fleets are one CLI start, not 30.
"""

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from image_syncer.fleetlog import ensure_stream_exists
from image_syncer.fleets import FleetError, build_fleet, fleet_key, load_fleets
from image_syncer.oneshot import CommandError, fail, jetstream, run_nats_command
from image_syncer.options import (
    DEFAULT_PREFIX,
    DEFAULT_TOMBSTONE_TTL,
    PrefixOption,
    TombstoneTtlOption,
    with_nats_options,
)
from image_syncer.problems import natural_key
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
        list[str] | None,
        typer.Option(
            "--file",
            "-f",
            metavar="PATH",
            help="Fleet manifests: a YAML file (several documents), a directory (its *.yaml, "
            "*.yml and *.json), or - for stdin; repeatable. All are checked before the first "
            "publish, and published over one connection.",
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
    files: list[str] | None,
    next_images: list[str],
) -> list[dict[str, Any]]:
    if files:
        if name or images or init_images or next_images:
            raise CommandError(
                "-f cannot be combined with --name, --image, --init-image or --next-image"
            )
        return _load_all(files, namespace)
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


# What a directory given to -f contributes: manifests, as kubectl apply -f DIR reads them.
_MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def _load_all(files: list[str], namespace: str | None) -> list[dict[str, Any]]:
    """Every Fleet of every source, checked; a Fleet named twice is refused (which one would
    the log keep?)."""
    fleets: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for source in _sources(files):
        try:
            loaded = load_fleets(_read(source), namespace=namespace)
        except FleetError as e:
            raise FleetError(f"{source}: {e}") from e
        for fleet in loaded:
            key = fleet_key(fleet)
            if key in seen:
                raise CommandError(f"Fleet {key} is in both {seen[key]} and {source}")
            seen[key] = source
            fleets.append(fleet)
    return fleets


def _sources(files: list[str]) -> list[str]:
    """Files as given; a directory's manifests in natural order; ``-`` (stdin) at most once."""
    sources: list[str] = []
    for file in files:
        path = Path(file)
        if file != "-" and path.is_dir():
            found = [str(p) for p in path.iterdir() if p.suffix in _MANIFEST_SUFFIXES]
            if not found:
                raise CommandError(f"{file}: no *.yaml, *.yml or *.json manifest in it")
            sources += sorted(found, key=natural_key)
        else:
            sources.append(file)
    if sources.count("-") > 1:
        raise CommandError("-f - (stdin) can be given once")
    return sources


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
