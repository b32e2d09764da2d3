"""The syncer's flags, generated from its settings' fields, are the flags it always had.

Users' DaemonSets set the environment twins (Octops' ``CONN_TARGET`` among them): a flag, an env
var, a default, a help panel or a metavar that moves is a broken upgrade. The table below was
written from the hand-written command the generator replaced (``syncer --help`` compared at 80
and 200 columns too); a field added without a flag, or a flag renamed, fails here.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

import msgspec
import pytest
import typer

from image_syncer.cli import app
from ops.flagfields import build, flag_of, flagged_fields, is_section, override, section_fields
from syncer.settings import PullSettings, SyncerSettings
from wire.natsconn import NatsSettings

HOST = socket.gethostname()
# (flag, environment twin, default as the help shows it, help panel, metavar)
FLAGS = [
    ("--node-name", "NODE_NAME", HOST, "Node and runtime", "NODE"),
    (
        "--cri-endpoint",
        "CONN_TARGET",
        "unix:///run/containerd/containerd.sock",
        "Node and runtime",
        "URL",
    ),
    ("--sync-period", "SYNC_PERIOD", "15s", "Pulls", "DURATION"),
    ("--max-parallel-pulls", "MAX_PARALLEL_PULLS", 2, "Pulls", "N"),
    ("--pull-timeout", "PULL_TIMEOUT", "10m", "Pulls", "DURATION"),
    ("--stop-timeout", "STOP_TIMEOUT", "10s", "Node and runtime", "DURATION"),
    ("--pull-backoff-min", "PULL_BACKOFF_MIN", "1s", "Pulls", "DURATION"),
    ("--pull-backoff-max", "PULL_BACKOFF_MAX", "5m", "Pulls", "DURATION"),
    ("--subject-prefix", "SUBJECT_PREFIX", "agones", "Event log", "PREFIX"),
    ("--metrics-addr", "METRICS_ADDR", ":8080", "Node and runtime", "[HOST]:PORT"),
    ("--max-ack-pending", "MAX_ACK_PENDING", 256, "Event log", "N"),
    ("--ack-wait", "ACK_WAIT", "30s", "Event log", "DURATION"),
    (
        "--consumer-inactive-threshold",
        "CONSUMER_INACTIVE_THRESHOLD",
        "24h",
        "Event log",
        "DURATION",
    ),
    ("--consumer-provisioned", "CONSUMER_PROVISIONED", False, "Event log", None),
    ("--cri-call-timeout", "CRI_CALL_TIMEOUT", "30s", "Node and runtime", "DURATION"),
    ("--registry-auth-file", "REGISTRY_AUTH_FILE", None, "Pulls", "PATH"),
    ("--kubelet-config-json", "KUBELET_CONFIG_JSON", None, "Pulls", "PATH"),
    ("--status-interval", "STATUS_INTERVAL", "5s", "Node status", "DURATION"),
    ("--status-heartbeat", "STATUS_HEARTBEAT", "30s", "Node status", "DURATION"),
    ("--status-replicas", "STATUS_REPLICAS", 1, "Node status", "N"),
    ("--status-ttl", "STATUS_TTL", "1h", "Node status", "DURATION"),
    ("--refold-period", "REFOLD_PERIOD", "1h", "Event log", "DURATION"),
    ("--lag-interval", "LAG_INTERVAL", "0s", "Event log", "DURATION"),
    ("--fetch-expiry", "FETCH_EXPIRY", "30s", "Event log", "DURATION"),
    ("--fetch-heartbeat", "FETCH_HEARTBEAT", "5s", "Event log", "DURATION"),
    ("--runtime-unhealthy-after", "RUNTIME_UNHEALTHY_AFTER", "5m", "Node and runtime", "DURATION"),
    ("--fleet-selector", "FLEET_SELECTOR", "", "Which Fleets", "SELECTOR"),
    ("--respect-scheduling", "RESPECT_SCHEDULING", False, "Which Fleets", None),
    ("--kube-api-url", "KUBE_API_URL", None, "Which Fleets", "URL"),
    ("--node-refresh", "NODE_REFRESH", "1m", "Which Fleets", "DURATION"),
    ("--remove-unused", "REMOVE_UNUSED", False, "Keeping images", None),
    ("--remove-grace", "REMOVE_GRACE", "10m", "Keeping images", "DURATION"),
    ("--ledger-ttl", "LEDGER_TTL", "720h", "Keeping images", "DURATION"),
    ("--startup-taint", "STARTUP_TAINT", "", "Which Fleets", "KEY"),
    ("--startup-taint-timeout", "STARTUP_TAINT_TIMEOUT", "15m", "Which Fleets", "DURATION"),
    ("--extra-image", "EXTRA_IMAGES", (), "Pulls", "IMAGE"),
    ("--max-cluster-pulls", "MAX_CLUSTER_PULLS", 0, "Pulls", "N"),
    ("--registry-backoff", "REGISTRY_BACKOFF", "1m", "Pulls", "DURATION"),
    ("--mirror", "MIRROR", (), "Seeding through a mirror", "HOST"),
    ("--seeds", "SEEDS", 1, "Seeding through a mirror", None),
    ("--seed-per", "SEED_PER", "", "Seeding through a mirror", "LABEL"),
    ("--seed-timeout", "SEED_TIMEOUT", "10m", "Seeding through a mirror", "DURATION"),
    ("--seed-report-ttl", "SEED_REPORT_TTL", "1h", "Seeding through a mirror", "DURATION"),
    ("--max-mirror-pulls", "MAX_MIRROR_PULLS", 0, "Seeding through a mirror", None),
    ("--pin-images", "PIN_IMAGES", True, "Keeping images", None),
    ("--max-image-fs-usage", "MAX_IMAGE_FS_USAGE", "80%", "Keeping images", "PERCENT"),
    ("--host-root", "HOST_ROOT", "", "Keeping images", "PATH"),
    ("--removal-backoff-after", "REMOVAL_BACKOFF_AFTER", 3, "Keeping images", "N"),
    ("--removal-window", "REMOVAL_WINDOW", "1h", "Keeping images", "DURATION"),
    ("--removal-backoff-max", "REMOVAL_BACKOFF_MAX", "30m", "Keeping images", "DURATION"),
    ("--nats-url", "NATS_URL", ("nats://127.0.0.1:4222",), "NATS", "URL"),
    ("--nats-user", "NATS_USER", None, "NATS", "USER"),
    ("--nats-password", "NATS_PASSWORD", None, "NATS", "PASSWORD"),
    ("--nats-token", "NATS_TOKEN", None, "NATS", "TOKEN"),
    ("--nats-token-file", "NATS_TOKEN_FILE", None, "NATS", "PATH"),
    ("--nats-creds", "NATS_CREDS", None, "NATS", "PATH"),
    ("--nats-tls-ca", "NATS_TLS_CA", None, "NATS", "PATH"),
]


def _params() -> list[Any]:
    command = typer.main.get_command(app).commands["syncer"]  # type: ignore[attr-defined]
    return [p for p in command.params if p.name != "help"]


def _row(param: Any) -> tuple[Any, ...]:
    default = tuple(param.default) if isinstance(param.default, list) else param.default
    return (param.opts[0], param.envvar, default, param.rich_help_panel, param.metavar)


def test_every_flag_env_twin_default_panel_and_metavar_is_as_before() -> None:
    assert sorted(map(_row, _params()), key=str) == sorted(FLAGS, key=str)


def test_every_setting_is_a_flag() -> None:
    # A leaf of the settings tree without a flag would be a setting no user can set.
    def leaves(section: type) -> list[str]:
        found = []
        for f, kind in section_fields(section):
            if "flag" in f.metadata or kind is NatsSettings:
                continue
            found += leaves(kind) if is_section(kind) else [f"{section.__name__}.{f.name}"]
        return found

    assert leaves(SyncerSettings) == []
    params = [spec.param for _, _, _, spec in flagged_fields(SyncerSettings)]
    assert len(params) == len(set(params)) == 50


def test_a_section_refuses_naming_the_flag() -> None:
    with pytest.raises(ValueError, match=r"^--pull-timeout must be positive$"):
        PullSettings(timeout=0.0)
    with pytest.raises(ValueError, match=r"^--fetch-heartbeat must be positive and below half"):
        override(SyncerSettings(), fetch_heartbeat=20.0)
    assert flag_of(SyncerSettings(), "node_name") == "--node-name"


def test_override_changes_the_named_flags_in_their_sections_only() -> None:
    base = build(SyncerSettings, {"node_name": "n1", "sync_period": 2.0})
    changed = override(base, pull_timeout=3.0, status_interval=0.5, extra_image=("nginx:1",))
    assert (changed.pulls.period, changed.pulls.timeout) == (2.0, 3.0)
    assert changed.pulls.extra_images == ("nginx:1",)
    assert changed.status.interval == 0.5
    assert changed.node_name == "n1"
    assert dataclasses.replace(changed, pulls=base.pulls, status=base.status) == base
    with pytest.raises(TypeError, match="no such setting: pull_timout"):
        override(base, pull_timout=3.0)


def test_the_settings_survive_the_handover_to_the_syncer_process() -> None:
    # image_syncer.syncerproc hands them over as JSON and converts them back, checked again.
    settings = override(SyncerSettings(node_name="n1"), mirror=("*",), max_image_fs_usage=0.5)
    data = msgspec.json.encode(settings)
    assert msgspec.json.decode(data, type=SyncerSettings) == settings
    bad = msgspec.json.decode(data)
    bad["pulls"]["timeout"] = 0
    with pytest.raises(msgspec.ValidationError, match="--pull-timeout must be positive"):
        msgspec.convert(bad, type=SyncerSettings)
