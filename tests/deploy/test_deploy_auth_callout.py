"""The auth-callout components of deploy/: what they render, and that the pieces fit together.

The callout's behaviour is proven on a real server in test_auth_callout.py with the same
accounts file (``render_callout_accounts``); here: the servers mount that file and get its
variables from the Secret, the syncers and the broadcaster present a projected token of the
audience the callout checks, from the ServiceAccounts the callout maps to their roles, and the
callout holds exactly one Kubernetes permission.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from support.deploy import (
    DEPLOY,
    build_overlay,
    container,
    env_of,
    env_value,
    one,
    pod_spec,
    resolved_env,
    restricted_violations,
    role_envvars,
)

from authcallout.natsjwt import Signer, new_account_seed
from image_syncer.sandbox.nats_server import nats_server_binary
from wire.permissions import (
    AUTH_PASSWORD_ENV,
    CALLOUT_ISSUER_ENV,
    PASSWORD_ENV,
    render_callout_accounts,
)

AUTH = "image-syncer-auth"


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return build_overlay(
        tmp_path_factory.mktemp("nats-callout"),
        "resources: [{deploy}/nats/base]\ncomponents: [{deploy}/nats/components/auth-callout]\n",
    )


@pytest.fixture(scope="module")
def syncer(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return build_overlay(
        tmp_path_factory.mktemp("syncer-callout"),
        "resources: [{deploy}/syncer/overlays/containerd]\n"
        "components: [{deploy}/syncer/components/auth-callout]\n",
    )


def test_committed_callout_config_is_generated_from_wire_permissions() -> None:
    committed = (DEPLOY / "nats/components/auth-callout/callout.conf").read_text()
    assert committed == render_callout_accounts(), (
        "stale: python -m wire.permissions --callout > deploy/nats/components/auth-callout/callout.conf"
    )


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_both_components_validate(
    nats: list[dict[str, Any]], syncer: list[dict[str, Any]], version: str
) -> None:
    for resource in nats + syncer:
        if resource["kind"] == "SecurityContextConstraints":
            continue
        kubernetes_validate.validate(resource, version, strict=True)


def test_servers_mount_the_callout_config_with_its_variables_from_the_secret(
    nats: list[dict[str, Any]], tmp_path: Path
) -> None:
    statefulset = one(nats, "StatefulSet", "nats")
    maps = [
        source["configMap"]["name"]
        for volume in pod_spec(statefulset)["volumes"]
        if volume["name"] == "config"
        for source in volume["projected"]["sources"]
    ]
    accounts = next(
        r for r in nats if r["kind"] == "ConfigMap" and r["metadata"]["name"] in maps
        and "auth.conf" in r["data"]
    )  # fmt: skip
    assert accounts["data"]["auth.conf"] == render_callout_accounts()
    env = env_of(container(statefulset, "nats"))
    for variable, key in (
        (AUTH_PASSWORD_ENV, "auth-password"),
        (CALLOUT_ISSUER_ENV, "callout-issuer"),
    ):
        assert env[variable]["valueFrom"]["secretKeyRef"] == {
            "name": "image-syncer-nats",
            "key": key,
        }
    assert not set(PASSWORD_ENV.values()) & set(env)
    # The file parses in the real server with exactly those variables.
    (tmp_path / "auth.conf").write_text(accounts["data"]["auth.conf"])
    (tmp_path / "nats.conf").write_text("port: -1\ninclude ./auth.conf\n")
    variables = {AUTH_PASSWORD_ENV: "pw", CALLOUT_ISSUER_ENV: Signer(new_account_seed()).public_key}
    checked = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(tmp_path / "nats.conf")],
        env={**os.environ, **variables},
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout


def _token_volume(workload: dict[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    c = container(workload, name)
    env = env_of(c)
    assert "NATS_PASSWORD" not in env and "NATS_USER" not in env, "a shared password is left"
    path = env_value(c, "NATS_TOKEN_FILE")
    (mount,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"]]
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert path == f"{mount['mountPath']}/{token['path']}"
    account = f"{workload['metadata']['namespace']}/{pod_spec(workload)['serviceAccountName']}"
    return account, token


def test_clients_present_the_token_the_callout_checks_from_the_accounts_it_maps(
    syncer: list[dict[str, Any]],
) -> None:
    auth = container(one(syncer, "Deployment", AUTH), "auth")
    audience = env_value(auth, "AUTH_AUDIENCE")
    for kind, name, c, role in (
        ("DaemonSet", "image-syncer-syncer", "syncer", "AUTH_SYNCER_ACCOUNTS"),
        ("Deployment", "image-syncer-broadcaster", "broadcaster", "AUTH_BROADCASTER_ACCOUNTS"),
    ):
        account, token = _token_volume(one(syncer, kind, name), c)
        assert token["audience"] == audience
        # Short-lived: the kubelet renews it, and a session ends with it.
        assert token["expirationSeconds"] <= 3600
        assert account in env_value(auth, role).split(","), f"{account} has no role"
    admin = env_value(auth, "AUTH_ADMIN_ACCOUNTS")
    namespace, _, name = admin.partition("/")
    assert one(syncer, "ServiceAccount", name)["metadata"]["namespace"] == namespace


def test_the_callout_is_replicated_and_may_only_review_tokens(
    syncer: list[dict[str, Any]],
) -> None:
    deployment = one(syncer, "Deployment", AUTH)
    assert deployment["spec"]["replicas"] >= 2
    assert one(syncer, "PodDisruptionBudget", AUTH)["spec"]["minAvailable"] == 1
    assert one(syncer, "ClusterRole", AUTH)["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
    ]
    binding = one(syncer, "ClusterRoleBinding", AUTH)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": AUTH, "namespace": deployment["metadata"]["namespace"]}
    ]
    spec = pod_spec(deployment)
    assert spec["priorityClassName"] == "image-syncer-nats"
    c = container(deployment, "auth")
    seed_path = env_value(c, "AUTH_ISSUER_SEED_FILE")
    (mount,) = [m for m in c["volumeMounts"] if seed_path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "image-syncer-nats"
    assert volume["secret"]["items"] == [{"key": "callout-issuer-seed", "path": "issuer.seed"}]


def test_every_env_var_of_the_components_is_one_the_cli_reads(
    syncer: list[dict[str, Any]],
) -> None:
    for kind, name, c, role in (
        ("Deployment", AUTH, "auth", "auth"),
        ("DaemonSet", "image-syncer-syncer", "syncer", "syncer"),
        ("Deployment", "image-syncer-broadcaster", "broadcaster", "broadcaster"),
    ):
        unknown = set(env_of(container(one(syncer, kind, name), c))) - role_envvars(role)
        assert not unknown, f"`image-syncer {role}` ignores {sorted(unknown)}"


def test_the_callout_passes_pod_security_restricted_and_dials_nats_by_its_full_name(
    syncer: list[dict[str, Any]],
) -> None:
    deployment = one(syncer, "Deployment", AUTH)
    assert deployment["metadata"]["namespace"] == "image-syncer"
    assert restricted_violations(pod_spec(deployment)) == []
    url = resolved_env(deployment, container(deployment, "auth"), "NATS_URL")
    assert url == "nats://nats.image-syncer.svc:4222"


def test_the_single_server_takes_the_component_too(tmp_path: Path) -> None:
    resources = build_overlay(
        tmp_path,
        "resources: [{deploy}/nats/single]\ncomponents: [{deploy}/nats/components/auth-callout]\n",
    )
    env = env_of(container(one(resources, "StatefulSet", "nats"), "nats"))
    # Its own variables, and none of the static users' nor the routes'.
    assert {n for n in env if n.startswith("NATS_")} == {AUTH_PASSWORD_ENV, CALLOUT_ISSUER_ENV}
    for resource in resources:
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)
