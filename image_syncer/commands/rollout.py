"""Command: ``rollout NAMESPACE/NAME --image [CONTAINER=]IMAGE``, the new version staged first.

Agones replaces game servers as soon as a Fleet's image changes, and the syncers learn of the
new image at that same moment: the first new game servers wait for the pull. ``rollout`` turns
that around, through the Kubernetes API (:mod:`image_syncer.fleetpatch`):

1. stage: annotate the Fleet with ``image-syncer.octops.io/next-images``; the broadcaster
   publishes it, every syncer the Fleet targets pulls the next images next to the current ones;
2. wait: until the event log has the annotated version and the next images are on the targeted
   live nodes (``wait --next``'s judgement, :func:`image_syncer.commands.wait.follow`), with
   progress on stderr: nodes ready / targeted, the slowest and why;
3. move: patch the container image(s) and remove the annotation in one write. Moving pulls
   nothing: the images are there.

Idempotent: run again after any outcome, it picks up where the Fleet is (already staged: waits;
already moved: clears a leftover annotation, or says there is nothing to do). ``--dry-run``
reads and plans, writes nothing. ``--stage-only`` stops after the wait: in a GitOps pipeline the
Fleet's manifest moves the image (and sets the annotation back to empty) in a later sync wave.

Exit codes (one ``error:`` line on stderr for each but 0): 0 done (or nothing to do), 1 NATS or
the API server unreachable, or any other error, 2 bad input (``--image``, the Fleet's containers),
3 Fleet not found, 4 forbidden (RBAC: get and patch on fleets.agones.dev are needed), 5 timed out
(the annotation is left in place, and the line says so: run the same command again to resume),
6 someone else changed the Fleet's annotation or image meanwhile (nothing overwritten).
"""

# No ``from __future__ import annotations``: with_nats_options rebuilds the signature, and typer
# must see the Annotated options as objects, not as strings.
import asyncio
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from nats.js import JetStreamContext

from broadcaster.kubeapi import KubeConfigError, custom_objects_api
from image_syncer.commands.wait import (
    MinReadyOption,
    PollIntervalOption,
    Scope,
    Verdict,
    check_poll_interval,
    follow,
    reader_settings,
)
from image_syncer.fleetlog import newest_event, stream_created, target_of
from image_syncer.fleetpatch import (
    ApiUnavailable,
    BadRollout,
    ConflictingChange,
    FleetApi,
    FleetMissing,
    ImageChange,
    Plan,
    RolloutError,
    TimedOut,
    VersionConflict,
    clear_patch,
    move_patch,
    parse_image_change,
    plan_rollout,
    stage_patch,
)
from image_syncer.oneshot import fail, jetstream, run_nats_command
from image_syncer.options import (
    DEFAULT_PREFIX,
    Duration,
    PrefixOption,
    StaleAfterOption,
    with_nats_options,
)
from image_syncer.statusbucket import status_settings
from ops.durations import format_duration
from syncer.folding.references import normalize
from wire.contract import NEXT_IMAGES_ANNOTATION, parse_next_images
from wire.natsconn import NatsSettings
from wire.nodestatus import DEFAULT_POLL_INTERVAL, StatusError, StatusSettings, parse_fleet
from wire.readiness import FleetTarget

__all__ = ["register"]

# Writes refused with 409 (the Fleet changed between our read and our write: Agones updates a
# Fleet's status all the time) are re-read and decided again, this many times at most.
_ATTEMPTS = 10
# How often the event log is read while the broadcaster has not published the annotation yet.
_LOG_POLL = 0.5


@dataclass(frozen=True)
class _Job:
    fleet: str
    changes: tuple[ImageChange, ...]
    timeout: float
    stale_after: float
    min_ready: float
    dry_run: bool
    stage_only: bool
    ignore_not_found: bool
    nats: NatsSettings
    status: StatusSettings
    poll_interval: float = DEFAULT_POLL_INTERVAL


async def _rollout(job: _Job, api: FleetApi) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + job.timeout
    try:
        first = plan_rollout(job.fleet, await asyncio.to_thread(api.get), job.changes)
    except FleetMissing:
        if not job.ignore_not_found:
            raise
        typer.echo(f"{job.fleet}: not found; nothing to stage (--ignore-not-found)")
        return
    if first.moved:
        await _finish_moved(api, job, first)
        return
    if job.dry_run:
        _show_plan(first)
        return
    staged = await _write(api, job, lambda plan: _decide_stage(plan))
    if staged.moved:  # someone else moved it meanwhile, to the same images: done
        await _finish_moved(api, job, staged)
        return
    typer.echo(f"{job.fleet}: staged, {NEXT_IMAGES_ANNOTATION}={staged.next_images}")
    async with jetstream(reader_settings(job.nats), "image-syncer-rollout") as js:
        target = await _logged_target(js, job, staged, deadline)
        progress = _Progress(job.fleet, sys.stderr)
        scope = Scope(next_only=True, min_ready=job.min_ready)
        try:
            ready = await follow(
                js,
                job.status,
                job.fleet,
                target,
                deadline=deadline,
                timeout=job.timeout,
                stale_after=job.stale_after,
                scope=scope,
                progress=progress,
                poll_interval=job.poll_interval,
            )
        finally:
            progress.close()
    if not ready:
        raise TimedOut(
            f"{job.fleet}: next images not on the targeted nodes within "
            f"{format_duration(job.timeout)}; annotation {NEXT_IMAGES_ANNOTATION}="
            f"{staged.next_images} left in place (nodes keep pulling; run the same rollout "
            "again to resume)"
        )
    if job.stage_only:
        typer.echo(f"{job.fleet}: staged on the targeted nodes; not moved (--stage-only)")
        return
    moved = await _write(api, job, lambda plan: _decide_move(first, plan))
    _show_moved(first, moved)


def _decide_stage(plan: Plan) -> dict[str, Any] | None:
    if plan.moved or plan.staged:
        return None
    return stage_patch(plan)


def _decide_move(first: Plan, plan: Plan) -> list[dict[str, Any]] | None:
    """The move patch for this version of the Fleet, after checking nobody changed course."""
    if not plan.staged:
        if plan.moved:
            return None  # moved by someone else (a GitOps sync) to the same images
        now = plan.annotation or "(none)"
        raise ConflictingChange(
            f"{plan.fleet}: annotation {NEXT_IMAGES_ANNOTATION} changed to {now} while waiting; "
            "not moving the Fleet"
        )
    for name, (_, image, new) in plan.containers.items():
        if image not in (first.containers[name][1], new):
            raise ConflictingChange(
                f"{plan.fleet}: container {name} changed to {image} while waiting; not moving "
                f"it to {new} (annotation {NEXT_IMAGES_ANNOTATION} left in place)"
            )
    return clear_patch(plan) if plan.moved else move_patch(plan)


async def _write(
    api: FleetApi,
    job: _Job,
    decide: Callable[[Plan], dict[str, Any] | list[dict[str, Any]] | None],
) -> Plan:
    """Read, decide, patch on exactly that version; a 409 means read and decide again."""
    for _ in range(_ATTEMPTS):
        plan = plan_rollout(job.fleet, await asyncio.to_thread(api.get), job.changes)
        body = decide(plan)
        if body is None:
            return plan
        try:
            obj = await asyncio.to_thread(api.patch, body)
        except VersionConflict:
            continue
        return plan_rollout(job.fleet, obj, job.changes)
    raise ConflictingChange(
        f"{job.fleet} kept changing under the rollout: {_ATTEMPTS} writes in a row refused "
        "with 409 Conflict"
    )


async def _finish_moved(api: FleetApi, job: _Job, plan: Plan) -> None:
    """The Fleet runs the new images already: clear our leftover annotation, if any."""
    images = ", ".join(str(c) for c in job.changes)
    # --stage-only: the Fleet's manifest owns the annotation (it empties it as it moves).
    if job.stage_only or not (plan.annotation and plan.staged):
        typer.echo(f"{job.fleet}: already at {images}; nothing to do")
        return
    if job.dry_run:
        typer.echo(f"{job.fleet}: already at {images}; would remove {NEXT_IMAGES_ANNOTATION}")
        return
    await _write(api, job, lambda p: clear_patch(p) if p.annotation and p.staged else None)
    typer.echo(f"{job.fleet}: already at {images}; removed {NEXT_IMAGES_ANNOTATION}")


async def _logged_target(
    js: JetStreamContext, job: _Job, plan: Plan, deadline: float
) -> FleetTarget:
    """The Fleet's newest logged event once it names the staged images (the broadcaster's turn)."""
    loop = asyncio.get_running_loop()
    prefix = job.status.prefix
    wanted = {str(normalize(image)) for image in parse_next_images(plan.next_images)}
    while True:
        created = await stream_created(js, prefix)
        newest = await newest_event(js, prefix, job.fleet) or {}
        if job.fleet in newest:
            target = target_of(job.fleet, *newest[job.fleet], stream_created=created)
            if isinstance(target, FleetTarget) and wanted <= set(target.next_images):
                return target
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimedOut(
                f"{job.fleet}: the event log (prefix {prefix}) did not show the staged images "
                f"within {format_duration(job.timeout)}: is the broadcaster running? Annotation "
                f"{NEXT_IMAGES_ANNOTATION}={plan.next_images} left in place"
            )
        await asyncio.sleep(min(_LOG_POLL, remaining))


def _show_plan(plan: Plan) -> None:
    typer.echo(f"{plan.fleet} (resourceVersion {plan.resource_version}), dry run:")
    typer.echo(f"  1. set annotation {NEXT_IMAGES_ANNOTATION}={plan.next_images}")
    typer.echo("  2. wait until the next images are on every targeted live node")
    for name, (index, image, new) in sorted(plan.containers.items()):
        typer.echo(f"  3. containers[{index}] {name}: {image} -> {new}")
    typer.echo(f"     and remove annotation {NEXT_IMAGES_ANNOTATION}")


def _show_moved(first: Plan, moved: Plan) -> None:
    for name, (_, image, new) in sorted(first.containers.items()):
        typer.echo(f"{first.fleet}: {name} {image} -> {new}")
    typer.echo(
        f"{first.fleet}: moved (resourceVersion {moved.resource_version}); "
        f"{NEXT_IMAGES_ANNOTATION} removed"
    )


class _Progress:
    """One line: nodes ready / targeted, the slowest and why; redrawn on a terminal."""

    def __init__(self, fleet: str, stream: TextIO) -> None:
        self.fleet, self.stream = fleet, stream
        self.tty = stream.isatty()
        self.last = ""

    def __call__(self, verdict: Verdict) -> None:
        line = f"{self.fleet}: next images on {verdict.ready}/{verdict.targeted} targeted nodes"
        slowest = verdict.slowest()
        if slowest is not None:
            line += f"; slowest {slowest[0]}: {slowest[1]}"
        if line == self.last:
            return
        self.last = line
        if self.tty:
            width = os.get_terminal_size(self.stream.fileno()).columns
            self.stream.write("\r\x1b[K" + line[: max(width - 1, 20)])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


def _api(kubeconfig: str | None, fleet: str) -> FleetApi:
    # As kubectl: --kubeconfig / KUBECONFIG, else ~/.kube/config, else the pod's service account.
    if not kubeconfig:
        default = Path.home() / ".kube" / "config"
        kubeconfig = str(default) if default.is_file() else None
    try:
        return FleetApi(custom_objects_api(kubeconfig), fleet)
    except KubeConfigError as e:
        raise ApiUnavailable(str(e)) from e


@with_nats_options
def rollout(
    nats: NatsSettings,
    fleet: Annotated[str, typer.Argument(metavar="NAMESPACE/NAME", help="The Fleet.")],
    image: Annotated[
        list[str],
        typer.Option(
            "--image",
            envvar="ROLLOUT_IMAGE",
            metavar="[CONTAINER=]IMAGE",
            help="The new image; CONTAINER defaults to the game server container "
            "(spec.template.spec.container, or the only one). Repeatable.",
        ),
    ],
    timeout: Annotated[
        float, Duration("Give up waiting after this long.", "ROLLOUT_TIMEOUT", "--timeout")
    ] = "30m",  # type: ignore[assignment]
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            envvar="ROLLOUT_DRY_RUN",
            help="Read the Fleet, show the plan, write nothing.",
        ),
    ] = False,
    stage_only: Annotated[
        bool,
        typer.Option(
            "--stage-only",
            envvar="ROLLOUT_STAGE_ONLY",
            help="Stage and wait, leave moving the Fleet to its manifest (GitOps: the "
            "manifest moves it and empties the annotation).",
        ),
    ] = False,
    ignore_not_found: Annotated[
        bool,
        typer.Option(
            "--ignore-not-found",
            envvar="ROLLOUT_IGNORE_NOT_FOUND",
            help="Exit 0 when the Fleet does not exist (yet): a GitOps sync that creates it.",
        ),
    ] = False,
    min_ready: MinReadyOption = 100.0,
    stale_after: StaleAfterOption = "1m",  # type: ignore[assignment]
    poll_interval: PollIntervalOption = "2s",  # type: ignore[assignment]
    kubeconfig: Annotated[
        str | None,
        typer.Option(
            envvar="KUBECONFIG",
            help="kubeconfig file; ~/.kube/config, then in-cluster config when unset.",
        ),
    ] = None,
    subject_prefix: PrefixOption = DEFAULT_PREFIX,
) -> None:
    """Stage the new image on every targeted node, then move the Fleet to it.

    Sets the annotation image-syncer.octops.io/next-images, waits until the targeted live nodes
    hold the image, then patches the Fleet's image and removes the annotation.

    Exit codes: 0 done, 1 unreachable or other error, 2 bad input, 3 Fleet not found, 4
    forbidden, 5 timed out (annotation left in place), 6 changed by someone else meanwhile.
    """
    try:
        fleet = parse_fleet(fleet)
        changes = tuple(parse_image_change(text) for text in image)
    except StatusError as e:
        fail(str(e), code=2)
    except BadRollout as e:
        fail(str(e), code=e.code)
    if not changes:
        fail("give the new image: --image [CONTAINER=]IMAGE", code=2)
    job = _Job(
        fleet=fleet,
        changes=changes,
        timeout=timeout,
        stale_after=stale_after,
        min_ready=min_ready,
        dry_run=dry_run,
        stage_only=stage_only,
        ignore_not_found=ignore_not_found,
        nats=nats,
        status=status_settings(subject_prefix),
        poll_interval=check_poll_interval(poll_interval),
    )
    try:
        api = _api(kubeconfig, fleet)
        try:
            run_nats_command(_rollout(job, api))
        finally:
            api.api.api_client.close()
    except RolloutError as e:
        fail(str(e), code=e.code)


def register(app: typer.Typer) -> None:
    """Add ``rollout`` to the root app."""
    app.command("rollout")(rollout)
