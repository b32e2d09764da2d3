"""What a real kube-apiserver sends, field for field: the shapes the fakes and samples must have.

Each builder names its source, so the next reader can check it against the real thing:

- ``k8s.io/api/admission/v1`` ``AdmissionRequest`` (types.go): the Go struct behind the CEL
  ``request`` variable. Its JSON tags decide which keys exist: ``subResource``, ``name``,
  ``namespace``, ``requestSubResource`` are ``omitempty`` (a PATCH of a Node has no
  ``subResource`` key at all), ``kind``/``resource`` are always there, ``dryRun`` is a pointer.
- ``k8s.io/apiserver/pkg/admission/plugin/cel/filter.go`` ``CreateAdmissionRequest``: what the
  validating-policy plugin fills in: kind, resource, subResource, requestKind, requestResource,
  requestSubResource, name, namespace, operation, userInfo, ``dryRun`` (always set), ``options``
  (the operation's options: a PATCH arrives as ``UpdateOptions``, ``patchToUpdateOptions`` in
  ``endpoints/handlers/patch.go``); ``object``/``oldObject`` are left out of ``request`` and
  given as variables of their own. The request is turned into a map with
  ``runtime.DefaultUnstructuredConverter``, which honours ``omitempty``: absent keys, not empty
  strings (the reason ``request.subResource`` is an evaluation error on a real server).
- ``k8s.io/api/authentication/v1`` ``UserInfo`` (``uid``, ``groups``, ``extra`` all
  ``omitempty``) and ``pkg/serviceaccount/claims.go`` + ``serviceaccount.go``: a pod-bound token
  of Kubernetes 1.30+ carries ``authentication.kubernetes.io/credential-id`` (``JTI=<jti>``),
  ``node-name``, ``node-uid``, ``pod-name`` and ``pod-uid``, each a one-element list (confirmed on
  a real v1.36 API server, issue 21).
- ``k8s.io/apimachinery/pkg/api/errors`` (``NewNotFound``, ``NewConflict``,
  ``NewAlreadyExists``, ``NewForbidden``, ``NewResourceExpired``, ``NewGenericServerResponse``)
  and ``metav1.Status``: ``kind: Status``, ``apiVersion: v1``, ``metadata: {}``,
  ``status: Failure``, ``message``, ``reason``, ``details`` (``name``, ``group`` omitted when
  empty, ``kind`` = the resource plural, ``causes``), ``code``.
- ``k8s.io/apiserver/pkg/admission/plugin/policy/validating/dispatcher.go``: a
  ValidatingAdmissionPolicy refusal is ``admission.NewForbidden`` re-labelled with the failed
  validation's ``reason`` (no reason, or an evaluation error: ``Invalid``) and ``reasonToCode``
  (Forbidden 403, Unauthorized 401, RequestEntityTooLarge 413, anything else 422); message
  ``<plural> "<name>" is forbidden: ValidatingAdmissionPolicy '<policy>' with binding
  '<binding>' denied request: <message>``, and the same text as the one entry of
  ``details.causes``. An expression that fails to evaluate gives the message
  ``expression '<expression>' resulted in error: <error>`` (``validator.go``).
- ``storage/cacher/watch_cache.go``: a watch from a resourceVersion older than the watch cache is
  answered HTTP 200 and then one ``ERROR`` event carrying ``NewResourceExpired("too old resource
  version: <rv> (<oldest-1>)")`` (410, ``Expired``, no details); ``storage/etcd3/errors.go``: a
  list at an exact, compacted resourceVersion is HTTP 410 ``The resourceVersion for the provided
  list is too old.``
- A Node as ``kubectl get node -o json`` shows one registered by a kubelet: no
  ``metadata.generation`` (the Node strategy never sets it), ``managedFields`` rewritten by every
  write, ``resourceVersion`` an opaque string, empty lists and maps absent.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
SYNCER_SA = "image-syncer-syncer"
SYNCER_NS = "image-syncer-node"


def bound_token_user(
    namespace: str = SYNCER_NS, service_account: str = SYNCER_SA, *, node: str | None = "pool-a-1"
) -> dict[str, Any]:
    """``userInfo`` of a pod-bound ServiceAccount token (``node=None``: a legacy Secret token)."""
    user: dict[str, Any] = {
        "username": f"system:serviceaccount:{namespace}:{service_account}",
        "uid": "0d4c6a3e-5b8f-4f6e-9d1a-3c2b1a0f9e8d",
        "groups": [
            "system:serviceaccounts",
            f"system:serviceaccounts:{namespace}",
            "system:authenticated",
        ],
    }
    if node is not None:
        user["extra"] = {
            "authentication.kubernetes.io/credential-id": [
                "JTI=6b0ba7c4-1c5e-4d0a-8f3a-9a1e2b3c4d5e"
            ],
            NODE_NAME_EXTRA: [node],
            "authentication.kubernetes.io/node-uid": ["5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9"],
            "authentication.kubernetes.io/pod-name": [f"{service_account}-x7k2p"],
            "authentication.kubernetes.io/pod-uid": ["a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"],
        }
    return user


def admission_request(
    name: str, user: dict[str, Any], *, subresource: str = "", dry_run: bool = False
) -> dict[str, Any]:
    """The CEL ``request`` of an UPDATE (a PATCH or PUT) of the Node ``name``."""
    gvk = {"group": "", "version": "v1", "kind": "Node"}
    gvr = {"group": "", "version": "v1", "resource": "nodes"}
    request: dict[str, Any] = {
        "kind": gvk,
        "resource": gvr,
        "requestKind": dict(gvk),
        "requestResource": dict(gvr),
        "name": name,
        "operation": "UPDATE",
        "userInfo": user,
        "dryRun": dry_run,
        "options": {"kind": "UpdateOptions", "apiVersion": "meta.k8s.io/v1"},
    }
    if subresource:  # omitempty: no key at all for the main resource
        request["subResource"] = request["requestSubResource"] = subresource
    return request


def registered_node(name: str = "pool-a-1", *, taints: list[dict[str, Any]]) -> dict[str, Any]:
    """A Node as the API server stores it after a kubelet registered it, status and all."""
    node: dict[str, Any] = {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
            "resourceVersion": "830412",
            "creationTimestamp": "2026-12-06T20:01:07Z",
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": "c5.xlarge",
            },
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
            "managedFields": [
                _managed("kubelet", "Update", "2026-12-06T20:01:07Z"),
                _managed("kube-controller-manager", "Update", "2026-12-06T20:01:17Z"),
            ],
        },
        "spec": {
            "podCIDR": "10.4.1.0/24",
            "podCIDRs": ["10.4.1.0/24"],
            "providerID": f"aws:///eu-west-1a/{name}",
        },
        "status": {
            "capacity": {"cpu": "4", "memory": "7934264Ki", "pods": "110"},
            "allocatable": {"cpu": "4", "memory": "7831864Ki", "pods": "110"},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "lastHeartbeatTime": "2026-12-06T20:05:12Z",
                    "lastTransitionTime": "2026-12-06T20:01:37Z",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": "10.0.1.17"},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "ec2b1f6d",
                "systemUUID": "ec2b1f6d",
                "bootID": "7c1e",
                "kernelVersion": "6.1.0",
                "osImage": "Bottlerocket OS",
                "containerRuntimeVersion": "containerd://2.0.5",
                "kubeletVersion": "v1.36.2",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        },
    }
    if taints:  # omitempty: a Node without taints has no spec.taints key
        node["spec"]["taints"] = copy.deepcopy(taints)
    return node


def after_write(old: dict[str, Any], changed: dict[str, Any], manager: str) -> dict[str, Any]:
    """``object`` as admission sees it: the client's change plus what the server itself rewrote.

    The field manager records the write in ``managedFields`` before admission runs; the
    resourceVersion is still the stored one (the write has not been persisted yet).
    """
    obj = copy.deepcopy(changed)
    meta = obj["metadata"]
    meta["resourceVersion"] = old["metadata"]["resourceVersion"]
    meta["managedFields"] = [
        *old["metadata"]["managedFields"],
        _managed(manager, "Update", "2026-12-06T20:06:40Z"),
    ]
    spec = obj.get("spec")
    if isinstance(spec, dict) and not spec.get("taints"):
        spec.pop("taints", None)
    return obj


def _managed(manager: str, operation: str, time: str) -> dict[str, Any]:
    return {
        "manager": manager,
        "operation": operation,
        "apiVersion": "v1",
        "time": time,
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:taints": {}}},
    }


def status(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A ``metav1.Status`` failure body; ``details`` omitted when None (NewResourceExpired)."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def qualified(plural: str, group: str) -> str:
    """``schema.GroupResource.String()``: ``nodes``, ``fleets.agones.dev``."""
    return f"{plural}.{group}" if group else plural


def resource_details(plural: str, group: str, name: str) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = plural
    return details


def not_found(plural: str, group: str, name: str) -> dict[str, Any]:
    return status(
        404,
        "NotFound",
        f'{qualified(plural, group)} "{name}" not found',
        resource_details(plural, group, name),
    )


def rbac_forbidden(
    plural: str, group: str, name: str, *, user: str, verb: str, namespace: str
) -> dict[str, Any]:
    """RBAC's refusal: ``endpoints/handlers/responsewriters/errors.go`` ``forbiddenMessage``
    (``User %q cannot %s resource %q in API group %q in the namespace %q``) wrapped by
    ``errors.NewForbidden`` (``<resource>.<group> "<name>" is forbidden: ...``)."""
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return status(
        403,
        "Forbidden",
        f'{qualified(plural, group)} "{name}" is forbidden: User "{user}" cannot {verb} '
        f'resource "{plural}" in API group "{group}" {scope}',
        resource_details(plural, group, name),
    )


def conflict(plural: str, group: str, name: str) -> dict[str, Any]:
    return status(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qualified(plural, group)} "{name}": the object has '
        "been modified; please apply your changes to the latest version and try again",
        resource_details(plural, group, name),
    )


def policy_denied(
    plural: str,
    group: str,
    name: str,
    *,
    policy: str,
    binding: str,
    message: str,
    reason: str = "Invalid",
) -> dict[str, Any]:
    codes = {"Forbidden": 403, "Unauthorized": 401, "RequestEntityTooLarge": 413}
    text = (
        f"ValidatingAdmissionPolicy '{policy}' with binding '{binding}' denied request: {message}"
    )
    details = resource_details(plural, group, name)
    details["causes"] = [{"message": text}]
    return status(
        codes.get(reason, 422),
        reason,
        f'{qualified(plural, group)} "{name}" is forbidden: {text}',
        details,
    )


def resource_not_served() -> dict[str, Any]:
    """``NewGenericServerResponse(404, ...)``: a path no API group serves (CRD not installed)."""
    return status(404, "NotFound", "the server could not find the requested resource", {})
