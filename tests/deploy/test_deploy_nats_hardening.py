"""deploy/nats hardened: authenticated routes (on real servers), who may reach which port,
placement across nodes and zones, priorities, and replicated node state on the 3-node install.

The route test runs the shipped nats.conf, with the environment the StatefulSet gives its pods,
as a real three-server cluster on loopback: two servers hold the Secret's route password, the
third does not and never joins.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from support.deploy import (
    DEPLOY,
    SYNCER_OVERLAYS,
    build,
    build_dir,
    build_overlay,
    container,
    env_of,
    env_value,
    nats_config_files,
    of_kind,
    one,
    pod_spec,
)

from image_syncer.sandbox.nats_server import nats_server_binary
from image_syncer.sandbox.processes import free_port, stop_process, wait_until
from wire.permissions import PASSWORD_ENV

SYNCER = "image-syncer-syncer"


# --- routes ---------------------------------------------------------------------------------


@dataclass
class _Server:
    name: str
    client: int
    cluster: int
    monitor: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        return (self.directory / "nats.log").read_text(errors="replace")

    def routes(self) -> set[str]:
        url = f"http://127.0.0.1:{self.monitor}/routez"
        with urllib.request.urlopen(url, timeout=2) as response:
            return {r.get("remote_name", "") for r in json.load(response)["routes"]}


def _pod_routes(password: str, servers: list[_Server]) -> str:
    """NATS_ROUTES as the kubelet expands it for the pods, pointed at loopback ports."""
    statefulset = one(build("nats/base"), "StatefulSet", "nats")
    value = env_of(container(statefulset, "nats"))["NATS_ROUTES"]["value"]
    value = value.replace("$(NATS_ROUTE_PASSWORD)", password)
    for i, server in enumerate(servers):
        value = value.replace(f"@nats-{i}.nats-headless:6222", f"@127.0.0.1:{server.cluster}")
    assert "nats-headless" not in value and "$(" not in value
    result: str = value
    return result


def _start(server: _Server, route_password: str, routes: str) -> None:
    files = nats_config_files("nats/base")
    conf = files["nats.conf"]
    conf = conf.replace("/data/", f"{server.directory}/data/")
    conf = conf.replace("/var/run/nats/", f"{server.directory}/")
    conf = re.sub(r"^port: 4222$", f"listen: 127.0.0.1:{server.client}", conf, flags=re.M)
    conf = re.sub(r"^http_port: 8222$", f"http: 127.0.0.1:{server.monitor}", conf, flags=re.M)
    conf = re.sub(r"^  port: 6222$", f"  listen: 127.0.0.1:{server.cluster}", conf, flags=re.M)
    assert f"127.0.0.1:{server.cluster}" in conf and f"127.0.0.1:{server.monitor}" in conf
    server.directory.mkdir(parents=True, exist_ok=True)
    (server.directory / "nats.conf").write_text(conf)
    (server.directory / "auth.conf").write_text(files["auth.conf"])
    env = {
        **os.environ,
        "SERVER_NAME": server.name,
        "NATS_ROUTE_PASSWORD": route_password,
        "NATS_ROUTES": routes,
        **{variable: "pw" for variable in PASSWORD_ENV.values()},
    }
    with (server.directory / "nats.log").open("wb") as log:
        server.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(server.directory / "nats.conf")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[_Server]]:
    servers = [
        _Server(f"nats-{i}", free_port(), free_port(), free_port(), tmp_path / f"nats-{i}")
        for i in range(3)
    ]
    yield servers
    for server in servers:
        stop_process(server.process)


def test_a_server_without_the_route_password_cannot_join(cluster: list[_Server]) -> None:
    first, second, intruder = cluster
    secret = "5ecret-route-password"
    for server in (first, second):
        _start(server, secret, _pod_routes(secret, cluster))
    # The intruder knows where the routes are, but not the password.
    _start(intruder, "guessed", _pod_routes("guessed", cluster))

    wait_until(
        lambda: second.name in first.routes() and first.name in second.routes(),
        timeout=60,
        what="the two servers with the password form a cluster",
        process=first.process,
        log_file=first.directory / "nats.log",
    )
    # Refused in both directions: its routes to the others, and theirs to it.
    wait_until(
        lambda: "Authentication Failure" in first.log and "Authentication Failure" in intruder.log,
        timeout=60,
        what="the intruder's route attempts refused",
        process=intruder.process,
        log_file=intruder.directory / "nats.log",
    )
    assert intruder.name not in first.routes() | second.routes()
    assert not intruder.routes()


def test_routes_authenticate_and_clients_get_no_server_addresses() -> None:
    conf = nats_config_files("nats/base")["nats.conf"]
    cluster = conf[conf.index("cluster {") :]
    assert re.search(r"authorization {\s*user: route\s*password: \$NATS_ROUTE_PASSWORD", cluster)
    assert re.search(r"^  no_advertise: true$", cluster, re.M)
    nats = container(one(build("nats/base"), "StatefulSet", "nats"), "nats")
    secret = env_of(nats)["NATS_ROUTE_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "image-syncer-nats", "key": "route-password"}
    # Env vars are expanded in order: the password must be declared before the routes use it.
    names = [e["name"] for e in nats["env"]]
    assert names.index("NATS_ROUTE_PASSWORD") < names.index("NATS_ROUTES")


# --- who may reach which port ----------------------------------------------------------------


def _peers(policy: dict[str, Any], port: int) -> list[dict[str, Any]]:
    rules = [r for r in policy["spec"]["ingress"] if port in {p["port"] for p in r["ports"]}]
    assert len(rules) == 1, f"one rule for port {port}"
    peers: list[dict[str, Any]] = rules[0]["from"]
    return peers


def test_each_nats_port_admits_only_its_own_clients() -> None:
    resources = build("nats/base")
    policy = one(resources, "NetworkPolicy", "nats")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "nats"}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without peers admits everyone"
    clients = _peers(policy, 4222)
    names = {"image-syncer-syncer", "image-syncer-broadcaster", "image-syncer-auth"}
    for peer in clients:
        if "podSelector" in peer:
            (expression,) = peer["podSelector"]["matchExpressions"]
            assert expression["key"] == "app.kubernetes.io/name"
            assert set(expression["values"]) == names
    admin = [p for p in clients if "podSelector" not in p]
    assert admin == [{"namespaceSelector": {"matchLabels": {"image-syncer.io/nats-admin": "true"}}}]
    for port in (8222, 7777):  # the server's monitoring, the exporter sidecar's metrics
        assert _peers(policy, port) == [
            {"namespaceSelector": {"matchLabels": {"image-syncer.io/nats-monitoring": "true"}}}
        ]
    assert _peers(policy, 6222) == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "nats"}}}
    ]
    # The namespaces deploy/namespace makes carry the label the client rule selects.
    namespaces = of_kind(build_dir(DEPLOY / "namespace"), "Namespace")
    for namespace in namespaces:
        assert namespace["metadata"]["labels"]["app.kubernetes.io/part-of"] == "image-syncer"


def test_the_syncer_and_callout_pods_carry_the_names_the_policy_admits() -> None:
    for name in SYNCER_OVERLAYS:
        daemonset = one(build(name), "DaemonSet", SYNCER)
        labels = daemonset["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == SYNCER


# --- placement and priority ------------------------------------------------------------------


def test_nats_servers_never_share_a_node_and_spread_over_zones() -> None:
    spec = pod_spec(one(build("nats/base"), "StatefulSet", "nats"))
    required = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert [t["topologyKey"] for t in required] == ["kubernetes.io/hostname"]
    assert required[0]["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "nats"}
    (spread,) = spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone" and spread["maxSkew"] == 1


def test_nats_and_syncer_run_at_a_shipped_priority() -> None:
    classes = {
        c["metadata"]["name"]: c for c in of_kind(build_dir(DEPLOY / "namespace"), "PriorityClass")
    }
    nats = pod_spec(one(build("nats/base"), "StatefulSet", "nats"))
    assert classes[nats["priorityClassName"]]["preemptionPolicy"] == "PreemptLowerPriority"
    for name in SYNCER_OVERLAYS:
        syncer = pod_spec(one(build(name), "DaemonSet", SYNCER))
        # A pre-puller never evicts a running game server to get a place.
        assert classes[syncer["priorityClassName"]]["preemptionPolicy"] == "Never"
    for priority_class in classes.values():
        assert 0 < priority_class["value"] < 1_000_000_000
        assert priority_class["globalDefault"] is False


def test_node_state_buckets_are_replicated_like_the_streams(tmp_path: Path) -> None:
    for name in SYNCER_OVERLAYS:
        syncer = container(one(build(name), "DaemonSet", SYNCER), "syncer")
        assert env_value(syncer, "STATUS_REPLICAS") == "3"
    single = build_overlay(
        tmp_path,
        "resources: [{deploy}/syncer/overlays/containerd]\n"
        "components: [{deploy}/syncer/components/single-nats]\n",
    )
    assert (
        env_value(container(one(single, "DaemonSet", SYNCER), "syncer"), "STATUS_REPLICAS") == "1"
    )


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_the_cluster_wide_prerequisites_validate(version: str) -> None:
    for resource in build_dir(DEPLOY / "namespace"):
        kubernetes_validate.validate(resource, version, strict=True)
