"""The startup-taint component: RBAC get/patch on nodes, fenced in by a ValidatingAdmissionPolicy.

The policy's CEL expressions are evaluated here with cel-python on admission requests shaped as
the API server sends them (``request``, ``object``, ``oldObject``; ``variables`` computed first),
so "own node only, gate taint removal only" is tested, not just written down.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pytest
from deploy_support import build_overlay, container, env_value, of_kind, one, pod_spec
from test_deploy_manifests import _role_envvars

SYNCER = "image-syncer-syncer"
ROLE = "image-syncer-node-gate"
POLICY = "image-syncer-startup-taint"
GATE = "image-syncer.octops.io/images-not-ready"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"


@pytest.fixture(scope="module")
def resources(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return build_overlay(
        tmp_path_factory.mktemp("overlay"),
        "resources: [{deploy}/syncer/overlays/containerd]\n"
        "components: [{deploy}/syncer/components/startup-taint]\n",
    )


def test_every_object_validates(resources: list[dict[str, Any]]) -> None:
    for resource in resources:
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_syncer_may_get_and_patch_nodes_only(resources: list[dict[str, Any]]) -> None:
    role = one(resources, "ClusterRole", ROLE)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    binding = one(resources, "ClusterRoleBinding", ROLE)
    daemonset = one(resources, "DaemonSet", SYNCER)
    assert binding["roleRef"]["name"] == ROLE
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": SYNCER, "namespace": daemonset["metadata"]["namespace"]}
    ]


def test_syncer_gets_a_token_and_the_flags(resources: list[dict[str, Any]]) -> None:
    daemonset = one(resources, "DaemonSet", SYNCER)
    assert pod_spec(daemonset)["automountServiceAccountToken"] is True
    syncer = container(daemonset, "syncer")
    assert env_value(syncer, "STARTUP_TAINT") == GATE
    assert env_value(syncer, "STARTUP_TAINT_TIMEOUT") == "15m"
    assert env_value(syncer, "CONN_TARGET").startswith("unix://")
    assert not {e["name"] for e in syncer["env"]} - _role_envvars("syncer")
    # The DaemonSet still tolerates every taint: the syncer must run on a gated node.
    assert {"operator": "Exists"} in pod_spec(daemonset)["tolerations"]


def test_the_policy_is_bound_and_denies(resources: list[dict[str, Any]]) -> None:
    policy = one(resources, "ValidatingAdmissionPolicy", POLICY)
    assert policy["spec"]["failurePolicy"] == "Fail"
    binding = one(resources, "ValidatingAdmissionPolicyBinding", POLICY)
    assert binding["spec"] == {"policyName": POLICY, "validationActions": ["Deny"]}
    # The policy's taint and the syncer's flag name the same key.
    assert _variables(policy)["gateTaint"] == f"'{GATE}'"


def test_works_together_with_respect_scheduling(tmp_path: Path) -> None:
    resources = build_overlay(
        tmp_path,
        "resources: [{deploy}/syncer/overlays/containerd]\n"
        "components:\n"
        "  - {deploy}/syncer/components/respect-scheduling\n"
        "  - {deploy}/syncer/components/startup-taint\n",
    )
    syncer = container(one(resources, "DaemonSet", SYNCER), "syncer")
    assert env_value(syncer, "RESPECT_SCHEDULING") == "true"
    assert env_value(syncer, "STARTUP_TAINT") == GATE
    assert len(of_kind(resources, "ValidatingAdmissionPolicy")) == 1


# --- The CEL expressions on sample admission requests ------------------------------------------


def _variables(policy: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["expression"] for v in policy["spec"]["variables"]}


class Policy:
    """A ValidatingAdmissionPolicy evaluated the way the API server does, with cel-python."""

    def __init__(self, policy: dict[str, Any]) -> None:
        self.env = celpy.Environment()
        spec = policy["spec"]
        self.conditions = [self._compile(c["expression"]) for c in spec["matchConditions"]]
        self.variables = [(v["name"], self._compile(v["expression"])) for v in spec["variables"]]
        self.validations = [
            (self._compile(v["expression"]), self._message(v)) for v in spec["validations"]
        ]

    def _message(self, validation: dict[str, Any]) -> Any:
        if "message" in validation:
            return validation["message"]
        return self._compile(validation["messageExpression"])

    def _compile(self, expression: str) -> Any:
        return self.env.program(self.env.compile(expression))

    def admit(self, request: dict[str, Any], obj: dict[str, Any], old: dict[str, Any]) -> list[str]:
        """The messages of the failed validations: empty means allowed."""
        activation: dict[str, Any] = {
            "request": celpy.json_to_cel(request),
            "object": celpy.json_to_cel(obj),
            "oldObject": celpy.json_to_cel(old),
        }
        if not all(bool(c.evaluate(activation)) for c in self.conditions):
            return []  # the policy does not apply to this request
        variables: dict[str, Any] = {}
        for name, program in self.variables:
            variables[name] = program.evaluate({**activation, "variables": variables})
        activation["variables"] = celpy.celtypes.MapType(
            {celpy.celtypes.StringType(k): v for k, v in variables.items()}
        )
        return [
            message if isinstance(message, str) else str(message.evaluate(activation))
            for program, message in self.validations
            if not program.evaluate(activation)
        ]


@pytest.fixture(scope="module")
def policy(resources: list[dict[str, Any]]) -> Policy:
    return Policy(one(resources, "ValidatingAdmissionPolicy", POLICY))


def syncer_request(
    node: str | None,
    *,
    username: str = f"system:serviceaccount:image-syncer:{SYNCER}",
    sub: str = "",
) -> dict[str, Any]:
    extra = {NODE_NAME_EXTRA: [node], "authentication.kubernetes.io/pod-name": [f"{SYNCER}-x7k2p"]}
    return {
        "operation": "UPDATE",
        "subResource": sub,
        "userInfo": {
            "username": username,
            "groups": [
                "system:serviceaccounts",
                "system:serviceaccounts:image-syncer",
                "system:authenticated",
            ],
            "extra": extra if node is not None else {},
        },
    }


GATE_TAINT = {"key": GATE, "effect": "NoSchedule"}
OTHER = {"key": "dedicated", "value": "gameservers", "effect": "NoSchedule"}


def a_node(name: str = "pool-a-1", taints: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "resourceVersion": "4711",
            "labels": {
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "c5.xlarge",
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {
            "podCIDR": "10.4.1.0/24",
            "podCIDRs": ["10.4.1.0/24"],
            "providerID": "aws:///eu-west-1a/i-0abc",
            "taints": [OTHER, GATE_TAINT] if taints is None else taints,
        },
    }


def without_gate(node: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(node)
    changed["spec"]["taints"] = [t for t in changed["spec"]["taints"] if t["key"] != GATE]
    return changed


def test_allowed_own_node_gate_taint_removed(policy: Policy) -> None:
    old = a_node()
    assert policy.admit(syncer_request("pool-a-1"), without_gate(old), old) == []


def test_allowed_last_taint_removed_leaves_no_taint_list(policy: Policy) -> None:
    old = a_node(taints=[GATE_TAINT])
    new = copy.deepcopy(old)
    del new["spec"]["taints"]
    assert policy.admit(syncer_request("pool-a-1"), new, old) == []


def test_refused_another_node(policy: Policy) -> None:
    old = a_node("pool-a-2")
    assert policy.admit(syncer_request("pool-a-1"), without_gate(old), old) == [
        "the image-syncer syncer may change only the Node it runs on"
    ]


def test_refused_a_token_without_a_node(policy: Policy) -> None:
    old = a_node()
    assert policy.admit(syncer_request(None), without_gate(old), old)


def test_refused_another_taint_removed(policy: Policy) -> None:
    old = a_node()
    new = copy.deepcopy(old)
    new["spec"]["taints"] = [GATE_TAINT]
    assert policy.admit(syncer_request("pool-a-1"), new, old) == [
        f"the image-syncer syncer may only remove the taint {GATE}"
    ]


def test_refused_a_taint_added(policy: Policy) -> None:
    old = a_node(taints=[OTHER])
    for added in ({"key": "evil", "effect": "NoExecute"}, GATE_TAINT):
        new = copy.deepcopy(old)
        new["spec"]["taints"].append(added)
        assert len(policy.admit(syncer_request("pool-a-1"), new, old)) == 1


def test_refused_a_gate_taint_changed_in_place(policy: Policy) -> None:
    old = a_node()
    new = copy.deepcopy(old)
    new["spec"]["taints"][1] = {"key": GATE, "effect": "PreferNoSchedule"}
    assert policy.admit(syncer_request("pool-a-1"), new, old)


def test_refused_a_label_changed(policy: Policy) -> None:
    old = a_node()
    new = without_gate(old)
    new["metadata"]["labels"]["kubernetes.io/arch"] = "arm64"
    assert policy.admit(syncer_request("pool-a-1"), new, old) == [
        "the image-syncer syncer may not change a Node's labels or annotations"
    ]
    new = without_gate(old)
    new["metadata"]["labels"]["added"] = "x"
    assert policy.admit(syncer_request("pool-a-1"), new, old)


def test_refused_a_spec_field_changed(policy: Policy) -> None:
    old = a_node()
    for field, value in (("unschedulable", True), ("podCIDR", "10.9.9.0/24"), ("providerID", "x")):
        new = without_gate(old)
        new["spec"][field] = value
        assert policy.admit(syncer_request("pool-a-1"), new, old) == [
            "the image-syncer syncer may change no Node spec field but its startup taint"
        ], field


def test_refused_status_writes(policy: Policy) -> None:
    old = a_node()
    assert policy.admit(syncer_request("pool-a-1", sub="status"), old, old)


def test_other_users_are_not_matched(policy: Policy) -> None:
    old = a_node()
    new = copy.deepcopy(old)
    new["metadata"]["labels"]["changed"] = "by-kubectl"
    admin = syncer_request(None, username="kubernetes-admin")
    node_controller = syncer_request(
        None, username="system:serviceaccount:kube-system:node-controller"
    )
    assert policy.admit(admin, new, old) == []
    assert policy.admit(node_controller, new, old) == []
