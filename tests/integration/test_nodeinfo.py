"""The syncer reads its own Node from a protocol-faithful fake API server, over HTTP and HTTPS."""

from __future__ import annotations

import asyncio
import copy
import logging
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fakenodeapi import FakeApiServer

from image_syncer.sandbox.processes import MissingComponent
from ops.logs import fields_of
from syncer.folding.scheduling import NodeInfo, Taint
from syncer.node.nodeinfo import ApiEndpoint, NodeInfoError, NodeWatcher, fetch_node
from wire.contract import PodSpec

TOKEN = "eyJhbGciOiJSUzI1NiJ9.sa-token-do-not-log"

# Trimmed from `kubectl get node -o json` on GKE; the fields are real, the values plausible.
NODE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {
        "name": "gke-prod-gs-pool-7c9d-k2lm",
        "uid": "5b8f8e3e-8f0a-4c1e-9d0b-2f5f2d6a7c11",
        "resourceVersion": "123456",
        "creationTimestamp": "2024-05-01T10:00:00Z",
        "labels": {
            "cloud.google.com/gke-nodepool": "gs-pool",
            "kubernetes.io/arch": "amd64",
            "kubernetes.io/os": "linux",
            "topology.kubernetes.io/zone": "europe-west1-b",
        },
        "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
    },
    "spec": {
        "podCIDR": "10.4.1.0/24",
        "providerID": "gce://proj/europe-west1-b/gke-prod-gs-pool-7c9d-k2lm",
        "taints": [{"key": "dedicated", "value": "gameservers", "effect": "NoSchedule"}],
    },
    "status": {
        "capacity": {"cpu": "4", "memory": "16393244Ki", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        "nodeInfo": {"containerRuntimeVersion": "containerd://1.7.10", "architecture": "amd64"},
    },
}


@pytest.fixture
def service_account(tmp_path: Path) -> Path:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(TOKEN + "\n")
    return sa


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(copy.deepcopy(NODE), TOKEN) as server:
        yield server


NAME = NODE["metadata"]["name"]


def test_fetch_sends_the_token_and_reads_labels_and_taints(
    api: FakeApiServer, service_account: Path
) -> None:
    info = fetch_node(ApiEndpoint.from_url(api.url, sa_dir=service_account), NAME)
    assert info == NodeInfo(
        NAME,
        NODE["metadata"]["labels"],
        (Taint("dedicated", "NoSchedule", "gameservers"),),
    )
    assert api.requests == [(f"/api/v1/nodes/{NAME}", f"Bearer {TOKEN}")]


def test_errors_name_the_url_and_the_api_servers_reason_never_the_token(
    api: FakeApiServer, service_account: Path, tmp_path: Path
) -> None:
    endpoint = ApiEndpoint.from_url(api.url, sa_dir=service_account)
    with pytest.raises(NodeInfoError) as missing:
        fetch_node(endpoint, "no-such-node")
    assert f"{api.url}/api/v1/nodes/no-such-node: 404" in str(missing.value)
    assert 'nodes "no-such-node" not found' in str(missing.value)
    anonymous = ApiEndpoint.from_url(api.url, sa_dir=tmp_path / "none")
    with pytest.raises(NodeInfoError, match="401 Unauthorized"):
        fetch_node(anonymous, NAME)
    with pytest.raises(NodeInfoError, match="Connection refused"):
        fetch_node(ApiEndpoint("http://127.0.0.1:1"), NAME)
    for error in (missing.value,):
        assert TOKEN not in str(error) and TOKEN not in repr(error)


async def test_watcher_keeps_the_last_known_node_and_logs_a_failure_once(
    api: FakeApiServer, service_account: Path, caplog: pytest.LogCaptureFixture
) -> None:
    changes: list[NodeInfo] = []
    watcher = NodeWatcher(
        ApiEndpoint.from_url(api.url, sa_dir=service_account), NAME, on_change=changes.append
    )
    with caplog.at_level(logging.INFO, logger="syncer.node.nodeinfo"):
        assert await watcher.refresh_once()
        known = watcher.current
        api.down = True
        assert not await watcher.refresh_once()
        assert not await watcher.refresh_once()
        assert watcher.current == known
        api.down = False
        api.nodes[NAME]["spec"]["taints"].append(
            {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
        )
        assert await watcher.refresh_once()
        assert await watcher.refresh_once()
    assert [c.taints[-1].key for c in changes] == ["dedicated", "node.kubernetes.io/unschedulable"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "node info updated",
        "node info unavailable, keeping the last known",
        "node info available again",
        "node info updated",
    ]
    failure = fields_of(caplog.records[1])
    assert "503 etcdserver: leader changed" in failure["error"]
    assert failure["known"] is True
    assert TOKEN not in caplog.text
    assert all(TOKEN not in repr(fields_of(r)) for r in caplog.records)


async def test_until_the_node_is_known_every_fleet_is_admitted(tmp_path: Path) -> None:
    watcher = NodeWatcher(ApiEndpoint("http://127.0.0.1:1"), NAME)
    assert not await watcher.refresh_once()
    pod = PodSpec(node_selector={"kubernetes.io/arch": "arm64"})
    assert watcher.schedulable(pod) == (True, "node labels and taints not known yet")


async def test_run_refreshes_until_stopping(api: FakeApiServer, service_account: Path) -> None:
    stopping = asyncio.Event()
    watcher = NodeWatcher(ApiEndpoint.from_url(api.url, sa_dir=service_account), NAME, refresh=0.01)
    task = asyncio.create_task(watcher.run(stopping))
    assert await asyncio.to_thread(api.third_request.wait, 20)
    stopping.set()
    await asyncio.wait_for(task, 20)
    assert watcher.current is not None
    assert watcher.schedulable(PodSpec(node_selector={"kubernetes.io/arch": "arm64"}))[0] is False


def test_in_cluster_endpoint_comes_from_the_environment(service_account: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    endpoint = ApiEndpoint.in_cluster(env, service_account)
    assert endpoint == ApiEndpoint(
        "https://10.0.0.1:443", service_account / "token", service_account / "ca.crt"
    )
    v6 = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    assert ApiEndpoint.in_cluster(v6, service_account).url == "https://[fd00::1]:6443"
    with pytest.raises(NodeInfoError, match="KUBERNETES_SERVICE_HOST"):
        ApiEndpoint.in_cluster({}, service_account)


def test_https_with_the_service_account_ca(service_account: Path, tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise MissingComponent("openssl not found; install it with `apt-get install openssl`")
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=kubernetes",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    shutil.copy(cert, service_account / "ca.crt")
    with FakeApiServer(copy.deepcopy(NODE), TOKEN) as api:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        api.httpd.socket = context.wrap_socket(api.httpd.socket, server_side=True)
        port = api.httpd.server_address[1]
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(port)}
        endpoint = ApiEndpoint.in_cluster(env, service_account)
        assert fetch_node(endpoint, NAME).labels["kubernetes.io/arch"] == "amd64"
        # Without the CA the server is not trusted.
        untrusted = ApiEndpoint(endpoint.url, endpoint.token_file, None)
        with pytest.raises(NodeInfoError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch_node(untrusted, NAME)
