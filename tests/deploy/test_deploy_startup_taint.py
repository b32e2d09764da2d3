"""The startup-taint component: RBAC get/patch on nodes, fenced in by a ValidatingAdmissionPolicy.

The policy's CEL expressions are evaluated here with cel-python on admission requests shaped as
a real API server sends them (``request``, ``object``, ``oldObject``; ``variables`` computed
first; tests/support/kubeshapes.py names the source of each shape), so "own node only, gate taint
removal only" is tested, not just written down. The samples once carried ``"subResource": ""``,
a key the real server leaves out, and the policy's ``request.subResource == ''`` refused every
patch on a real cluster (issue 21): absent keys are now absent here too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from support.celpolicy import Policy
from support.deploy import (
    build_overlay,
    container,
    env_value,
    of_kind,
    one,
    pod_spec,
    role_envvars,
)
from support.kubeshapes import (
    NODE_NAME_EXTRA,
    SYNCER_NS,
    admission_request,
    after_write,
    bound_token_user,
    registered_node,
)

from image_syncer.sandbox.fakekube import AdmissionAttributes, Denial

SYNCER = "image-syncer-syncer"
ROLE = "image-syncer-node-gate"
READ_ROLE = "image-syncer-node-gate-read"
POLICY = "image-syncer-startup-taint"
GATE = "image-syncer.octops.io/images-not-ready"


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


def test_the_component_grants_reading_nodes_only(resources: list[dict[str, Any]]) -> None:
    """Install window (issue 21): a binding applied with the policy is usable seconds before the
    policy is enforced, so the overlay with the component must not let the syncer patch."""
    role = one(resources, "ClusterRole", READ_ROLE)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    granted = [
        (rule["resources"], verb)
        for r in [*of_kind(resources, "ClusterRole"), *of_kind(resources, "Role")]
        for rule in r["rules"]
        for verb in rule["verbs"]
    ]
    assert not [g for g in granted if "nodes" in g[0] and g[1] != "get"]
    _bound_to_the_syncer(one(resources, "ClusterRoleBinding", READ_ROLE), READ_ROLE, resources)


def test_the_second_step_grants_patching_nodes_only(
    resources: list[dict[str, Any]], tmp_path: Path
) -> None:
    second = build_overlay(tmp_path, "resources: [{deploy}/syncer/startup-taint-rbac]\n")
    assert sorted((r["kind"], r["metadata"]["name"]) for r in second) == [
        ("ClusterRole", ROLE),
        ("ClusterRoleBinding", ROLE),
    ]
    for resource in second:
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)
    role = one(second, "ClusterRole", ROLE)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}]
    # Its subject is the syncer of the default overlays, built apart from it.
    _bound_to_the_syncer(one(second, "ClusterRoleBinding", ROLE), ROLE, resources)


def _bound_to_the_syncer(
    binding: dict[str, Any], role: str, resources: list[dict[str, Any]]
) -> None:
    daemonset = one(resources, "DaemonSet", SYNCER)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role,
    }
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
    assert not {e["name"] for e in syncer["env"]} - role_envvars("syncer")
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


# --- The CEL expressions on admission requests shaped as a real API server's ----------------


def _variables(policy: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["expression"] for v in policy["spec"]["variables"]}


@pytest.fixture(scope="module")
def policy(resources: list[dict[str, Any]]) -> Policy:
    return Policy(
        one(resources, "ValidatingAdmissionPolicy", POLICY),
        one(resources, "ValidatingAdmissionPolicyBinding", POLICY),
    )


GATE_TAINT = {"key": GATE, "effect": "NoSchedule"}
OTHER = {"key": "dedicated", "value": "gameservers", "effect": "NoSchedule"}
# TaintNodesByCondition puts this on every new Node until its kubelet reports Ready.
NOT_READY = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}
OWN = "pool-a-1"


def syncer_request(node: str = OWN, *, on: str = OWN, **user: Any) -> dict[str, Any]:
    """The request of the syncer's PATCH of Node ``on``, with a token bound to ``node``."""
    return admission_request(on, bound_token_user(SYNCER_NS, SYNCER, node=node, **user))


def a_node(name: str = OWN, taints: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return registered_node(name, taints=[OTHER, GATE_TAINT] if taints is None else taints)


def written(old: dict[str, Any], change: Any = None, *, remove_gate: bool = True) -> dict[str, Any]:
    """``object`` of the syncer's write: the gate taint gone, ``change`` applied, server fields."""
    new = copy.deepcopy(old)
    if remove_gate:
        taints = new["spec"].get("taints") or []
        new["spec"]["taints"] = [t for t in taints if t["key"] != GATE]
    if change is not None:
        change(new)
    return after_write(old, new, manager="Python-urllib")


def test_the_sample_shapes_are_the_real_servers() -> None:
    """The keys a real API server leaves out are absent here too (see tests/support/kubeshapes.py)."""
    request = syncer_request()
    assert "subResource" not in request and "requestSubResource" not in request
    assert "namespace" not in request  # Nodes are cluster-scoped
    extra = request["userInfo"]["extra"]
    assert sorted(extra) == [
        "authentication.kubernetes.io/credential-id",
        NODE_NAME_EXTRA,
        "authentication.kubernetes.io/node-uid",
        "authentication.kubernetes.io/pod-name",
        "authentication.kubernetes.io/pod-uid",
    ]
    assert all(isinstance(v, list) and len(v) == 1 for v in extra.values())
    assert "extra" not in syncer_request(None)["userInfo"]  # type: ignore[arg-type]
    untainted = registered_node(taints=[])
    assert "taints" not in untainted["spec"] and "generation" not in untainted["metadata"]


def test_allowed_own_node_gate_taint_removed(policy: Policy) -> None:
    old = a_node()
    assert policy.decide(syncer_request(), written(old), old) == []


def test_allowed_next_to_the_condition_taints(policy: Policy) -> None:
    old = a_node(taints=[NOT_READY, GATE_TAINT, OTHER])
    assert policy.decide(syncer_request(), written(old), old) == []


def test_allowed_last_taint_removed_leaves_no_taint_list(policy: Policy) -> None:
    old = a_node(taints=[GATE_TAINT])
    new = written(old)
    assert "taints" not in new["spec"]  # omitempty: what the server hands to admission
    assert policy.decide(syncer_request(), new, old) == []


def test_refused_another_node(policy: Policy) -> None:
    old = a_node("pool-a-2")
    assert policy.admit(syncer_request(on="pool-a-2"), written(old), old) == [
        "the image-syncer syncer may change only the Node it runs on"
    ]


def test_refused_a_token_without_a_node(policy: Policy) -> None:
    old = a_node()
    legacy = syncer_request(None)  # type: ignore[arg-type]  # a Secret-based token: no extra
    assert policy.decide(legacy, written(old), old) == [
        ("the image-syncer syncer may change only the Node it runs on", "Forbidden")
    ]
    pod_bound = syncer_request()
    del pod_bound["userInfo"]["extra"][NODE_NAME_EXTRA]  # a cluster older than 1.30
    assert policy.admit(pod_bound, written(old), old) == [
        "the image-syncer syncer may change only the Node it runs on"
    ]


def test_refused_another_taint_removed(policy: Policy) -> None:
    old = a_node()
    new = written(old, lambda n: n["spec"].update(taints=[]))
    assert policy.admit(syncer_request(), new, old) == [
        f"the image-syncer syncer may only remove the taint {GATE}"
    ]


def test_refused_a_taint_added(policy: Policy) -> None:
    old = a_node(taints=[OTHER])
    for added in ({"key": "evil", "effect": "NoExecute"}, GATE_TAINT):
        new = written(old, lambda n, added=added: n["spec"]["taints"].append(added))
        assert len(policy.admit(syncer_request(), new, old)) == 1


def test_refused_a_gate_taint_changed_in_place(policy: Policy) -> None:
    old = a_node()
    new = written(old, remove_gate=False)
    new["spec"]["taints"][1] = {"key": GATE, "effect": "PreferNoSchedule"}
    assert policy.admit(syncer_request(), new, old)


METADATA = "the image-syncer syncer may not change a Node's metadata"
SPEC = "the image-syncer syncer may change no Node spec field but its startup taint"


@pytest.mark.parametrize(
    ("what", "change"),
    [
        ("a finalizer added", lambda n: n["metadata"].update(finalizers=["example.com/hold"])),
        (
            "an ownerReference added",
            lambda n: n["metadata"].update(
                ownerReferences=[
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "0-0"}
                ]
            ),
        ),
        ("a label changed", lambda n: n["metadata"]["labels"].update({"kubernetes.io/arch": "x"})),
        ("a label added", lambda n: n["metadata"]["labels"].update(added="x")),
        ("the labels removed", lambda n: n["metadata"].pop("labels")),
        ("an annotation added", lambda n: n["metadata"]["annotations"].update(a="b")),
        ("a future metadata field", lambda n: n["metadata"].update(someFutureField="x")),
    ],
)
def test_refused_metadata_changes(policy: Policy, what: str, change: Any) -> None:
    old = a_node()
    refusals = policy.admit(syncer_request(), written(old, change), old)
    assert len(refusals) == 1 and refusals[0].startswith(METADATA), what


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("unschedulable", True),
        ("podCIDR", "10.9.9.0/24"),
        ("podCIDRs", ["10.4.1.0/24", "fd00::/64"]),
        ("providerID", "aws:///eu-west-1a/i-evil"),
        ("configSource", {"configMap": {"name": "k", "namespace": "kube-system"}}),
        ("externalID", "i-0"),
        ("someFutureField", {"enabled": True}),  # a field a later Kubernetes adds
    ],
)
def test_refused_spec_changes(policy: Policy, field: str, value: Any) -> None:
    old = a_node()
    new = written(old, lambda n: n["spec"].update({field: value}))
    assert policy.admit(syncer_request(), new, old) == [SPEC], field
    new = written(old, lambda n: n["spec"].pop("providerID"))
    assert policy.admit(syncer_request(), new, old) == [SPEC]


def test_refused_status_writes(policy: Policy) -> None:
    old = a_node()
    new = written(old, lambda n: n["status"]["conditions"][0].update(status="False"))
    request = syncer_request()
    request["subResource"] = request["requestSubResource"] = "status"
    assert policy.admit(request, new, old) == [
        "the image-syncer syncer may change nothing of a Node but its spec.taints"
    ]


def _paths(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into ``doc``: map keys and list indexes, containers and leaves."""
    found = [path] if path else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, (*path, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += _paths(value, (*path, index))
    return found


def _mutations(node: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """One changed copy per path and kind of change: replaced, removed, a key added."""
    server_set = {"resourceVersion", "managedFields", "generation"}
    out = []
    for path in _paths(node):
        if path == ("metadata",) or (path[0] == "metadata" and path[1] in server_set):
            continue  # no Node without metadata gets to admission; server fields are excluded
        if path[:2] == ("spec", "taints"):
            continue  # the taint list has tests of its own
        for kind in ("replace", "remove", "add"):
            changed = copy.deepcopy(node)
            parent = changed
            for step in path[:-1]:
                parent = parent[step]
            value = parent[path[-1]]
            if kind == "replace":
                parent[path[-1]] = "changed" if value != "changed" else "other"
            elif kind == "remove":
                del parent[path[-1]]
            elif isinstance(value, dict):
                value["addedByTheSyncer"] = "x"
            elif isinstance(value, list):
                value.append("x")
            else:
                continue
            out.append((f"{kind} {'.'.join(map(str, path))}", changed))
    return out


def test_refused_every_other_change_generated(policy: Policy) -> None:
    """Every field of a real Node, replaced, removed or extended, next to the gate removal."""
    old = a_node(taints=[NOT_READY, GATE_TAINT])
    cases = _mutations(written(old))
    touched = {what.split(" ", 1)[1] for what, _ in cases}
    # The generator walked the whole Node: the fields named in issue 21 are among its cases.
    assert {
        "metadata.labels",
        "metadata.annotations",
        "metadata.uid",
        "spec.podCIDR",
        "spec.providerID",
        "status.conditions.0.status",
        "kind",
    } <= touched
    admitted = [
        what
        for what, new in cases
        if not policy.decide(syncer_request(), after_write(old, new, "Python-urllib"), old)
    ]
    assert admitted == []


def test_other_users_are_not_matched(policy: Policy) -> None:
    old = a_node()
    new = written(old, lambda n: n["metadata"]["labels"].update(changed="by-kubectl"))
    admin = admission_request(
        OWN,
        {
            "username": "kubernetes-admin",
            "groups": ["kubeadm:cluster-admins", "system:authenticated"],
        },
    )
    node_controller = admission_request(
        OWN, bound_token_user("kube-system", "node-controller", node=None)
    )
    assert policy.decide(admin, new, old) == []
    assert policy.decide(node_controller, new, old) == []


def test_the_real_text_of_a_refusal(policy: Policy) -> None:
    """The refusal the fake API server sends for the policy, as the real dispatcher words it."""
    old = a_node("pool-a-2")
    attributes = AdmissionAttributes(
        "UPDATE", "nodes", "pool-a-2", bound_token_user(node=OWN), written(old), old
    )
    denial = policy.denial(attributes)
    assert denial == Denial(
        POLICY, POLICY, "the image-syncer syncer may change only the Node it runs on", "Forbidden"
    )


def test_the_install_probe_is_refused_once_the_policy_is_enforced(policy: Policy) -> None:
    """The check docs give before the second step: a server-side dry-run PATCH as the syncer's
    account, authorized through system:masters (impersonation carries no token extras), is
    refused by the policy, and only by it: RBAC lets system:masters through."""
    old = a_node()
    probe = admission_request(
        OWN,
        {
            "username": f"system:serviceaccount:{SYNCER_NS}:{SYNCER}",
            "groups": ["system:masters", "system:authenticated"],
        },
        dry_run=True,
    )
    new = written(old, lambda n: n["metadata"]["labels"].update({"image-syncer-probe": "x"}))
    assert policy.admit(probe, new, old)[0] == (
        "the image-syncer syncer may change only the Node it runs on"
    )
