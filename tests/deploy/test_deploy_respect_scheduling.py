"""The optional respect-scheduling component: the syncer's RBAC grows by exactly get on nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from support.deploy import build_overlay, container, env_value, of_kind, one, pod_spec, role_envvars

SYNCER = "image-syncer-syncer"
READER = "image-syncer-node-reader"


@pytest.fixture(scope="module")
def resources(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return build_overlay(
        tmp_path_factory.mktemp("overlay"),
        "resources: [{deploy}/syncer/overlays/containerd]\n"
        "components: [{deploy}/syncer/components/respect-scheduling]\n",
    )


def test_every_object_validates(resources: list[dict[str, Any]]) -> None:
    for resource in resources:
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_syncer_may_only_get_nodes(resources: list[dict[str, Any]]) -> None:
    role = one(resources, "ClusterRole", READER)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    binding = one(resources, "ClusterRoleBinding", READER)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": READER,
    }
    daemonset = one(resources, "DaemonSet", SYNCER)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": SYNCER, "namespace": daemonset["metadata"]["namespace"]}
    ]
    # The broadcaster's RBAC is untouched: two roles in all.
    assert sorted(r["metadata"]["name"] for r in of_kind(resources, "ClusterRole")) == [
        "image-syncer-broadcaster",
        READER,
    ]


def test_syncer_gets_a_token_and_the_flag(resources: list[dict[str, Any]]) -> None:
    daemonset = one(resources, "DaemonSet", SYNCER)
    assert pod_spec(daemonset)["automountServiceAccountToken"] is True
    syncer = container(daemonset, "syncer")
    assert env_value(syncer, "RESPECT_SCHEDULING") == "true"
    # Still the base's env (the patch merges, not replaces) and every variable is a CLI flag.
    assert env_value(syncer, "CONN_TARGET").startswith("unix://")
    names = {e["name"] for e in syncer["env"]}
    assert not names - role_envvars("syncer")


def test_base_stays_without_kubernetes_access(tmp_path: Path) -> None:
    resources = build_overlay(tmp_path, "resources: [{deploy}/syncer/overlays/containerd]\n")
    assert not [r for r in of_kind(resources, "ClusterRole") if r["metadata"]["name"] == READER]
    assert pod_spec(one(resources, "DaemonSet", SYNCER))["automountServiceAccountToken"] is False
