"""A running syncer's node status, seen through the real CLI: status, wait and replay.

Real nats-server, containerd and docker-registry; the syncer runs in-process (its log records
are the observable of a replay), the CLI as a subprocess, as an operator or a CD pipeline runs it.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from nats.js import JetStreamContext
from support.polling import eventually as _until
from support.syncer_harness import (  # noqa: F401  (fixtures)
    RunningSyncer,
    cli,
    eventually,
    fleet,
    info_logs_fixture,
    logged,
    norm,
    override,
    settings_fixture,
    status_json,
)

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.registry import Registry
from syncer.settings import SyncerSettings
from wire.contract import Kind, subject_for
from wire.eventlog import LogSettings, publish_event, stream_name
from wire.nodestatus import (
    StatusSettings,
    get_status,
    open_status_bucket,
    replay_key,
    request_replay,
)

pytestmark = [pytest.mark.nats, pytest.mark.cri]


async def _until_status(
    settings: SyncerSettings, check: Callable[[dict[str, Any]], object], what: str
) -> dict[str, Any]:
    """Poll ``status --json`` until ``check`` holds on it; the document that passed."""
    last: dict[str, Any] = {}

    async def holds() -> bool:
        nonlocal last
        last = await status_json(settings)
        return bool(check(last))

    await _until(holds, lambda: f"{what}; last: {last}")
    return last


def _summary(doc: dict[str, Any], node: str) -> dict[str, Any]:
    result: dict[str, Any] = doc["nodes"].get(node, {}).get("status", {}).get("summary", {})
    return result


def _ready(doc: dict[str, Any], node: str, fleet: str) -> bool:
    summary = _summary(doc, node)
    return fleet in summary.get("fleets", {}) and fleet not in summary.get("gaps", {})


async def test_running_syncer_appears_in_status_with_the_fleets_images_present(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
) -> None:
    image, sidecar = push(), push()
    running = await RunningSyncer(settings).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("game", image, sidecar))
        node = settings.node_name

        def complete(doc: dict[str, Any]) -> bool:
            return _ready(doc, node, "default/game")

        doc = await _until_status(settings, complete, "the node reports the Fleet complete")
        summary = _summary(doc, node)
        assert list(summary["fleets"]) == ["default/game"] and not summary.get("gaps")
        assert summary["last_reconcile"]
        assert doc["nodes"][node]["stale"] is False
        assert doc["fleets"]["default/game"]["ready"] == 1
        code, table, err = await cli(settings, "status")
        assert code == 0, err
        row = next(line for line in table.splitlines() if "default/game" in line)
        assert "1/1" in row
    finally:
        assert await running.stop() == 0


async def test_wait_exits_zero_once_a_real_syncer_pulled_the_images(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
) -> None:
    image = push(layer_bytes=512 << 10)
    running = await RunningSyncer(settings).start()
    try:
        # The CD pipeline's order: publish, then wait at once.
        ack = await publish_event(js, log_settings, "fleet.events.added", fleet("rollout", image))
        code, out, err = await cli(
            settings, "wait", "--fleet", "default/rollout", "--timeout", "60s"
        )
        # wait said so because the image really is on the node.
        assert image in containerd.image_refs()
        assert code == 0, err
        assert (
            f"default/rollout: all images present on 1 live nodes as of event seq {ack.seq}" in out
        )
        doc = await status_json(settings)
        assert _summary(doc, settings.node_name)["fleets"] == {"default/rollout": ack.seq}

        deleted = await publish_event(
            js, log_settings, "fleet.events.deleted", fleet("rollout", image, rv="2")
        )
        code, out, err = await cli(settings, "wait", "--fleet", "default/rollout")
        assert (code, out) == (1, "")
        assert err == (
            f"error: fleet default/rollout was deleted (event seq {deleted.seq}): "
            "there is nothing to wait for\n"
        )
        code, out, err = await cli(settings, "wait", "--fleet", "default/never-published")
        assert (code, out) == (1, "")
        assert err.startswith("error: fleet default/never-published is not in the event log")
        assert err.count("\n") == 1
    finally:
        assert await running.stop() == 0


async def test_wait_right_after_an_update_waits_for_the_new_version_not_the_old_entry(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    registry: Registry,
    containerd: Containerd,
) -> None:
    # Status written at most every 3s: for seconds after publishing v2 the node's entry still
    # speaks of v1, all present, which a wait that ignored sequences took for "done".
    settings = override(settings, status_interval=3.0)
    status_settings = StatusSettings(prefix=settings.subject_prefix)
    v1_image = push()
    # v2's new image is not in the registry yet: nothing can make it present before we push it.
    late = f"test/late-{uuid.uuid4().hex[:8]}"
    new_image = f"{registry.address}/{late}:v1"
    running = await RunningSyncer(settings).start()
    node = settings.node_name
    try:
        v1 = fleet("rollout", v1_image)
        await publish_event(js, log_settings, "fleet.events.added", v1)

        def v1_done(doc: dict[str, Any]) -> bool:
            return _ready(doc, node, "default/rollout")

        await _until_status(settings, v1_done, "v1 present on the node")
        v2 = fleet("rollout", v1_image, new_image, rv="2")
        ack = await publish_event(js, log_settings, "fleet.events.updated", v2, v1)
        waiter = asyncio.create_task(
            cli(settings, "wait", "--fleet", "default/rollout", "--timeout", "60s")
        )
        kv = await open_status_bucket(js, status_settings)
        assert kv is not None

        async def v2_failing() -> bool:
            status = await get_status(kv, node)
            assert status is not None
            summary = status.summary
            why = summary.missing.get(norm(new_image))
            return summary.fleets.get("default/rollout") == ack.seq and bool(why and why.error)

        await _until(v2_failing, "the node folded v2 and failed to pull the missing image")
        assert not waiter.done(), "wait returned while the new image cannot be on the node"
        assert push(late) == new_image
        code, out, err = await waiter
        present_when_wait_returned = containerd.image_refs()
        assert code == 0, err
        assert new_image in present_when_wait_returned
        assert f"as of event seq {ack.seq}" in out
    finally:
        assert await running.stop() == 0


async def test_wait_times_out_naming_the_node_that_cannot_pull(
    settings: SyncerSettings, js: JetStreamContext, log_settings: LogSettings, registry: Registry
) -> None:
    missing = f"{registry.address}/test/never-pushed-{uuid.uuid4().hex[:8]}:v1"
    running = await RunningSyncer(settings).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("broken", missing))

        def failed(doc: dict[str, Any]) -> bool:
            why = _summary(doc, settings.node_name).get("missing", {}).get(norm(missing), {})
            result: bool = why.get("state") == "failed"
            return result

        await _until_status(settings, failed, "the failure reaches the node status")
        code, out, err = await cli(settings, "wait", "--fleet", "default/broken", "--timeout", "2s")
        assert code == 1, out + err
        assert "default/broken (event seq " in err
        assert "not ready after 2s: 1 of 1 live nodes not done" in err
        line = next(line for line in err.splitlines() if settings.node_name in line)
        # The image is retried all along: read between two pulls or during one, it is the image
        # that cannot be pulled, with the registry's answer in a word, grouped by image.
        assert line == f"  {norm(missing)}: not found on 1 node ({settings.node_name})", line
    finally:
        assert await running.stop() == 0


async def test_replay_command_makes_a_running_syncer_rebuild_from_the_log(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    kept, purged = push(), push()
    running = await RunningSyncer(settings).start()
    node = settings.node_name
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("kept", kept))
        await publish_event(js, log_settings, "fleet.events.added", fleet("purged", purged))

        def both(doc: dict[str, Any]) -> bool:
            desired = _summary(doc, node).get("fleets")
            return bool(desired) and {"default/kept", "default/purged"} <= set(desired or ())

        await _until_status(settings, both, "both Fleets desired")
        # Behind the syncer's back: the Fleet's message vanishes from the stream (no event).
        stream = stream_name(log_settings.prefix, Kind.FLEET)
        subject = subject_for(log_settings.prefix, "fleet.events.added", "default", "purged")
        await js.purge_stream(stream, subject=subject)

        code, out, err = await cli(settings, "replay", "--node", node)
        assert code == 0, err
        request = re.search(r"request=(\w+)", out).group(1)  # type: ignore[union-attr]
        await eventually(
            lambda: logged(caplog, "replaying the whole log on request", request=request),
            "the running syncer heard the request",
        )

        def rebuilt(doc: dict[str, Any]) -> bool:
            return _summary(doc, node).get("replayed_request") == request

        doc = await _until_status(settings, rebuilt, "the node reports the replay done")
        assert set(_summary(doc, node)["fleets"]) == {"default/kept"}
        assert logged(caplog, "desired state rebuilt from the whole log")
        kv = await open_status_bucket(js, StatusSettings(prefix=settings.subject_prefix))
        assert kv is not None
        keys = await kv.keys()
        assert replay_key(node) not in keys, "the honoured request is deleted"
        # The live consumer still follows the log after the rebuild.
        later = push()
        await publish_event(js, log_settings, "fleet.events.added", fleet("later", later))

        def follows(doc: dict[str, Any]) -> bool:
            return "default/later" in _summary(doc, node)["fleets"]

        await _until_status(settings, follows, "events after the rebuild are folded")
    finally:
        assert await running.stop() == 0


async def test_replay_requested_while_stopped_is_honoured_at_start(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    status_settings = StatusSettings(prefix=settings.subject_prefix)
    request = await request_replay(js, status_settings, settings.node_name, requested_by="test")
    await publish_event(js, log_settings, "fleet.events.added", fleet("early", push()))
    running = await RunningSyncer(settings).start()
    try:
        await eventually(
            lambda: logged(
                caplog, "replay requested, honoured by the start-up replay", request=request.id
            ),
            "the pending request is seen at start",
        )

        def done(doc: dict[str, Any]) -> bool:
            return _summary(doc, settings.node_name).get("replayed_request") == request.id

        await _until_status(settings, done, "the status names the honoured request")
        kv = await open_status_bucket(js, status_settings)
        assert kv is not None
        assert replay_key(settings.node_name) not in await kv.keys()
        assert not logged(caplog, "replaying the whole log on request")
    finally:
        assert await running.stop() == 0
