"""The agones-sdk-sidecar component: the broadcaster may read agones-controller, and nothing else."""

from __future__ import annotations

import pytest
from support.deploy import SYNCER_OVERLAYS, build, container, env_value, of_kind, one, role_envvars

BROADCASTER = "image-syncer-broadcaster"
ROLE = "image-syncer-sdk-sidecar"


@pytest.mark.parametrize("name", list(SYNCER_OVERLAYS))
def test_every_overlay_follows_the_sidecar_with_one_read(name: str) -> None:
    resources = build(name)
    role = one(resources, "Role", ROLE)
    assert role["metadata"]["namespace"] == "agones-system"
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": ["agones-controller"],
            "verbs": ["get"],
        }
    ]
    # The only Role the broadcaster is bound to.
    bound = [
        b["roleRef"]["name"]
        for b in of_kind(resources, "RoleBinding")
        if any(s["name"] == BROADCASTER for s in b["subjects"])
    ]
    assert bound == [ROLE]
    binding = one(resources, "RoleBinding", ROLE)
    deployment = one(resources, "Deployment", BROADCASTER)
    assert binding["metadata"]["namespace"] == "agones-system"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": ROLE,
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": BROADCASTER,
            "namespace": deployment["metadata"]["namespace"],
        }
    ]
    broadcaster = container(deployment, "broadcaster")
    assert env_value(broadcaster, "AGONES_NAMESPACE") == "agones-system"
    assert {"AGONES_NAMESPACE", "SIDECAR_REFRESH"} <= role_envvars("broadcaster")


def test_the_base_alone_does_not_follow_it() -> None:
    broadcaster = container(one(build("syncer/base"), "Deployment", BROADCASTER), "broadcaster")
    assert env_value(broadcaster, "AGONES_NAMESPACE") == ""
