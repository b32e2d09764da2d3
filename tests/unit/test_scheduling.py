"""Node targeting: a table of real-world pod templates against real-world nodes."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from syncer.folding.scheduling import NodeInfo, Taint, schedulable
from wire.contract import PodSpec

# --- Nodes, as the clouds label and taint them ------------------------------------------------

GKE_DEFAULT = NodeInfo(
    name="gke-prod-default-pool-1a2b3c4d-x1y2",
    labels={
        "cloud.google.com/gke-nodepool": "default-pool",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "node.kubernetes.io/instance-type": "e2-standard-4",
        "topology.kubernetes.io/region": "europe-west1",
        "topology.kubernetes.io/zone": "europe-west1-b",
        "kubernetes.io/hostname": "gke-prod-default-pool-1a2b3c4d-x1y2",
    },
)
GKE_SPOT = NodeInfo(
    name="gke-prod-spot-pool-5e6f-z9",
    labels={
        "cloud.google.com/gke-nodepool": "spot-pool",
        "cloud.google.com/gke-spot": "true",
        "kubernetes.io/arch": "amd64",
        "topology.kubernetes.io/zone": "europe-west1-c",
    },
    taints=(Taint("cloud.google.com/gke-spot", "NoSchedule", "true"),),
)
GKE_ARM = NodeInfo(
    name="gke-prod-t2a-pool-77aa-q1",
    labels={
        "cloud.google.com/gke-nodepool": "t2a-pool",
        "kubernetes.io/arch": "arm64",
        "node.kubernetes.io/instance-type": "t2a-standard-4",
        "topology.kubernetes.io/zone": "us-central1-a",
    },
    # GKE taints Arm nodes so that amd64-only workloads stay away.
    taints=(Taint("kubernetes.io/arch", "NoSchedule", "arm64"),),
)
AGONES_SYSTEM = NodeInfo(
    name="agones-system-1",
    labels={"agones.dev/agones-system": "true", "kubernetes.io/arch": "amd64"},
    taints=(Taint("agones.dev/agones-system", "NoExecute", "true"),),
)
GAMESERVER_POOL = NodeInfo(
    name="gs-pool-3",
    labels={
        "pool": "gameservers",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": "c6i.2xlarge",
        "eks.amazonaws.com/capacityType": "ON_DEMAND",
        "cpu-generation": "6",
    },
    taints=(
        Taint("dedicated", "NoSchedule", "gameservers"),
        Taint("prefer-not", "PreferNoSchedule", "x"),
    ),
)
AKS_SPOT = NodeInfo(
    name="aks-spot-12345678-vmss000000",
    labels={"kubernetes.azure.com/scalesetpriority": "spot", "kubernetes.io/arch": "amd64"},
    taints=(Taint("kubernetes.azure.com/scalesetpriority", "NoSchedule", "spot"),),
)
CORDONED = NodeInfo(
    name="cordoned-1",
    labels={"kubernetes.io/arch": "amd64"},
    taints=(Taint("node.kubernetes.io/unschedulable", "NoSchedule"),),
)
NOT_READY = NodeInfo(
    name="flaky-1",
    labels={"kubernetes.io/arch": "amd64"},
    taints=(Taint("node.kubernetes.io/not-ready", "NoExecute"),),
)

# --- Pod templates, as Fleets write them ------------------------------------------------------


def _pod(**spec: Any) -> PodSpec:
    """A PodSpec decoded from the camelCase JSON a Fleet carries, as the wire contract does."""
    return msgspec.convert({"containers": [{"name": "gs", "image": "x"}], **spec}, PodSpec)


def _required(*terms: dict[str, Any]) -> dict[str, Any]:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}
        }
    }


def _expr(key: str, operator: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": operator, **({"values": list(values)} if values else {})}


PLAIN = _pod()
AMD64_SELECTOR = _pod(nodeSelector={"kubernetes.io/arch": "amd64"})
ARM64_SELECTOR = _pod(nodeSelector={"kubernetes.io/arch": "arm64"})
ARM64_TOLERATING = _pod(
    nodeSelector={"kubernetes.io/arch": "arm64"},
    tolerations=[
        {"key": "kubernetes.io/arch", "operator": "Equal", "value": "arm64", "effect": "NoSchedule"}
    ],
)
MULTI_ARCH = _pod(
    affinity=_required({"matchExpressions": [_expr("kubernetes.io/arch", "In", "amd64", "arm64")]}),
    tolerations=[{"key": "kubernetes.io/arch", "operator": "Exists"}],
)
SPOT_ONLY = _pod(
    nodeSelector={"cloud.google.com/gke-spot": "true"},
    tolerations=[
        {
            "key": "cloud.google.com/gke-spot",
            "operator": "Equal",
            "value": "true",
            "effect": "NoSchedule",
        }
    ],
)
NO_SPOT = _pod(
    affinity=_required({"matchExpressions": [_expr("cloud.google.com/gke-spot", "DoesNotExist")]})
)
ZONES = _pod(
    affinity=_required(
        {
            "matchExpressions": [
                _expr("topology.kubernetes.io/zone", "In", "europe-west1-b", "europe-west1-d")
            ]
        }
    )
)
DEDICATED_POOL = _pod(
    nodeSelector={"pool": "gameservers"},
    tolerations=[
        {"key": "dedicated", "operator": "Equal", "value": "gameservers", "effect": "NoSchedule"}
    ],
)
DEDICATED_WRONG_VALUE = _pod(
    nodeSelector={"pool": "gameservers"},
    tolerations=[{"key": "dedicated", "value": "batch", "effect": "NoSchedule"}],
)
TOLERATE_EVERYTHING = _pod(tolerations=[{"operator": "Exists"}])
TOLERATE_KEY_ANY_EFFECT = _pod(
    tolerations=[{"key": "agones.dev/agones-system", "operator": "Exists"}]
)
TOLERATE_WRONG_EFFECT = _pod(
    tolerations=[{"key": "agones.dev/agones-system", "operator": "Exists", "effect": "NoSchedule"}]
)
NOT_SYSTEM_NODES = _pod(
    affinity=_required({"matchExpressions": [_expr("agones.dev/agones-system", "NotIn", "true")]})
)
# Two ORed terms: the dedicated pool, or any spot node.
POOL_OR_SPOT = _pod(
    affinity=_required(
        {"matchExpressions": [_expr("pool", "In", "gameservers")]},
        {"matchExpressions": [_expr("cloud.google.com/gke-spot", "Exists")]},
    ),
    tolerations=[{"operator": "Exists", "effect": "NoSchedule"}],
)
# ANDed expressions in one term.
NEW_CPUS_ON_DEMAND = _pod(
    affinity=_required(
        {
            "matchExpressions": [
                _expr("cpu-generation", "Gt", "5"),
                _expr("eks.amazonaws.com/capacityType", "In", "ON_DEMAND"),
            ]
        }
    ),
    tolerations=[{"key": "dedicated", "operator": "Exists"}],
)
OLD_CPUS = _pod(
    affinity=_required({"matchExpressions": [_expr("cpu-generation", "Lt", "5")]}),
    tolerations=[{"key": "dedicated", "operator": "Exists"}],
)
PINNED_BY_NAME = _pod(
    affinity=_required(
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gs-pool-3"]}]}
    ),
    tolerations=[{"key": "dedicated", "operator": "Exists"}],
)
EMPTY_TERM = _pod(affinity=_required({}))
PREFERRED_ONLY = _pod(
    affinity={
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [_expr("pool", "In", "x")]}}
            ]
        },
        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": []},
    }
)
AKS_SPOT_TOLERATING = _pod(
    tolerations=[
        {
            "key": "kubernetes.azure.com/scalesetpriority",
            "operator": "Equal",
            "value": "spot",
            "effect": "NoSchedule",
        }
    ]
)

TABLE = [
    # (pod template, node, schedulable, reason fragment)
    (PLAIN, GKE_DEFAULT, True, "schedulable"),
    (PLAIN, GKE_SPOT, False, "taint cloud.google.com/gke-spot=true:NoSchedule"),
    (PLAIN, GKE_ARM, False, "taint kubernetes.io/arch=arm64:NoSchedule"),
    (PLAIN, AGONES_SYSTEM, False, "agones.dev/agones-system=true:NoExecute"),
    (PLAIN, CORDONED, True, "schedulable"),  # a cordon says when, not which Fleets
    (PLAIN, NOT_READY, True, "schedulable"),
    (AMD64_SELECTOR, GKE_DEFAULT, True, "schedulable"),
    (
        AMD64_SELECTOR,
        GKE_ARM,
        False,
        "nodeSelector kubernetes.io/arch=amd64 does not match (node label 'arm64')",
    ),
    (ARM64_SELECTOR, GKE_ARM, False, "taint kubernetes.io/arch=arm64:NoSchedule"),
    (ARM64_SELECTOR, GKE_DEFAULT, False, "nodeSelector kubernetes.io/arch=arm64"),
    (ARM64_TOLERATING, GKE_ARM, True, "schedulable"),
    (MULTI_ARCH, GKE_ARM, True, "schedulable"),
    (MULTI_ARCH, GKE_DEFAULT, True, "schedulable"),
    (SPOT_ONLY, GKE_SPOT, True, "schedulable"),
    (SPOT_ONLY, GKE_DEFAULT, False, "(node label absent)"),
    (NO_SPOT, GKE_DEFAULT, True, "schedulable"),
    (NO_SPOT, GKE_SPOT, False, "required node affinity"),
    (ZONES, GKE_DEFAULT, True, "schedulable"),
    (ZONES, GKE_ARM, False, "required node affinity"),
    (DEDICATED_POOL, GAMESERVER_POOL, True, "schedulable"),  # PreferNoSchedule ignored
    (DEDICATED_POOL, GKE_DEFAULT, False, "nodeSelector pool=gameservers"),
    (DEDICATED_WRONG_VALUE, GAMESERVER_POOL, False, "taint dedicated=gameservers:NoSchedule"),
    (PLAIN, GAMESERVER_POOL, False, "taint dedicated=gameservers:NoSchedule"),
    (TOLERATE_EVERYTHING, AGONES_SYSTEM, True, "schedulable"),
    (TOLERATE_EVERYTHING, CORDONED, True, "schedulable"),
    (TOLERATE_KEY_ANY_EFFECT, AGONES_SYSTEM, True, "schedulable"),
    (TOLERATE_WRONG_EFFECT, AGONES_SYSTEM, False, "NoExecute is not tolerated"),
    (NOT_SYSTEM_NODES, AGONES_SYSTEM, False, "required node affinity"),
    (NOT_SYSTEM_NODES, GKE_DEFAULT, True, "schedulable"),
    (POOL_OR_SPOT, GAMESERVER_POOL, True, "schedulable"),
    (POOL_OR_SPOT, GKE_SPOT, True, "schedulable"),
    (POOL_OR_SPOT, GKE_DEFAULT, False, "required node affinity"),
    (NEW_CPUS_ON_DEMAND, GAMESERVER_POOL, True, "schedulable"),
    (NEW_CPUS_ON_DEMAND, GKE_DEFAULT, False, "required node affinity"),
    (OLD_CPUS, GAMESERVER_POOL, False, "required node affinity"),
    (PINNED_BY_NAME, GAMESERVER_POOL, True, "schedulable"),
    (PINNED_BY_NAME, GKE_DEFAULT, False, "required node affinity"),
    (EMPTY_TERM, GKE_DEFAULT, False, "required node affinity"),
    (PREFERRED_ONLY, GKE_DEFAULT, True, "schedulable"),
    (AKS_SPOT_TOLERATING, AKS_SPOT, True, "schedulable"),
    (PLAIN, AKS_SPOT, False, "kubernetes.azure.com/scalesetpriority=spot:NoSchedule"),
]


@pytest.mark.parametrize(("pod", "node", "expected", "reason"), TABLE)
def test_real_world_shapes(pod: PodSpec, node: NodeInfo, expected: bool, reason: str) -> None:
    ok, why = schedulable(pod, node)
    assert (ok, reason in why) == (expected, True), why


@pytest.mark.parametrize(
    ("operator", "values", "label", "expected"),
    [
        ("Gt", ["5"], "6", True),
        ("Gt", ["5"], "5", False),
        ("Lt", ["5"], "4", True),
        ("Lt", ["5"], "5", False),
        ("Gt", ["5"], "six", False),
        ("Gt", ["5", "7"], "6", False),
        ("Gt", ["5"], None, False),
        ("In", [], "x", False),
        ("NotIn", ["a"], None, True),
        ("Exists", [], "", True),
        ("DoesNotExist", [], "", False),
        ("Bogus", ["x"], "x", False),
    ],
)
def test_operator_edges(
    operator: str, values: list[str], label: str | None, expected: bool
) -> None:
    node = NodeInfo("n", {"k": label} if label is not None else {})
    pod = _pod(
        affinity=_required(
            {"matchExpressions": [{"key": "k", "operator": operator, "values": values}]}
        )
    )
    assert schedulable(pod, node)[0] is expected


def test_match_fields_only_know_the_node_name() -> None:
    pod = _pod(
        affinity=_required(
            {"matchFields": [{"key": "spec.unschedulable", "operator": "In", "values": ["n"]}]}
        )
    )
    assert not schedulable(pod, NodeInfo("n"))[0]
    pod = _pod(
        affinity=_required(
            {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["n"]}]}
        )
    )
    assert not schedulable(pod, NodeInfo("n"))[0]
    assert schedulable(pod, NodeInfo("m"))[0]


def test_unreadable_affinity_is_ignored_with_a_reason() -> None:
    pod = _pod(
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": "oops"}}
    )
    ok, why = schedulable(pod, GKE_DEFAULT)
    assert ok
    assert "unreadable node affinity ignored" in why


def test_a_fleet_from_the_wire_is_judged_by_its_pod_template() -> None:
    from wire.contract import Fleet

    fleet = msgspec.json.decode(
        msgspec.json.encode(
            {
                "metadata": {"name": "arm-fleet"},
                "spec": {
                    "template": {
                        "spec": {
                            "template": {
                                "spec": {
                                    "containers": [{"name": "gs", "image": "game:1"}],
                                    "nodeSelector": {"kubernetes.io/arch": "arm64"},
                                    "tolerations": [
                                        {"key": "kubernetes.io/arch", "operator": "Exists"}
                                    ],
                                }
                            }
                        }
                    }
                },
            }
        ),
        type=Fleet,
    )
    assert schedulable(fleet.pod_spec, GKE_ARM) == (True, "schedulable")
    assert not schedulable(fleet.pod_spec, GKE_DEFAULT)[0]


def test_no_term_matching_is_said_in_one_line() -> None:
    pod = _pod(affinity=_required({"matchExpressions": [_expr("pool", "In", "gameservers")]}))

    assert schedulable(pod, GKE_DEFAULT) == (
        False,
        "required node affinity: no nodeSelectorTerm matches the node",
    )


def test_affinity_without_node_affinity_places_anywhere() -> None:
    # Agones' Packed scheduling writes pod affinity only; that is about pods, not nodes.
    pod = _pod(
        affinity={
            "podAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": {"agones.dev/role": "gameserver"}},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }
                ]
            }
        }
    )

    assert schedulable(pod, GKE_DEFAULT) == (True, "schedulable")


def test_a_toleration_without_an_operator_means_equal() -> None:
    pod = _pod(
        nodeSelector={"pool": "gameservers"},
        tolerations=[{"key": "dedicated", "value": "gameservers", "effect": "NoSchedule"}],
    )
    other_value = _pod(
        nodeSelector={"pool": "gameservers"},
        tolerations=[{"key": "dedicated", "value": "other", "effect": "NoSchedule"}],
    )

    # Written out as an empty string, as the API server also accepts it.
    explicit = _pod(
        nodeSelector={"pool": "gameservers"},
        tolerations=[{"key": "dedicated", "operator": "", "value": "gameservers"}],
    )

    assert schedulable(pod, GAMESERVER_POOL) == (True, "schedulable")
    assert schedulable(explicit, GAMESERVER_POOL) == (True, "schedulable")
    assert not schedulable(other_value, GAMESERVER_POOL)[0]


@pytest.mark.parametrize(
    "key",
    [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
        "node.kubernetes.io/memory-pressure",
        "node.kubernetes.io/disk-pressure",
        "node.kubernetes.io/pid-pressure",
        "node.kubernetes.io/network-unavailable",
        "node.kubernetes.io/unschedulable",
        "node.cloudprovider.kubernetes.io/uninitialized",
    ],
)
@pytest.mark.parametrize("effect", ["NoSchedule", "NoExecute"])
def test_node_state_taints_never_exclude_a_fleet(key: str, effect: str) -> None:
    """Every new Node carries not-ready:NoSchedule (TaintNodesByCondition): read as a decision
    it excluded every Fleet and the startup gate opened on a node with no image (issue 21)."""
    node = NodeInfo("cold-1", {"kubernetes.io/arch": "amd64"}, (Taint(key, effect),))
    assert schedulable(PLAIN, node) == (True, "schedulable")
    with_pool = NodeInfo(
        "cold-2",
        GAMESERVER_POOL.labels,
        (Taint(key, effect), *GAMESERVER_POOL.taints),
    )
    assert schedulable(DEDICATED_POOL, with_pool) == (True, "schedulable")
    # The decisions next to them still count.
    assert not schedulable(PLAIN, with_pool)[0]


def test_decisions_about_the_node_still_exclude() -> None:
    gone = NodeInfo("gone-1", {}, (Taint("node.kubernetes.io/out-of-service", "NoExecute"),))
    assert schedulable(PLAIN, gone) == (
        False,
        "taint node.kubernetes.io/out-of-service:NoExecute is not tolerated",
    )
