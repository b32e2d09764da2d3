"""Could a game server of this Fleet land on this node? If not, its images need not be here.

With ``--respect-scheduling`` a node pre-pulls a Fleet's images only if the scheduler could place
one of its GameServer pods on it: an arm64 node has no use for an amd64-only Fleet, and a
dedicated game-server pool should not fill the system pool's disks. The checks are the
scheduler's hard filters that depend only on the pod template and the node:

- ``nodeSelector``: every pair must equal a node label;
- required node affinity (``requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms``):
  terms are ORed, the expressions of a term ANDed; ``In``, ``NotIn``, ``Exists``,
  ``DoesNotExist``, ``Gt``, ``Lt`` on labels and ``In``/``NotIn`` on ``metadata.name``;
- taints with effect ``NoSchedule`` or ``NoExecute`` must each be tolerated
  (``PreferNoSchedule`` is a preference, never a reason to skip), except the taints that report
  the node's state rather than decide who runs there (below).

Node state is not a scheduling decision. The node lifecycle controller mirrors conditions into
taints (TaintNodesByCondition, taint-based eviction): ``not-ready`` and ``unreachable`` (both
effects), ``memory-pressure``, ``disk-pressure``, ``pid-pressure``, ``network-unavailable``. The
API server puts ``not-ready:NoSchedule`` on every new Node until its kubelet reports Ready, and
a kubelet with an external cloud provider registers with
``node.cloudprovider.kubernetes.io/uninitialized`` until the cloud controller has seen it. Both
are on every cold node: read as decisions they exclude every Fleet, and the startup gate opens at
once on a node with no image (issue 21); a node briefly NotReady would drop every Fleet. The
cordon taint ``node.kubernetes.io/unschedulable`` mirrors ``spec.unschedulable``: an operator's
decision, but about *when* (a drain, an in-place upgrade), not about *which* Fleets belong here;
excluding on it would remove every image during maintenance and re-pull them while players wait
after the uncordon. None of these exclude a Fleet. Decisions that do (a dedicated pool's taint,
``node.kubernetes.io/out-of-service``, an autoscaler's deletion taint) are judged as any taint.

Resource fit, pod (anti-)affinity and topology spread are left out on purpose: they change from
minute to minute, and a pre-pull wasted on a node that is full right now is cheap, while a missed
one makes players wait.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from wire.contract import PodSpec, Toleration

__all__ = ["NODE_STATE_TAINTS", "NodeInfo", "Taint", "schedulable"]

_HARD_EFFECTS = frozenset({"NoSchedule", "NoExecute"})

# The taints that report node state (see the module docstring): never a reason to exclude.
# Keys: k8s.io/api/core/v1 well_known_taints.go, k8s.io/cloud-provider api/well_known_taints.go.
NODE_STATE_TAINTS = frozenset(
    {
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
        "node.kubernetes.io/memory-pressure",
        "node.kubernetes.io/disk-pressure",
        "node.kubernetes.io/pid-pressure",
        "node.kubernetes.io/network-unavailable",
        "node.kubernetes.io/unschedulable",
        "node.cloudprovider.kubernetes.io/uninitialized",
    }
)


@dataclass(frozen=True)
class Taint:
    key: str
    effect: str
    value: str = ""

    def __str__(self) -> str:
        return (
            f"{self.key}={self.value}:{self.effect}" if self.value else f"{self.key}:{self.effect}"
        )


@dataclass(frozen=True)
class NodeInfo:
    """What scheduling decisions need to know about a node."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()


# --- Required node affinity, typed --------------------------------------------------------------


class _Requirement(msgspec.Struct, rename="camel"):
    key: str
    operator: str
    values: list[str] | None = None


class _Term(msgspec.Struct, rename="camel"):
    match_expressions: list[_Requirement] | None = None
    match_fields: list[_Requirement] | None = None


class _NodeSelector(msgspec.Struct, rename="camel"):
    node_selector_terms: list[_Term] | None = None


class _NodeAffinity(msgspec.Struct, rename="camel"):
    required_during_scheduling_ignored_during_execution: _NodeSelector | None = None


class _Affinity(msgspec.Struct, rename="camel"):
    node_affinity: _NodeAffinity | None = None


def _required_terms(affinity: dict[str, Any] | None) -> list[_Term] | None:
    """The required terms, or None when the pod has no required node affinity."""
    if not affinity:
        return None
    parsed = msgspec.convert(affinity, _Affinity)
    node_affinity = parsed.node_affinity
    required = (
        None
        if node_affinity is None
        else node_affinity.required_during_scheduling_ignored_during_execution
    )
    if required is None:
        return None
    return required.node_selector_terms or []


def _expression_matches(req: _Requirement, value: str | None) -> bool:
    """One requirement against a label (or field) value, None when absent; as apimachinery."""
    values = req.values or []
    match req.operator:
        case "In":
            return value is not None and value in values
        case "NotIn":
            return value is None or value not in values
        case "Exists":
            return value is not None
        case "DoesNotExist":
            return value is None
        case "Gt" | "Lt":
            return value is not None and _compare(req.operator, value, values)
        case _:
            return False


def _compare(operator: str, value: str, values: Sequence[str]) -> bool:
    if len(values) != 1:
        return False
    try:
        have, want = int(value), int(values[0])
    except ValueError:
        return False
    return have > want if operator == "Gt" else have < want


def _term_matches(term: _Term, node: NodeInfo) -> bool:
    expressions = term.match_expressions or []
    fields = term.match_fields or []
    # An empty term selects nothing, as in the scheduler.
    if not expressions and not fields:
        return False
    for req in expressions:
        if not _expression_matches(req, node.labels.get(req.key)):
            return False
    for req in fields:
        if req.key != "metadata.name" or req.operator not in ("In", "NotIn"):
            return False
        if not _expression_matches(req, node.name):
            return False
    return True


# --- Taints and tolerations -----------------------------------------------------------------


def _tolerates(toleration: Toleration, taint: Taint) -> bool:
    """corev1 Toleration.ToleratesTaint."""
    if toleration.effect and toleration.effect != taint.effect:
        return False
    if toleration.key and toleration.key != taint.key:
        return False
    if toleration.operator in ("", "Equal"):
        return toleration.value == taint.value
    return toleration.operator == "Exists"


def _untolerated(tolerations: Sequence[Toleration], taints: Sequence[Taint]) -> Taint | None:
    for taint in taints:
        if taint.effect not in _HARD_EFFECTS or taint.key in NODE_STATE_TAINTS:
            continue
        if not any(_tolerates(t, taint) for t in tolerations):
            return taint
    return None


# --- The decision ---------------------------------------------------------------------------


def schedulable(pod_spec: PodSpec, node: NodeInfo) -> tuple[bool, str]:
    """(could a pod with this spec be scheduled on ``node``, short reason for the log line)."""
    for key, want in (pod_spec.node_selector or {}).items():
        have = node.labels.get(key)
        if have != want:
            found = "absent" if have is None else repr(have)
            return False, f"nodeSelector {key}={want} does not match (node label {found})"
    try:
        terms = _required_terms(pod_spec.affinity)
    except msgspec.ValidationError as e:
        # The API server would not have accepted it; pulling too much beats pulling too little.
        return True, f"schedulable (unreadable node affinity ignored: {e})"
    if terms is not None and not any(_term_matches(t, node) for t in terms):
        return False, "required node affinity: no nodeSelectorTerm matches the node"
    taint = _untolerated(pod_spec.tolerations or (), node.taints)
    if taint is not None:
        return False, f"taint {taint} is not tolerated"
    return True, "schedulable"
