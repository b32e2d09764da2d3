"""deploy/monitoring: the alert rules and the dashboard, checked by Prometheus' own promtool and
against the metrics real image-syncer processes serve.

- `promtool check rules` on the PrometheusRule's groups, and `promtool test rules` on the unit
  tests in deploy/monitoring/tests (input series -> alerts that fire, and that do not).
- every dashboard panel's PromQL parses (promtool, as throwaway recording rules).
- every `image_syncer_*` series a rule or a panel names is served by a real `image-syncer
  syncer` or `image-syncer broadcaster` process, with the type the query assumes.
- the PodMonitors select the pods and ports the install renders, and their job names are the
  ones the rules select on; every alert's runbook_url leads to its section in docs/operations.md.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families
from support.deploy import build_dir, build_overlay, of_kind, one, pod_spec, workloads
from support.fakekube import FakeKube
from support.faults_harness import SyncerProcess, node_name
from support.markdown_links import anchors, slug

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
PROMTOOL_HINT = "promtool not found: apt-get install prometheus (./dev installs it)"


def promtool(*args: str, cwd: Path) -> str:
    exe = shutil.which("promtool")
    assert exe, PROMTOOL_HINT
    result = subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def rule_groups() -> list[dict[str, Any]]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    result: list[dict[str, Any]] = rule["spec"]["groups"]
    return result


def alerts() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads((MONITORING / "dashboard.json").read_text())
    return result


def panel_exprs() -> list[str]:
    exprs = []
    for panel in dashboard()["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    return exprs


def as_plain_promql(expr: str) -> str:
    """Grafana's variables replaced by what they become at query time."""
    return expr.replace("$__rate_interval", "5m").replace("$node", ".*")


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """The rule groups as Prometheus reads them, next to copies of the unit tests."""
    groups = rule_groups()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    bare = copy.deepcopy(groups)
    for group in bare:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules-labels.yaml").write_text(yaml.safe_dump({"groups": bare}))
    for test in (MONITORING / "tests").glob("*.yaml"):
        shutil.copy(test, tmp_path / test.name)
    return tmp_path


def test_promtool_checks_the_rules(rules_dir: Path) -> None:
    out = promtool("check", "rules", "rules.yaml", cwd=rules_dir)
    assert f"SUCCESS: {len(alerts())} rules found" in out


def test_promtool_unit_tests_pass(rules_dir: Path) -> None:
    tests = sorted(p.name for p in (MONITORING / "tests").glob("*.yaml"))
    assert tests == ["alerts.test.yaml", "annotations.test.yaml"]
    promtool("test", "rules", *tests, cwd=rules_dir)


def test_every_alert_is_unit_tested() -> None:
    tested = set()
    for test in (MONITORING / "tests").glob("*.yaml"):
        for case in yaml.safe_load(test.read_text())["tests"]:
            tested |= {t["alertname"] for t in case["alert_rule_test"]}
    assert {a["alert"] for a in alerts()} <= tested


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    exprs = panel_exprs()
    assert len(exprs) >= 10
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": as_plain_promql(e)} for i, e in enumerate(exprs)
    ]
    (tmp_path / "panels.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    promtool("check", "rules", "panels.yaml", cwd=tmp_path)


def test_every_alert_links_to_its_runbook_section() -> None:
    runbooks = ROOT / "docs" / "operations.md"
    text = runbooks.read_text()
    alerts_section = text[text.index("\n## Alerts\n") :]
    ids = anchors(runbooks)
    for alert in alerts():
        name = alert["alert"]
        assert re.search(rf"^### `?{name}`?$", alerts_section, re.M), f"no runbook for {name}"
        url = alert["annotations"]["runbook_url"]
        assert url == f"docs/operations.md#{slug(name)}", url
        assert slug(name) in ids, f"{url} names no heading of {runbooks}"
        assert alert["labels"]["severity"] in ("warning", "critical")


# --- the PodMonitors against the rendered install ---------------------------------------------


def test_pod_monitors_select_the_rendered_pods_and_ports(tmp_path: Path) -> None:
    monitors = of_kind(build_dir(MONITORING), "PodMonitor")
    installed = build_overlay(
        tmp_path / "syncer",
        "resources: [{deploy}/syncer/overlays/containerd]\n"
        "components: [{deploy}/syncer/components/auth-callout]\n",
    ) + build_overlay(
        tmp_path / "nats",
        "resources: [{deploy}/nats/base]\ncomponents: [{deploy}/monitoring/nats-exporter]\n",
    )
    jobs = set()
    for monitor in monitors:
        spec = monitor["spec"]
        selected = [
            w
            for w in workloads(installed)
            if spec["selector"]["matchLabels"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
            and w["metadata"]["namespace"] == monitor["metadata"]["namespace"]
        ]
        assert len(selected) == 1, monitor["metadata"]["name"]
        labels = selected[0]["spec"]["template"]["metadata"]["labels"]
        jobs.add(labels[spec["jobLabel"]])
        ports = {p["name"] for c in pod_spec(selected[0])["containers"] for p in c.get("ports", [])}
        for endpoint in spec["podMetricsEndpoints"]:
            assert endpoint["port"] in ports, monitor["metadata"]["name"]
    used = set(
        re.findall(r'job="([^"]+)"', yaml.safe_dump(rule_groups()) + "\n".join(panel_exprs()))
    )
    assert (
        used
        == jobs
        == {
            "image-syncer-syncer",
            "image-syncer-broadcaster",
            "image-syncer-auth",
            "nats",
        }
    )


def test_the_dashboard_ships_as_a_configmap_the_grafana_sidecar_loads() -> None:
    config_map = one(build_dir(MONITORING), "ConfigMap", "image-syncer-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["image-syncer.json"]) == dashboard()


# --- every series used is served by the real processes -----------------------------------------

_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def _used_metric_names() -> set[str]:
    text = yaml.safe_dump(rule_groups()) + "\n".join(panel_exprs())
    return set(re.findall(r"\b(image_syncer_[a-z0-9_]+)\b", text))


def _families(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def _served(name: str, families: dict[str, str]) -> bool:
    if families.get(name) in ("gauge", "info"):
        return True
    for suffix in _SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and families.get(base) in ("counter", "histogram", "summary"):
            return suffix != "_bucket" or families[base] == "histogram"
    return False


@pytest.fixture
def broadcaster_metrics(
    kube: FakeKube, nats_server: NatsServer, prefix: str, tmp_path: Path
) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kube.kubeconfig),
        "NATS_URL": nats_server.url,
        "SUBJECT_PREFIX": prefix,
        "METRICS_ADDR": f"127.0.0.1:{port}",
    }
    log_file = tmp_path / "broadcaster.log"
    with log_file.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "image_syncer", "broadcaster"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: _answers(url + "/readyz"),
            timeout=60,
            what="broadcaster",
            process=process,
            log_file=log_file,
        )
        yield url + "/metrics"
    finally:
        stop_process(process)


@pytest.fixture
def syncer_metrics(
    js: JetStreamContext,
    own_containerd: Containerd,
    nats_server: NatsServer,
    prefix: str,
    tmp_path: Path,
) -> Iterator[str]:
    syncer = SyncerProcess(node_name(), own_containerd, nats_server.url, prefix, tmp_path / "s.log")
    syncer.start()
    url = f"http://127.0.0.1:{syncer.port}"
    try:
        wait_until(
            lambda: _answers(url + "/readyz"),
            timeout=60,
            what="syncer",
            process=syncer.process,
            log_file=syncer.log_file,
        )
        yield url + "/metrics"
    finally:
        syncer.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            result: bool = response.status == 200
            return result
    except OSError:
        return False


@pytest.mark.nats
@pytest.mark.cri
def test_every_series_the_rules_and_dashboard_use_is_served(
    js: JetStreamContext, syncer_metrics: str, broadcaster_metrics: str
) -> None:
    served = {**_families(syncer_metrics), **_families(broadcaster_metrics)}
    used = _used_metric_names()
    assert len(used) >= 15
    missing = sorted(name for name in used if not _served(name, served))
    assert missing == [], f"used by deploy/monitoring but served by neither process: {missing}"
