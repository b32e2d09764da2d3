"""Catch-up planning (pure) and the fake API server's protocol, through the real client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client, config
from kubernetes.watch.watch import iter_resp_lines
from support.fakekube import FakeKube
from support.fakekube.harness import fleet
from urllib3 import HTTPResponse

from broadcaster.catchup import plan
from broadcaster.ordering import Recorded, newer
from broadcaster.settings import Settings, WatchTarget
from image_syncer.sandbox.fakekube.selectors import SelectorError, parse_selector
from wire.contract import Kind


def obj(name: str, rv: str, uid: str = "u", namespace: str = "default") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"{uid}-{name}",
            "resourceVersion": rv,
        }
    }


def logged(*objects: dict[str, Any], deleted: bool = False) -> dict[tuple[str, str], Recorded]:
    """What the log records: the newest message of each object, as the catch-up reads it."""
    return {
        (o["metadata"]["namespace"], o["metadata"]["name"]): Recorded(o, seq, deleted)
        for seq, o in enumerate(objects, 1)
    }


def summary(
    target: WatchTarget,
    recorded: dict[tuple[str, str], Recorded],
    listed: list[dict[str, Any]],
    list_rv: str = "",
) -> list[tuple[str, str, str]]:
    return [
        (
            p.event_type.split(".")[-1],
            p.obj["metadata"]["name"],
            p.obj["metadata"]["resourceVersion"],
        )
        for p in plan(target, recorded, listed, list_rv)
    ]


def test_plan_publishes_adds_updates_and_missed_deletes_only() -> None:
    recorded = logged(
        obj("same", "1"), obj("changed", "2"), obj("gone", "3"), obj("recreated", "4")
    )
    listed = [
        obj("same", "1"),
        obj("changed", "7"),
        obj("recreated", "8", uid="new"),
        obj("fresh", "9"),
    ]
    assert summary(WatchTarget(Kind.FLEET), recorded, listed) == [
        ("updated", "changed", "7"),
        ("deleted", "recreated", "4"),
        ("added", "recreated", "8"),
        ("added", "fresh", "9"),
        ("deleted", "gone", "3"),
    ]
    update = plan(WatchTarget(Kind.FLEET), recorded, listed)[0]
    assert update.old == recorded[("default", "changed")].obj


def test_plan_publishes_nothing_the_log_already_has_newer() -> None:
    recorded = {
        **logged(obj("ahead", "7"), obj("recreated-later", "9", uid="new")),
        **logged(obj("deleted", "5"), deleted=True),
    }
    listed = [obj("ahead", "6"), obj("recreated-later", "4"), obj("deleted", "5")]
    # Another broadcaster published past this list: nothing here is news for the log.
    assert summary(WatchTarget(Kind.FLEET), recorded, listed, list_rv="6") == []


def test_plan_deletes_only_what_is_older_than_the_list() -> None:
    recorded = logged(obj("missed", "3"), obj("created-after-the-list", "8"))
    # The missed delete is stamped with the list's version: the Fleet was gone by then.
    assert summary(WatchTarget(Kind.FLEET), recorded, [], list_rv="6") == [
        ("deleted", "missed", "6")
    ]


def test_versions_order_by_uid_then_resource_version() -> None:
    tombstone = Recorded(obj("f", "5"), 3, deleted=True)
    assert not newer(obj("f", "4"), False, tombstone) and not newer(obj("f", "5"), False, tombstone)
    assert newer(obj("f", "6"), False, tombstone), "back in the label selector"
    assert not newer(obj("f", "6"), True, tombstone)
    assert newer(obj("f", "6", uid="new"), False, tombstone)
    live = Recorded(obj("f", "5"), 3)
    assert newer(obj("f", "5"), True, live), "the delete of a live object is news"
    assert not newer(obj("f", "5"), False, live) and newer(obj("f", "10"), False, live)
    assert not newer(obj("f", "4", uid="older"), True, live), "a lagging delete of another uid"
    opaque = {"metadata": {"uid": "u", "resourceVersion": "b", "generation": 2}}
    assert not newer(opaque, False, Recorded({**opaque}, 1))
    assert newer(opaque, False, Recorded({"metadata": {"uid": "u", "generation": 1}}, 1))


def test_plan_deletes_only_inside_the_watched_namespace() -> None:
    recorded = logged(obj("x", "1", namespace="a"), obj("y", "2", namespace="b"))
    assert summary(WatchTarget(Kind.FLEET, "a"), recorded, []) == [("deleted", "x", "1")]
    assert summary(WatchTarget(Kind.GAMESERVER), recorded, [])[0][0] == "deleted"


def test_settings_targets_one_per_kind_and_namespace() -> None:
    settings = Settings(kinds=(Kind.FLEET, Kind.GAMESERVER), namespaces=("a", "b", "a"))
    assert [str(t) for t in settings.targets()] == [
        "fleet/a",
        "fleet/b",
        "gameserver/a",
        "gameserver/b",
    ]
    assert [str(t) for t in Settings().targets()] == ["fleet/*"]


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ("", {}, True),
        ("app=x", {"app": "x"}, True),
        ("app==x", {"app": "y"}, False),
        ("app!=x", {}, True),
        ("app in (x, y)", {"app": "y"}, True),
        ("app notin (x,y)", {"app": "y"}, False),
        ("app", {"app": ""}, True),
        ("!app", {"app": "x"}, False),
        ("app in (x),tier=1,!legacy", {"app": "x", "tier": "1"}, True),
        ("app in (x),tier=1,!legacy", {"app": "x", "tier": "1", "legacy": "y"}, False),
        ("agones.dev/fleet=a", {"agones.dev/fleet": "a"}, True),
    ],
)
def test_label_selector_grammar(selector: str, labels: dict[str, str], matches: bool) -> None:
    assert parse_selector(selector)(labels) is matches


@pytest.mark.parametrize("selector", ["app in (x", "=x", "app >< x"])
def test_label_selector_rejects_nonsense(selector: str) -> None:
    with pytest.raises(SelectorError):
        parse_selector(selector)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeKube, client.CustomObjectsApi]]:
    with FakeKube(tmp_path) as kube:
        api_client = config.new_client_from_config(config_file=str(kube.kubeconfig))
        yield kube, client.CustomObjectsApi(api_client)
        api_client.close()


def test_fake_speaks_list_create_replace_delete_and_watch(
    api: tuple[FakeKube, client.CustomObjectsApi],
) -> None:
    kube, custom = api
    args = ("agones.dev", "v1", "default", "fleets")
    # The client types its answers as object; the fake API server answers JSON objects.
    created = cast(dict[str, Any], custom.create_namespaced_custom_object(*args, fleet("a")))
    assert created["metadata"]["uid"] and created["metadata"]["generation"] == 1
    listing = cast(dict[str, Any], custom.list_cluster_custom_object("agones.dev", "v1", "fleets"))
    assert listing["kind"] == "FleetList"
    start = listing["metadata"]["resourceVersion"]
    created["spec"]["replicas"] = 3
    replaced = cast(dict[str, Any], custom.replace_namespaced_custom_object(*args, "a", created))
    assert replaced["metadata"]["generation"] == 2
    with pytest.raises(client.ApiException) as conflict:
        custom.replace_namespaced_custom_object(*args, "a", created)
    assert conflict.value.status == 409
    custom.delete_namespaced_custom_object(*args, "a")
    events = _watch(custom, start, timeout_seconds=1)
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    assert int(events[1]["object"]["metadata"]["resourceVersion"]) > int(start)

    kube.compact()
    expired = _watch(custom, start, timeout_seconds=1)
    assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in expired] == [
        ("ERROR", 410, "Expired")
    ]
    with pytest.raises(client.ApiException) as gone:
        custom.list_cluster_custom_object(
            "agones.dev", "v1", "fleets", resource_version=start, resource_version_match="Exact"
        )
    assert gone.value.status == 410


def _watch(custom: client.CustomObjectsApi, rv: str, **kwargs: Any) -> list[dict[str, Any]]:
    response = custom.list_cluster_custom_object(
        "agones.dev",
        "v1",
        "fleets",
        watch=True,
        resource_version=rv,
        _preload_content=False,
        **kwargs,
    )
    assert isinstance(response, HTTPResponse)
    try:
        return [json.loads(line) for line in iter_resp_lines(response) if line]
    finally:
        response.release_conn()
