"""``wait`` and a Fleet's next images: ``--fleet`` counts them, ``--next`` waits for them alone,
``--min-ready`` is done with a share of the targeted nodes and names the rest.

Like test_cli_status.py: the commands run as subprocesses against the real nats-server, the test
plays the syncers through the status contract and the broadcaster through the real event log.
"""

from __future__ import annotations

from typing import Any

from nats.js import JetStreamContext
from support.fleetdicts import fleet
from support.status_harness import FLEET, IMAGES, cli_args, report, run_cli
from support.status_harness import settings_fixture as settings_fixture

from image_syncer.fleetlog import target_of
from image_syncer.sandbox.nats_server import NatsServer
from wire.contract import NEXT_IMAGES_ANNOTATION, decode_event, encode_event
from wire.eventlog import LogSettings, publish_event
from wire.nodestatus import StatusSettings

CURRENT = IMAGES[0]
NEXT = "registry.local/game:2"


def staged_fleet(images: list[str], next_images: str, rv: str = "1") -> dict[str, Any]:
    namespace, _, name = FLEET.partition("/")
    obj = fleet(name, *images, namespace=namespace, rv=rv)
    obj["metadata"]["annotations"] = {NEXT_IMAGES_ANNOTATION: next_images}
    return obj


async def publish_staged(js: JetStreamContext, prefix: str, next_images: str = NEXT) -> int:
    obj = staged_fleet([CURRENT], next_images)
    ack = await publish_event(js, LogSettings(prefix=prefix), "fleet.events.added", obj)
    return ack.seq


def test_the_target_names_the_next_images_as_the_syncer_normalizes_them() -> None:
    obj = staged_fleet([CURRENT], " nginx:2 ,, Not/A:Valid:Ref, registry.local/game:1")
    event = decode_event(encode_event("fleet.events.added", obj))
    target = target_of(FLEET, 7, event)
    assert not isinstance(target, str)
    assert target.next_images == ("docker.io/library/nginx:2", CURRENT)
    # The current image is wanted once, the bad entry not at all (the syncer skips it).
    assert target.images == (CURRENT, "docker.io/library/nginx:2")


async def test_wait_next_waits_for_the_next_images_alone(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    seq = await publish_staged(js, prefix)
    at = {FLEET: seq}
    desired = {FLEET: [CURRENT, NEXT]}
    # node-a holds the next image, its current one still pulling; node-b the other way round.
    await report(
        js, settings, "node-a", desired=desired, present={NEXT}, pulling={CURRENT}, seqs=at
    )
    await report(
        js, settings, "node-b", desired=desired, present={CURRENT}, pulling={NEXT}, seqs=at
    )
    await report(js, settings, "node-c", desired={}, excluded={FLEET}, seqs=at)  # not targeted
    next_only = cli_args(
        nats_server, prefix, "wait", "--fleet", FLEET, "--next", "--timeout", "500ms"
    )
    code, out, err = await run_cli(*next_only)
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"{FLEET} (event seq {seq}) not ready after 500ms: 1 of 3 live nodes not done "
        "(next images only)",
        f"  {NEXT}: pulling on 1 node (node-b)",
        f"  (each node's full errors: image-syncer status --fleet {FLEET})",
    ]
    await report(js, settings, "node-b", desired=desired, present={CURRENT, NEXT}, seqs=at)
    code, out, err = await run_cli(*next_only)
    assert code == 0, err
    assert out.strip() == (
        f"{FLEET}: next images present on 2 live nodes as of event seq {seq} (1 not targeted)"
    )
    # --fleet alone counts current and next images: node-a still pulls its current one.
    all_images = cli_args(nats_server, prefix, "wait", "--fleet", FLEET, "--timeout", "500ms")
    code, out, err = await run_cli(*all_images)
    assert code == 1
    assert f"  {CURRENT}: pulling on 1 node (node-a)" in err.splitlines()


async def test_wait_next_fails_at_once_when_the_fleet_names_none(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    seq = await publish_staged(js, prefix, next_images=" , ")
    await report(js, settings, "node-a", present=set(IMAGES), seqs={FLEET: seq})
    code, out, err = await run_cli(
        *cli_args(nats_server, prefix, "wait", "--fleet", FLEET, "--next", "--timeout", "1m")
    )
    assert code == 1 and out == ""
    assert err.strip() == (
        f"error: fleet {FLEET} names no next images as of event seq {seq} "
        f"(annotation {NEXT_IMAGES_ANNOTATION})"
    )


async def test_min_ready_is_done_with_a_share_of_the_targeted_nodes_and_names_the_rest(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    seq = await publish_staged(js, prefix)
    at = {FLEET: seq}
    desired = {FLEET: [CURRENT, NEXT]}
    for node in ("node-a", "node-b", "node-c"):
        await report(js, settings, node, desired=desired, present={CURRENT, NEXT}, seqs=at)
    await report(
        js, settings, "node-d", desired=desired, present={CURRENT}, pulling={NEXT}, seqs=at
    )
    await report(js, settings, "node-e", desired={}, excluded={FLEET}, seqs=at)  # not targeted

    def wait(percent: str) -> list[str]:
        return cli_args(
            nats_server, prefix, "wait", "--fleet", FLEET, "--next", "--timeout", "500ms",
            "--min-ready", percent,
        )  # fmt: skip

    code, out, err = await run_cli(*wait("75"))
    assert code == 0, err
    assert out.splitlines() == [
        f"{FLEET}: next images present on 3 of 4 targeted live nodes as of event seq {seq} "
        "(--min-ready 75%); not done:",
        f"  node-d: 0/1 images; missing {NEXT} (pulling)",
    ]
    code, out, err = await run_cli(*wait("80"))
    assert code == 1 and out == ""
    assert err.splitlines()[0] == (
        f"{FLEET} (event seq {seq}) not ready after 500ms: 1 of 5 live nodes not done "
        "(next images only, --min-ready 80%)"
    )


async def test_status_of_one_fleet_shows_its_next_images_apart(
    js: JetStreamContext, nats_server: NatsServer, prefix: str, settings: StatusSettings
) -> None:
    seq = await publish_staged(js, prefix)
    at = {FLEET: seq}
    desired = {FLEET: [CURRENT, NEXT]}
    await report(
        js, settings, "node-a", desired=desired, present={NEXT}, pulling={CURRENT}, seqs=at
    )
    await report(
        js, settings, "node-b", desired=desired, present={CURRENT}, pulling={NEXT}, seqs=at
    )
    code, out, err = await run_cli(*cli_args(nats_server, prefix, "status", "--fleet", FLEET))
    assert code == 0, err
    lines = out.splitlines()
    start = lines.index(f"next images ({NEXT_IMAGES_ANNOTATION}): {NEXT}")
    assert lines[start + 1 :] == [
        "  on 1/2 targeted live nodes",
        f"  node-b: 0/1 images; missing {NEXT} (pulling)",
    ]
