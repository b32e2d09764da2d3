"""Command: ``crio-pinned-config``, CRI-O's ``pinned_images`` drop-in for the Fleets on the log.

CRI-O pins images by configuration only (see :mod:`syncer.keeping.criopins`), so the syncer cannot
pin on CRI-O nodes by itself; this prints the drop-in for the images of every live Fleet the syncers
would admit (same ``--fleet-selector`` and opt-out annotation), the images every node keeps
besides (the node-images stream: the Agones SDK sidecar), plus ``--extra-image``.
"""

import json
from typing import Annotated

import typer

from image_syncer.fleetlog import read_fleets
from image_syncer.oneshot import CommandError, fail, jetstream, run_nats_command
from image_syncer.options import DEFAULT_PREFIX, PrefixOption, split_values, with_nats_options
from syncer.folding.filtering import FleetFilter, SelectorError
from syncer.folding.references import InvalidImageReference, normalize
from syncer.keeping.criopins import pinned_images_dropin
from wire.contract import Action, Fleet, Kind, check_prefix, images_of
from wire.eventlog import read_node_images, stream_name
from wire.natsconn import NatsSettings

__all__ = ["register"]


async def _log_images(
    nats: NatsSettings, prefix: str, fleet_filter: FleetFilter
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(Fleet -> images, node-image source -> images) as the syncers would keep them."""
    async with jetstream(nats, "image-syncer-crio-pinned-config") as js:
        newest = await read_fleets(js, prefix)
        node_images = await read_node_images(js, prefix)
    if newest is None:
        raise CommandError(f"stream {stream_name(prefix, Kind.FLEET)} does not exist")
    images: dict[str, list[str]] = {}
    for fleet, (_, event) in sorted(newest.items()):
        obj = event.obj
        if event.action is Action.DELETED or not isinstance(obj, Fleet):
            continue
        if not fleet_filter.admits(obj)[0]:
            continue
        images[fleet] = [ref for _, image in images_of(obj) if (ref := _normal(image))]
    by_source = {
        source: [ref for image in message.images if (ref := _normal(image))]
        for source, message in sorted(node_images.items())
    }
    return images, by_source


def _normal(image: str) -> str:
    try:
        return str(normalize(image))
    except InvalidImageReference:
        return ""  # the syncers skip it too


@with_nats_options
def crio_pinned_config(
    nats: NatsSettings,
    fleet_selector: Annotated[
        str,
        typer.Option(
            envvar="FLEET_SELECTOR", help="Only Fleets whose labels match, as the syncers do."
        ),
    ] = "",
    extra_image: Annotated[
        list[str],
        typer.Option(
            envvar="EXTRA_IMAGES",
            help="Pin this image too (repeatable, comma-separated), e.g. the pause image.",
        ),
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    as_json: Annotated[
        bool, typer.Option("--json", help="The images per Fleet as JSON instead of TOML.")
    ] = False,
    subject_prefix: PrefixOption = DEFAULT_PREFIX,
) -> None:
    """Print CRI-O's pinned_images drop-in for the images of the Fleets on the event log."""
    try:
        check_prefix(subject_prefix)
        fleet_filter = FleetFilter.parse(fleet_selector)
        extra = [str(normalize(image)) for image in split_values(extra_image)]
    except (SelectorError, InvalidImageReference, ValueError) as e:
        fail(str(e), code=2)
    by_fleet, by_source = run_nats_command(_log_images(nats, subject_prefix, fleet_filter))
    if as_json:
        doc = {"fleets": by_fleet, "node_images": by_source, "extra": extra}
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    images = [i for fleet_images in by_fleet.values() for i in fleet_images]
    images += [i for source_images in by_source.values() for i in source_images] + extra
    source = f"{len(by_fleet)} Fleet(s) of stream {stream_name(subject_prefix, Kind.FLEET)}"
    typer.echo(pinned_images_dropin(images, source=source), nl=False)


def register(app: typer.Typer) -> None:
    """Add ``crio-pinned-config`` to the root app."""
    app.command("crio-pinned-config")(crio_pinned_config)
