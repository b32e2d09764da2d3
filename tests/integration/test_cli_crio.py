"""``image-syncer crio-pinned-config``: CRI-O's pinned_images drop-in from the real event log."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import pytest
from nats.js import JetStreamContext
from support.syncer_harness import cli, fleet, settings_fixture  # noqa: F401 - fixture

from syncer.keeping.criopins import pinned_images_dropin
from syncer.settings import SyncerSettings
from wire.contract import NodeImages
from wire.eventlog import LogSettings, ensure_node_images_stream, publish_event, publish_node_images

pytestmark = pytest.mark.nats

ARENA = "registry.example.com/games/arena:1.0"


def labelled(name: str, *images: str, **labels: str) -> dict[str, Any]:
    body = fleet(name, *images)
    body["metadata"]["labels"] = labels
    return body


async def test_the_dropin_pins_the_live_admitted_fleets_images_and_the_extras(
    settings: SyncerSettings, js: JetStreamContext, log_settings: LogSettings
) -> None:
    await publish_event(
        js, log_settings, "fleet.events.added", labelled("arena", ARENA, "nginx", pool="games")
    )
    await publish_event(
        js, log_settings, "fleet.events.added", labelled("tools", "busybox:1.36", pool="tools")
    )
    gone = labelled("gone", "registry.example.com/games/old:0.9", pool="games")
    await publish_event(js, log_settings, "fleet.events.added", gone)
    await publish_event(js, log_settings, "fleet.events.deleted", gone)
    await ensure_node_images_stream(js, log_settings)
    sidecar = NodeImages(
        source="agones-sdk", images=["us-docker.pkg.dev/agones-images/release/agones-sdk:1.44.0"]
    )
    await publish_node_images(js, log_settings, sidecar)

    code, out, err = await cli(
        settings,
        "crio-pinned-config",
        "--fleet-selector",
        "pool=games",
        "--extra-image",
        "registry.k8s.io/pause:3.9",
    )

    assert code == 0, err
    config = tomllib.loads(out)
    assert config == {
        "crio": {
            "image": {
                "pinned_images": [
                    "docker.io/library/nginx:latest",
                    ARENA,
                    "registry.k8s.io/pause:3.9",
                    "us-docker.pkg.dev/agones-images/release/agones-sdk:1.44.0",
                ]
            }
        }
    }
    assert "/etc/crio/crio.conf.d/" in out


async def test_json_lists_the_images_per_fleet(
    settings: SyncerSettings, js: JetStreamContext, log_settings: LogSettings
) -> None:
    await publish_event(js, log_settings, "fleet.events.added", fleet("arena", ARENA))

    code, out, err = await cli(settings, "crio-pinned-config", "--json")

    assert code == 0, err
    assert json.loads(out) == {"fleets": {"default/arena": [ARENA]}, "node_images": {}, "extra": []}


async def test_a_missing_stream_is_one_line(settings: SyncerSettings) -> None:
    code, _, err = await cli(settings, "crio-pinned-config")

    assert code == 1
    assert err.startswith("error: stream ") and err.count("\n") == 1


async def test_a_bad_selector_is_a_usage_error(settings: SyncerSettings) -> None:
    code, _, err = await cli(settings, "crio-pinned-config", "--fleet-selector", "a in (")

    assert code == 2
    assert err.startswith("error:")


def test_an_empty_log_pins_nothing_and_is_still_valid_toml() -> None:
    assert tomllib.loads(pinned_images_dropin([])) == {"crio": {"image": {"pinned_images": []}}}
