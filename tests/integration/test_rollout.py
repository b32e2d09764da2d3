"""``image-syncer rollout`` end to end: annotate, wait, patch, clear; and each way it can fail.

Real nats-server, containerd and registry; an in-process broadcaster and syncer; the Fleet lives
in the fake API server (the one fake), which the command reaches through the real kubernetes
client with a kubeconfig, as it would reach a cluster.
"""

from __future__ import annotations

import asyncio
import copy
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.js import JetStreamContext
from support.deploy import DEPLOY, build_overlay, container, one
from support.fakekube import FakeKube
from support.fakekube.harness import fleet
from support.faults_harness import (
    InProcessBroadcaster,
    InProcessSyncer,
    broadcaster_settings,
    eventually,
    node_name,
    syncer_settings,
)
from support.syncer_harness import metric, push_tag, unpushed

from image_syncer.sandbox.containerd import Containerd
from wire.contract import NEXT_IMAGES_ANNOTATION
from wire.eventlog import LogSettings
from wire.natsconn import NatsSettings

pytestmark = [pytest.mark.nats, pytest.mark.cri]

FLEET = "default/arena"


@pytest.fixture
async def cluster(
    kube: FakeKube,
    nats_settings: NatsSettings,
    log_settings: LogSettings,
    own_containerd: Containerd,
    prefix: str,
) -> AsyncIterator[InProcessSyncer]:
    """A broadcaster watching the fake API server and one syncer on its own containerd."""
    broadcaster = await InProcessBroadcaster(
        broadcaster_settings(kube, nats_settings, log_settings)
    ).start()
    syncer = await InProcessSyncer(
        syncer_settings(node_name(), own_containerd, nats_settings, prefix), own_containerd
    ).start()
    try:
        yield syncer
    finally:
        await syncer.stop()
        await broadcaster.stop()


async def rollout(
    kube: FakeKube, nats_settings: NatsSettings, prefix: str, *args: str
) -> tuple[int, str, str]:
    """The real command, as a subprocess; (code, stdout, stderr)."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("KUBECONFIG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "image_syncer",
        "rollout",
        *args,
        "--kubeconfig",
        str(kube.kubeconfig),
        "--nats-url",
        nats_settings.servers[0],
        "--subject-prefix",
        prefix,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def stored(kube: FakeKube, name: str = "arena") -> dict[str, Any]:
    obj = kube.get("fleets", "default", name)
    assert obj is not None
    return obj


def image_of(obj: dict[str, Any]) -> str:
    image: str = obj["spec"]["template"]["spec"]["template"]["spec"]["containers"][0]["image"]
    return image


def annotation_of(obj: dict[str, Any]) -> str | None:
    return (obj["metadata"].get("annotations") or {}).get(NEXT_IMAGES_ANNOTATION)


def patches(kube: FakeKube) -> int:
    return sum(1 for kind, path in kube.requests if kind == "PATCH" and "/fleets/" in path)


async def test_rollout_stages_waits_then_moves_and_a_second_run_changes_nothing(
    cluster: InProcessSyncer,
    kube: FakeKube,
    nats_settings: NatsSettings,
    prefix: str,
    push: Any,
) -> None:
    containerd = cluster.containerd
    current, upcoming = push(), unpushed(push, "v2")
    kube.create("fleets", fleet("arena", current))
    await eventually(lambda: current in containerd.image_refs(), "the current image pulled")

    # What the node holds when the Fleet moves; Agones writes the Fleet's status meanwhile, so
    # the move's first attempt meets a 409 and is decided again on the new version.
    held_at_move: list[bool] = []

    def at_stage() -> None:
        kube.before_next_patch(at_move)

    def at_move() -> None:
        held_at_move.append(upcoming in containerd.image_refs())
        obj = stored(kube)
        obj["status"] = {"replicas": 1, "readyReplicas": 1}
        kube.update("fleets", obj)

    kube.before_next_patch(at_stage)
    command = asyncio.create_task(
        rollout(kube, nats_settings, prefix, FLEET, "--image", upcoming, "--timeout", "2m")
    )
    await eventually(lambda: annotation_of(stored(kube)) == upcoming, "the annotation set")
    assert image_of(stored(kube)) == current  # staged, not moved
    push_tag(push, upcoming)  # the build lands in the registry: the node can pull it
    code, out, err = await command
    assert code == 0, err
    assert held_at_move == [True]
    moved = stored(kube)
    assert image_of(moved) == upcoming
    assert annotation_of(moved) is None
    assert moved["status"] == {"replicas": 1, "readyReplicas": 1}  # the other writer's change kept
    assert f"{FLEET}: staged, {NEXT_IMAGES_ANNOTATION}={upcoming}" in out
    assert f"{FLEET}: next images present on 1 live nodes" in out
    assert f"{FLEET}: game {current} -> {upcoming}" in out
    assert f"{FLEET}: next images on 0/1 targeted nodes; slowest {cluster.node}:" in err

    writes = patches(kube)
    code, out, err = await rollout(
        kube, nats_settings, prefix, FLEET, "--image", f"game={upcoming}"
    )
    assert code == 0, err
    assert out.strip() == f"{FLEET}: already at game={upcoming}; nothing to do"
    assert patches(kube) == writes
    assert stored(kube)["metadata"]["resourceVersion"] == moved["metadata"]["resourceVersion"]


async def test_a_timeout_leaves_the_annotation_in_place_and_says_so(
    cluster: InProcessSyncer,
    kube: FakeKube,
    nats_settings: NatsSettings,
    prefix: str,
    push: Any,
) -> None:
    current, never = push(), unpushed(push, "never")
    kube.create("fleets", fleet("arena", current))
    code, _, err = await rollout(
        kube, nats_settings, prefix, FLEET, "--image", never, "--timeout", "5s"
    )
    assert code == 5, err
    assert err.splitlines()[-1] == (
        f"error: {FLEET}: next images not on the targeted nodes within 5s; annotation "
        f"{NEXT_IMAGES_ANNOTATION}={never} left in place (nodes keep pulling; run the same "
        "rollout again to resume)"
    )
    assert f"{cluster.node}: 0/1 images; missing {never}" in err
    obj = stored(kube)
    assert annotation_of(obj) == never and image_of(obj) == current


async def test_each_refusal_has_its_own_line_and_exit_code_and_writes_nothing(
    kube: FakeKube, nats_settings: NatsSettings, prefix: str, js: JetStreamContext
) -> None:
    kube.create("fleets", fleet("arena", "registry.example/game:1"))

    code, out, err = await rollout(
        kube, nats_settings, prefix, FLEET, "--image", "registry.example/game:2", "--dry-run"
    )
    assert code == 0, err
    assert "containers[0] game: registry.example/game:1 -> registry.example/game:2" in out

    code, _, err = await rollout(kube, nats_settings, prefix, "default/nope", "--image", "g:2")
    assert code == 3
    assert err.strip() == (
        'error: fleet default/nope not found (get: fleets.agones.dev "nope" not found)'
    )

    code, _, err = await rollout(kube, nats_settings, prefix, FLEET, "--image", "sidecar=g:2")
    assert code == 2
    assert err.strip() == "error: fleet default/arena has no container 'sidecar' (containers: game)"

    code, _, err = await rollout(kube, nats_settings, prefix, FLEET, "--image", "Not:A:Ref")
    assert code == 2 and err.startswith("error: --image 'Not:A:Ref': invalid image reference")

    kube.forbid("patch", "fleets")
    code, _, err = await rollout(kube, nats_settings, prefix, FLEET, "--image", "g:2")
    assert code == 4
    assert err.strip() == (
        f'error: not allowed to patch fleet {FLEET}: fleets.agones.dev "arena" is forbidden: '
        'User "system:serviceaccount:ci:deployer" cannot patch resource "fleets" in API group '
        '"agones.dev" in the namespace "default"'
    )
    assert patches(kube) == 1  # the refused one
    assert annotation_of(stored(kube)) is None


async def test_someone_else_changing_course_meanwhile_is_not_overwritten(
    cluster: InProcessSyncer,
    kube: FakeKube,
    nats_settings: NatsSettings,
    prefix: str,
    push: Any,
) -> None:
    current, upcoming, other = push(), push(), push()
    kube.create("fleets", fleet("arena", current))

    def at_stage() -> None:
        kube.before_next_patch(another_rollout)

    def another_rollout() -> None:
        obj = stored(kube)
        obj["metadata"]["annotations"] = {NEXT_IMAGES_ANNOTATION: other}
        kube.update("fleets", obj)

    kube.before_next_patch(at_stage)
    code, _, err = await rollout(
        kube, nats_settings, prefix, FLEET, "--image", upcoming, "--timeout", "2m"
    )
    assert code == 6, err
    assert err.splitlines()[-1] == (
        f"error: {FLEET}: annotation {NEXT_IMAGES_ANNOTATION} changed to {other} while waiting; "
        "not moving the Fleet"
    )
    assert image_of(stored(kube)) == current


async def test_the_argo_cd_recipe_works_as_written(
    cluster: InProcessSyncer,
    kube: FakeKube,
    nats_settings: NatsSettings,
    prefix: str,
    push: Any,
    tmp_path: Path,
) -> None:
    """Wave 2's Job, as rendered from a user's copy of deploy/rollout/argocd, then wave 3."""
    containerd = cluster.containerd
    current, upcoming = push(), push()
    recipe = yaml.safe_load((DEPLOY / "rollout/argocd/fleet.yaml").read_text())
    recipe["metadata"]["namespace"] = "default"
    pod = recipe["spec"]["template"]["spec"]["template"]["spec"]
    pod["containers"][0]["image"] = current
    kube.create("fleets", copy.deepcopy(recipe))  # what the last sync applied
    await eventually(lambda: current in containerd.image_refs(), "the current image pulled")

    pod["containers"][0]["image"] = upcoming  # the release: one line of the Fleet's manifest
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "fleet.yaml").write_text(yaml.safe_dump(recipe))
    rendered = build_overlay(
        tmp_path / "app",
        "resources: [fleet.yaml, {deploy}/rollout/job]\n"
        "components: [{deploy}/rollout/from-fleet]\n",
    )
    stage = container(one(rendered, "Job", "image-syncer-stage"), "stage")
    # The Job's own environment, NATS pointed at the test's server (no Secret here).
    env = {e["name"]: e["value"] for e in stage["env"] if "value" in e}
    env.update(NATS_URL=nats_settings.servers[0], SUBJECT_PREFIX=prefix)
    kube.requests.clear()
    code, out, err = await run_job(stage["args"], env, kube)
    assert code == 0, err
    name = recipe["metadata"]["name"]
    assert f"default/{name}: staged on the targeted nodes; not moved (--stage-only)" in out
    assert upcoming in containerd.image_refs()
    staged = stored(kube, name)
    assert image_of(staged) == current and annotation_of(staged) == upcoming
    # Exactly what the recipe's Role allows: get and patch on this one Fleet (the broadcaster's
    # list and watch, and its Events, also in the log, name no Fleet).
    path = f"/apis/agones.dev/v1/namespaces/default/fleets/{name}"
    assert {(kind, p) for kind, p in kube.requests if "/fleets/" in p} == {
        ("GET", path),
        ("PATCH", path),
    }

    # Wave 3: Argo CD applies the manifest; the annotation empties, nothing is pulled.
    pulls = metric("image_syncer_syncer_pulls_total", result="success")
    applied = copy.deepcopy(recipe)
    applied["metadata"]["resourceVersion"] = staged["metadata"]["resourceVersion"]
    kube.update("fleets", applied)
    await eventually(lambda: current not in containerd.image_refs(), "the move folded")
    assert metric("image_syncer_syncer_pulls_total", result="success") == pulls
    assert annotation_of(stored(kube, name)) == ""

    # Every later sync runs the Job again: nothing to do, nothing written.
    kube.requests.clear()
    code, out, err = await run_job(stage["args"], env, kube)
    assert code == 0, err
    assert "nothing to do" in out
    assert not [kind for kind, _ in kube.requests if kind == "PATCH"]


async def run_job(args: list[str], env: dict[str, str], kube: FakeKube) -> tuple[int, str, str]:
    """The Job's container: the image's entrypoint is ``image-syncer``; its kubeconfig the fake's."""
    full = {**os.environ, **env, "KUBECONFIG": str(kube.kubeconfig), "NO_COLOR": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "image_syncer",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_kubectl_pipeline_snippet_works_as_written(
    cluster: InProcessSyncer,
    kube: FakeKube,
    nats_settings: NatsSettings,
    prefix: str,
    push: Any,
) -> None:
    current, upcoming = push(), push()
    kube.create("fleets", fleet("arena", current))
    bin_dir = os.path.dirname(sys.executable)  # kubectl and the kubectl-image_syncer plugin
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "KUBECONFIG": str(kube.kubeconfig),
        "NATS_URL": nats_settings.servers[0],
        "SUBJECT_PREFIX": prefix,
        "FLEET": FLEET,
        "IMAGE": upcoming,
        "TIMEOUT": "2m",
    }
    process = await asyncio.create_subprocess_exec(
        "sh",
        str(DEPLOY / "rollout/kubectl/rollout.sh"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    assert f"{FLEET}: game {current} -> {upcoming}" in out.decode()
    assert upcoming in cluster.containerd.image_refs()
    moved = stored(kube)
    assert image_of(moved) == upcoming and annotation_of(moved) is None


async def test_a_fleet_already_moved_loses_only_a_leftover_annotation(
    kube: FakeKube, nats_settings: NatsSettings, prefix: str
) -> None:
    # Moved by hand (or a GitOps sync) after a staged rollout that timed out: the annotation
    # still names the image the Fleet now runs.
    obj = fleet("arena", "registry.example/game:2")
    obj["metadata"]["annotations"] = {NEXT_IMAGES_ANNOTATION: "registry.example/game:2"}
    kube.create("fleets", obj)
    for stage_only in (True, False):
        args = ("--stage-only",) if stage_only else ()
        code, out, err = await rollout(
            kube, nats_settings, prefix, FLEET, "--image", "registry.example/game:2", *args
        )
        assert code == 0, err
        if stage_only:  # the manifest owns the annotation then: left alone
            assert out.strip() == f"{FLEET}: already at registry.example/game:2; nothing to do"
            assert annotation_of(stored(kube)) == "registry.example/game:2"
        else:
            assert out.strip() == (
                f"{FLEET}: already at registry.example/game:2; removed {NEXT_IMAGES_ANNOTATION}"
            )
            assert annotation_of(stored(kube)) is None
            assert image_of(stored(kube)) == "registry.example/game:2"
