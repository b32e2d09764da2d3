"""The fake API server answers field for field as a real kube-apiserver does.

Every expected body comes from tests/support/kubeshapes.py, which names the Kubernetes source of each
shape; the fake (image_syncer/sandbox/fakekube) builds its answers separately, so a drift on
either side fails here.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from kubernetes import client
from support import kubeshapes
from support.fakekube import FakeKube

from broadcaster.kubeapi import custom_objects_api
from image_syncer.sandbox.fakekube import AdmissionAttributes, Denial

NODE = "pool-a-1"


def call(
    kube: FakeKube,
    path: str,
    *,
    method: str = "GET",
    body: Any = None,
    content_type: str = "application/merge-patch+json",
    token: str | None = None,
) -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of one request; errors are answers too."""
    request = urllib.request.Request(
        kube.url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"User-Agent": "image-syncer-test/1.0"},
    )
    if body is not None:
        request.add_header("Content-Type", content_type)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def a_node(*taints: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"providerID": f"fake://{NODE}"}
    if taints:
        spec["taints"] = list(taints)
    return {"metadata": {"name": NODE, "labels": {"kubernetes.io/os": "linux"}}, "spec": spec}


def test_not_found_names_the_resource_and_its_group(kube: FakeKube) -> None:
    code, kind, body = call(kube, "/api/v1/nodes/nowhere")
    assert (code, kind) == (404, "application/json")
    assert json.loads(body) == kubeshapes.not_found("nodes", "", "nowhere")
    code, _, body = call(kube, "/apis/agones.dev/v1/namespaces/default/fleets/gone")
    assert json.loads(body) == kubeshapes.not_found("fleets", "agones.dev", "gone")


def test_an_rbac_refusal_is_the_authorizers_forbidden(kube: FakeKube) -> None:
    kube.create("fleets", {"metadata": {"name": "arena", "namespace": "default"}})
    kube.forbid("patch", "fleets", user="system:serviceaccount:ci:deployer")
    path = "/apis/agones.dev/v1/namespaces/default/fleets/arena"
    code, _, body = call(kube, path, method="PATCH", body={"metadata": {"labels": {"a": "b"}}})
    assert code == 403
    assert json.loads(body) == kubeshapes.rbac_forbidden(
        "fleets",
        "agones.dev",
        "arena",
        user="system:serviceaccount:ci:deployer",
        verb="patch",
        namespace="default",
    )
    code, _, _ = call(kube, path)  # get is still allowed
    assert code == 200


def test_a_stale_resource_version_is_a_conflict(kube: FakeKube) -> None:
    stored = kube.create("nodes", a_node())
    kube.update("nodes", stored)  # someone else wrote since we read
    patch = {"metadata": {"resourceVersion": stored["metadata"]["resourceVersion"]}}
    code, _, body = call(kube, f"/api/v1/nodes/{NODE}", method="PATCH", body=patch)
    assert code == 409
    assert json.loads(body) == kubeshapes.conflict("nodes", "", NODE)


def test_already_exists(kube: FakeKube) -> None:
    fleet = {"metadata": {"name": "f"}, "spec": {}}
    kube.create("fleets", fleet)
    code, _, body = call(
        kube, "/apis/agones.dev/v1/namespaces/default/fleets", method="POST", body=fleet,
        content_type="application/json",
    )  # fmt: skip
    assert code == 409
    assert json.loads(body) == kubeshapes.status(
        409,
        "AlreadyExists",
        'fleets.agones.dev "f" already exists',
        kubeshapes.resource_details("fleets", "agones.dev", "f"),
    )


@pytest.mark.parametrize(("reason", "code"), [("Forbidden", 403), ("Invalid", 422)])
def test_an_admission_refusal_is_the_dispatchers(kube: FakeKube, reason: str, code: int) -> None:
    kube.create("nodes", a_node({"key": "gate", "effect": "NoSchedule"}))
    seen: list[AdmissionAttributes] = []

    def refuse(attributes: AdmissionAttributes) -> Denial:
        seen.append(attributes)
        return Denial("p", "b", "no way", reason)

    kube.admission = refuse
    token = kube.issue_token("ns", "sa", node=NODE, audiences=("https://kubernetes.default.svc",))
    patch: dict[str, Any] = {"spec": {"taints": []}}
    status, _, body = call(kube, f"/api/v1/nodes/{NODE}", method="PATCH", body=patch, token=token)
    assert status == code
    assert json.loads(body) == kubeshapes.policy_denied(
        "nodes", "", NODE, policy="p", binding="b", message="no way", reason=reason
    )
    # Admission saw the token's user, the changed object (managedFields already rewritten) and
    # the stored one; nothing was written.
    (attributes,) = seen
    assert attributes.user is not None
    assert attributes.user["username"] == "system:serviceaccount:ns:sa"
    assert attributes.obj["spec"] == {"providerID": f"fake://{NODE}"}  # [] is omitted
    assert attributes.old is not None and attributes.old["spec"]["taints"]
    assert attributes.obj["metadata"]["managedFields"][-1]["manager"] == "image-syncer-test"
    stored = kube.get("nodes", "", NODE)
    assert stored is not None and stored["spec"]["taints"]


def test_a_bound_token_is_the_real_user_and_a_bad_one_unauthorized(kube: FakeKube) -> None:
    token = kube.issue_token("ns", "sa", node=NODE, audiences=("https://kubernetes.default.svc",))
    review = kube.review({"token": token})
    extra = review["user"]["extra"]
    assert sorted(extra) == sorted(kubeshapes.bound_token_user(node=NODE)["extra"])
    assert extra[kubeshapes.NODE_NAME_EXTRA] == [NODE]
    assert all(isinstance(v, list) and len(v) == 1 for v in extra.values())
    assert extra["authentication.kubernetes.io/credential-id"][0].startswith("JTI=")
    assert "node-name" not in str(kube.review({"token": kube.issue_token("ns", "sa")}))
    code, _, body = call(kube, "/api/v1/nodes/x", token="not-a-token")
    assert code == 401
    assert json.loads(body) == kubeshapes.status(401, "Unauthorized", "Unauthorized")


def test_an_uninstalled_crd_is_the_plain_404_page(kube: FakeKube) -> None:
    kube.unserve("fleets")
    code, kind, body = call(kube, "/apis/agones.dev/v1/fleets")
    assert (code, kind, body) == (404, "text/plain; charset=utf-8", b"404 page not found\n")
    api = custom_objects_api(str(kube.kubeconfig))
    try:
        with pytest.raises(client.ApiException) as raised:
            api.list_cluster_custom_object("agones.dev", "v1", "fleets")
    finally:
        api.api_client.close()
    assert raised.value.status == 404 and raised.value.reason == "Not Found"


def test_a_too_old_watch_is_an_error_event_in_a_200_stream(kube: FakeKube) -> None:
    first = kube.create("nodes", a_node())
    kube.update("nodes", first)
    compacted = kube.compact()
    rv = first["metadata"]["resourceVersion"]
    code, kind, body = call(kube, f"/api/v1/nodes?watch=true&resourceVersion={rv}")
    assert (code, kind) == (200, "application/json")
    events = [json.loads(line) for line in body.splitlines() if line.strip()]
    assert events == [
        {
            "type": "ERROR",
            "object": kubeshapes.status(
                410, "Expired", f"too old resource version: {rv} ({compacted})"
            ),
        }
    ]


def test_an_exact_list_at_a_compacted_version_is_410(kube: FakeKube) -> None:
    first = kube.create("nodes", a_node())
    kube.update("nodes", first)
    kube.compact()
    rv = first["metadata"]["resourceVersion"]
    code, _, body = call(kube, f"/api/v1/nodes?resourceVersion={rv}&resourceVersionMatch=Exact")
    assert code == 410
    assert json.loads(body) == kubeshapes.status(
        410, "Expired", "The resourceVersion for the provided list is too old."
    )


def test_objects_carry_server_fields_as_the_real_server_does(kube: FakeKube) -> None:
    code, _, body = call(
        kube, "/api/v1/nodes", method="POST", body=a_node(), content_type="application/json"
    )
    assert code == 201
    node = json.loads(body)
    meta = node["metadata"]
    assert isinstance(meta["resourceVersion"], str) and "generation" not in meta
    assert [e["manager"] for e in meta["managedFields"]] == ["image-syncer-test"]
    assert "taints" not in node["spec"]  # empty fields are absent, never null or []
    fleet = kube.create("fleets", {"metadata": {"name": "f"}, "spec": {"replicas": 1}})
    assert fleet["metadata"]["generation"] == 1
    code, _, body = call(kube, "/api/v1/nodes")
    listing = json.loads(body)
    assert listing["metadata"] == {"resourceVersion": listing["metadata"]["resourceVersion"]}
    assert isinstance(listing["metadata"]["resourceVersion"], str)
    patched = json.loads(
        call(
            kube, f"/api/v1/nodes/{NODE}", method="PATCH", body={"metadata": {"labels": {"a": "b"}}}
        )[2]
    )
    # The same manager's later write replaces its entry; another manager's adds one.
    assert [e["manager"] for e in patched["metadata"]["managedFields"]] == ["image-syncer-test"]
    kube.update("nodes", patched, manager="kubelet")
    # The gate's merge patch of the last taint leaves no taint list, as a Go round trip does.
    call(kube, f"/api/v1/nodes/{NODE}", method="PATCH", body={"spec": {"taints": []}})
    again = kube.get("nodes", "", NODE)
    assert again is not None and "taints" not in again["spec"]
    assert sorted(e["manager"] for e in again["metadata"]["managedFields"]) == [
        "image-syncer-test",
        "kubelet",
    ]
