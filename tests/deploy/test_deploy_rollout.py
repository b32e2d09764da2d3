"""The GitOps recipes of deploy/rollout, rendered by the real kustomize as Argo CD and Flux would.

What is checked is what the controllers would apply: the staging Job's image, args and env (every
variable one the CLI reads, no literal credential), its least-privilege identity (get and patch on
the one Fleet, in its namespace), Argo CD's waves and hook, Flux's dependsOn, wait and force. That
the Job's rendered command line works against a Fleet is test_rollout.py's
``test_the_argo_cd_recipe_works_as_written``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support.deploy import (
    DEPLOY,
    build,
    build_overlay,
    container,
    env_value,
    of_kind,
    one,
    pod_spec,
    role_envvars,
)

NAMESPACE, FLEET = "game-servers", "simple-game-server"
IMAGE = "us-docker.pkg.dev/agones-images/examples/simple-game-server:1.38"
IDENTITY = "image-syncer-rollout"
JOB = "image-syncer-stage"
ARGS = [
    "rollout",
    f"{NAMESPACE}/{FLEET}",
    f"--image={FLEET}={IMAGE}",
    "--stage-only",
    "--ignore-not-found",
]
WAVE = "argocd.argoproj.io/sync-wave"


def _check_job_and_identity(resources: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> None:
    job = one(resources, "Job", JOB)
    stage = container(job, "stage")
    assert stage["image"] == "image-syncer:0.1.0"
    assert stage["args"] == ARGS
    spec = pod_spec(job)
    assert spec["serviceAccountName"] == IDENTITY
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert stage["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # Every variable is one `image-syncer rollout` reads; credentials only from the Secret.
    env = {e["name"]: e for e in stage["env"]}
    assert not set(env) - role_envvars("rollout")
    for name in ("NATS_USER", "NATS_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "image-syncer-rollout-nats"
    assert env_value(stage, "ROLLOUT_TIMEOUT") == "30m"
    assert not of_kind(resources, "Secret"), "no credential may be committed"

    role = one(resources, "Role", IDENTITY)
    assert role["rules"] == [
        {
            "apiGroups": ["agones.dev"],
            "resources": ["fleets"],
            "resourceNames": [FLEET],
            "verbs": ["get", "patch"],
        }
    ]
    binding = one(resources, "RoleBinding", IDENTITY)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": IDENTITY,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": IDENTITY, "namespace": NAMESPACE}
    ]
    assert not of_kind(resources, "ClusterRole") and not of_kind(resources, "ClusterRoleBinding")
    for obj in (job, role, binding, one(resources, "ServiceAccount", IDENTITY)):
        assert obj["metadata"]["namespace"] == NAMESPACE
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_argo_cd_stages_in_wave_2_and_moves_the_fleet_in_wave_3() -> None:
    resources = build("rollout/argocd")
    _check_job_and_identity(resources)
    job = one(resources, "Job", JOB)
    assert job["metadata"]["annotations"] == {
        "argocd.argoproj.io/hook": "Sync",
        WAVE: "2",
        "argocd.argoproj.io/hook-delete-policy": "BeforeHookCreation",
    }
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        assert one(resources, kind, IDENTITY)["metadata"]["annotations"] == {WAVE: "1"}
    fleet = one(resources, "Fleet", FLEET)
    assert fleet["metadata"]["annotations"] == {
        WAVE: "3",
        # Applying the Fleet empties what the Job staged.
        "image-syncer.octops.io/next-images": "",
    }


def test_a_release_changes_the_fleet_only_and_the_job_follows(tmp_path: Path) -> None:
    # A user's copy of the recipe: their own Fleet, a new image, another container name.
    fleet = yaml.safe_load((DEPLOY / "rollout/argocd/fleet.yaml").read_text())
    fleet["metadata"].update(name="arena", namespace="team-a")
    fleet["spec"]["template"]["spec"]["template"]["spec"]["containers"] = [
        {"name": "game", "image": "registry.example/arena@sha256:" + "a" * 64},
        {"name": "metrics", "image": "registry.example/metrics:3"},
    ]
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    resources = build_overlay(
        tmp_path,
        "resources: [fleet.yaml, {deploy}/rollout/job]\n"
        "components: [{deploy}/rollout/from-fleet]\n",
    )
    stage = container(one(resources, "Job", JOB), "stage")
    assert stage["args"][1:3] == [
        "team-a/arena",
        "--image=game=registry.example/arena@sha256:" + "a" * 64,
    ]
    assert one(resources, "Role", IDENTITY)["rules"][0]["resourceNames"] == ["arena"]
    assert {r["metadata"]["namespace"] for r in resources} == {"team-a"}


def test_flux_applies_the_fleet_only_after_the_stage_job_completed() -> None:
    stage = list(build("rollout/flux/stage"))
    _check_job_and_identity(stage)
    assert not of_kind(stage, "Fleet"), "the stage must not move the Fleet"
    fleet_only = build("rollout/flux/fleet")
    assert [(r["kind"], r["metadata"]["name"]) for r in fleet_only] == [("Fleet", FLEET)]

    docs = list(yaml.safe_load_all((DEPLOY / "rollout/flux/kustomizations.yaml").read_text()))
    by_name = {d["metadata"]["name"]: d for d in docs}
    stage_ks, fleet_ks = by_name[f"{FLEET}-stage"], by_name[f"{FLEET}-fleet"]
    for ks in (stage_ks, fleet_ks):
        assert ks["apiVersion"] == "kustomize.toolkit.fluxcd.io/v1"
        assert (DEPLOY.parent / ks["spec"]["path"]).is_dir()
        assert ks["spec"]["sourceRef"] == stage_ks["spec"]["sourceRef"]
    assert stage_ks["spec"]["path"] == "./deploy/rollout/flux/stage"
    assert fleet_ks["spec"]["path"] == "./deploy/rollout/flux/fleet"
    # Ready only once the Job completed; the Job is replaced when its args change.
    assert stage_ks["spec"]["wait"] is True and stage_ks["spec"]["force"] is True
    assert fleet_ks["spec"]["dependsOn"] == [{"name": f"{FLEET}-stage"}]
    assert _minutes(stage_ks["spec"]["timeout"]) > 30  # longer than the Job's ROLLOUT_TIMEOUT


def _minutes(duration: str) -> int:
    assert duration.endswith("m"), duration
    return int(duration[:-1])


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_the_kubectl_snippet_refuses_to_run_without_its_inputs() -> None:
    script = DEPLOY / "rollout/kubectl/rollout.sh"
    result = subprocess.run(
        ["sh", str(script)], capture_output=True, text=True, env={}, timeout=30, check=False
    )
    assert result.returncode != 0
    assert "set FLEET=NAMESPACE/NAME" in result.stderr


def test_with_the_auth_callout_the_job_logs_in_with_its_own_token(tmp_path: Path) -> None:
    """No static user there: the Job's projected token, for the audience the callout checks,
    and no password left from the Secret."""
    resources = build_overlay(
        tmp_path,
        "resources: [{deploy}/rollout/argocd]\n"
        "components: [{deploy}/rollout/components/auth-callout]\n",
    )
    job = one(resources, "Job", JOB)
    stage = container(job, "stage")
    env = {e["name"]: e for e in stage["env"]}
    assert "NATS_USER" not in env and "NATS_PASSWORD" not in env
    assert not set(env) - role_envvars("rollout")
    path = env_value(stage, "NATS_TOKEN_FILE")
    (mount,) = [m for m in stage["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod_spec(job)["volumes"] if v["name"] == mount["name"]]
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert path == f"{mount['mountPath']}/{token['path']}"
    callout = yaml.safe_load_all((DEPLOY / "syncer/components/auth-callout/auth.yaml").read_text())
    (deployment,) = [d for d in callout if d and d["kind"] == "Deployment"]
    assert token["audience"] == env_value(container(deployment, "auth"), "AUTH_AUDIENCE")
    assert token["expirationSeconds"] <= 3600
    # The identity the callout is told to map to the reader role.
    assert pod_spec(job)["serviceAccountName"] == IDENTITY
    assert one(resources, "Job", JOB)["metadata"]["namespace"] == NAMESPACE
