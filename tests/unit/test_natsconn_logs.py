"""The NATS connection's own log lines: a constant message, the facts as logfmt fields.

A field inside the message (``msg="nats disconnected servers=..."``) cannot be filtered or
aggregated by a log pipeline, and its value is never quoted; the formatter quotes fields.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ops.logs import fields_of
from wire.natsconn import NatsSettings, _options, read_token_file


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, object]]]:
    return [(r.getMessage(), fields_of(r)) for r in caplog.records if r.name == "wire.natsconn"]


async def test_connection_events_carry_their_facts_as_fields_without_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = NatsSettings(servers=("nats://node:s3cret@127.0.0.1:4222", "nats://10.0.0.2:4222"))
    options = _options(settings, "test")
    with caplog.at_level(logging.INFO, logger="wire.natsconn"):
        await options["disconnected_cb"]()
        await options["reconnected_cb"]()
        await options["error_cb"](OSError("connection refused\nby peer"))
    servers = "nats://127.0.0.1:4222,nats://10.0.0.2:4222"
    assert _lines(caplog) == [
        ("nats disconnected", {"servers": servers}),
        ("nats reconnected", {"servers": servers}),
        ("nats error", {"error": "connection refused by peer"}),
    ]
    assert "s3cret" not in caplog.text


def test_an_unreadable_token_file_is_one_line_with_its_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "token"
    with caplog.at_level(logging.INFO, logger="wire.natsconn"):
        assert read_token_file(str(missing)) == ""
    [(message, fields)] = _lines(caplog)
    assert message == "nats token file unreadable"
    assert fields["path"] == str(missing)
    assert "No such file or directory" in str(fields["error"])
