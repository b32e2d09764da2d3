"""Namespaces: who owns them, what Pod Security each enforces, and an install moved elsewhere.

The namespaces belong to neither install (deploy/namespace), so deleting the syncer's overlay
cannot take NATS and its volumes with it. NATS and the broadcaster sit in a namespace that
enforces Pod Security "restricted"; only the syncer, which mounts the runtime's socket
directory, sits in one that allows it. An overlay that moves everything to a namespace of its
own must keep every reference right: objects, role-binding subjects, the NATS URL, the Secret.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.deploy import (
    ALL_BUILDS,
    NATS_BUILDS,
    SYNCER_OVERLAYS,
    build,
    build_dir,
    build_overlay,
    container,
    of_kind,
    one,
    pod_spec,
    resolved_env,
    restricted_violations,
    workloads,
)

from wire.contract import Kind  # noqa: F401  (the CLI's package must import: the env names below)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BROADCASTER, SYNCER = "image-syncer-broadcaster", "image-syncer-syncer"
RESTRICTED, PRIVILEGED = "image-syncer", "image-syncer-node"
AGONES = "agones-system"


def _namespaces() -> dict[str, dict[str, str]]:
    return {
        ns["metadata"]["name"]: ns["metadata"]["labels"]
        for ns in of_kind(build_dir(DEPLOY / "namespace"), "Namespace")
    }


def test_no_install_owns_a_namespace() -> None:
    for name in ALL_BUILDS:
        assert not of_kind(build(name), "Namespace"), f"{name} would delete its namespace"


def test_pod_security_restricted_except_for_the_syncer_namespace() -> None:
    namespaces = _namespaces()
    assert set(namespaces) == {RESTRICTED, PRIVILEGED}
    assert namespaces[RESTRICTED]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespaces[PRIVILEGED]["pod-security.kubernetes.io/enforce"] == "privileged"


@pytest.mark.parametrize("name", list(SYNCER_OVERLAYS))
def test_only_the_syncer_lands_in_the_privileged_namespace(name: str) -> None:
    for resource in build(name):
        namespace = resource["metadata"].get("namespace")
        if namespace is None:
            continue  # cluster-scoped
        if namespace == AGONES and resource["kind"] in ("Role", "RoleBinding"):
            continue  # reading agones-controller's SIDECAR_IMAGE: RBAC where that Deployment is
        expected = PRIVILEGED if resource["metadata"]["name"].startswith(SYNCER) else RESTRICTED
        assert namespace == expected, f"{resource['kind']}/{resource['metadata']['name']}"
    for name_ in NATS_BUILDS:
        assert {
            r["metadata"]["namespace"] for r in build(name_) if "namespace" in r["metadata"]
        } == {RESTRICTED}


@pytest.mark.parametrize("name", ALL_BUILDS)
def test_every_pod_of_the_restricted_namespace_passes_restricted(name: str) -> None:
    for workload in workloads(build(name)):
        if workload["metadata"]["namespace"] == RESTRICTED:
            assert restricted_violations(pod_spec(workload)) == [], workload["metadata"]["name"]


def _nats_host(namespace: str) -> str:
    return f"nats.{namespace}.svc"


@pytest.mark.parametrize("name", list(SYNCER_OVERLAYS))
def test_clients_dial_the_nats_service_by_its_fully_qualified_name(name: str) -> None:
    service = one(build("nats/base"), "Service", "nats")
    host = _nats_host(service["metadata"]["namespace"])
    port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["client"]
    for workload in workloads(build(name)):
        c = pod_spec(workload)["containers"][0]
        assert resolved_env(workload, c, "NATS_URL") == f"nats://{host}:{port}"


MOVED = "games-infra"
# `namespace:` moves every object, the Role that reads agones-controller in agones-system too
# (kustomize applies it after patches), so the move is one level and the patches the next.
MOVE_SYNCER = f"""\
resources: [{{deploy}}/syncer/overlays/containerd]
components: [{{deploy}}/syncer/components/respect-scheduling]
namespace: {MOVED}
"""
PATCH_MOVED = f"""\
resources: [namespaced]
patches:
  - target: {{kind: DaemonSet, name: {SYNCER}}}
    patch: |-
      kind: DaemonSet
      metadata: {{name: {SYNCER}}}
      spec:
        template:
          spec:
            containers:
              - name: syncer
                env: [{{name: NATS_NAMESPACE, value: {MOVED}}}]
  - target: {{kind: "Role|RoleBinding", name: image-syncer-sdk-sidecar}}
    patch: |-
      - op: replace
        path: /metadata/namespace
        value: {AGONES}
  - target: {{kind: RoleBinding, name: image-syncer-sdk-sidecar}}
    patch: |-
      - op: replace
        path: /subjects/0/namespace
        value: {MOVED}
"""


@pytest.fixture(scope="module")
def moved(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The "Another namespace" recipe of docs/install.md: NATS and the image-syncer pods in one
    namespace of the platform team's own."""
    nats = build_overlay(
        tmp_path_factory.mktemp("nats"), f"resources: [{{deploy}}/nats/base]\nnamespace: {MOVED}\n"
    )
    root = tmp_path_factory.mktemp("syncer")
    build_overlay(root / "namespaced", MOVE_SYNCER)
    syncer = build_overlay(root, PATCH_MOVED)
    return nats, syncer


def test_a_moved_install_keeps_every_namespaced_reference(
    moved: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    nats, syncer = moved
    for resource in nats + syncer:
        if resource["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            continue
        # The Role that reads agones-controller's SIDECAR_IMAGE stays where that Deployment is.
        stays = resource["metadata"]["name"] == "image-syncer-sdk-sidecar"
        expected = AGONES if stays else MOVED
        assert resource["metadata"]["namespace"] == expected, resource["metadata"]["name"]
    accounts = {
        a["metadata"]["name"]: a["metadata"]["namespace"] for a in of_kind(syncer, "ServiceAccount")
    }
    for binding in of_kind(syncer, "ClusterRoleBinding") + of_kind(syncer, "RoleBinding"):
        for subject in binding["subjects"]:
            assert accounts[subject["name"]] == subject["namespace"], binding["metadata"]["name"]
    service = one(nats, "Service", "nats")
    for workload in workloads(syncer):
        c = pod_spec(workload)["containers"][0]
        url = resolved_env(workload, c, "NATS_URL")
        assert url.startswith(f"nats://{_nats_host(service['metadata']['namespace'])}:"), url
        secrets = {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        # docs/install.md creates this Secret in the namespace the pods land in.
        assert secrets == {"image-syncer-nats"}
    statefulset = one(nats, "StatefulSet", "nats")
    assert container(statefulset, "nats")  # NATS moved along
