"""Failed pulls are classified from the runtime's own error texts (as containerd words them)."""

from __future__ import annotations

import pytest

from wire.pullfailures import PullFailure, classify

PREFIX = 'rpc error: code = Unknown desc = failed to pull and unpack image "r.example/game:1": '


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            PREFIX
            + "failed to resolve reference: pulling from host r.example failed with status code [manifests 1]: 401 Unauthorized",
            PullFailure.AUTH,
        ),
        (
            PREFIX
            + "failed to authorize: failed to fetch anonymous token: unexpected status: 403 Forbidden",
            PullFailure.AUTH,
        ),
        (
            PREFIX + 'failed to resolve reference "r.example/game:1": r.example/game:1: not found',
            PullFailure.NOT_FOUND,
        ),
        (
            PREFIX
            + "unexpected status code 429 Too Many Requests - toomanyrequests: You have reached your pull rate limit",
            PullFailure.RATE_LIMITED,
        ),
        (
            PREFIX
            + 'failed to do request: Head "http://127.0.0.1:5000/v2/game/manifests/1": dial tcp 127.0.0.1:5000: connect: connection refused',
            PullFailure.REGISTRY_UNREACHABLE,
        ),
        (PREFIX + "dial tcp: lookup r.example: no such host", PullFailure.REGISTRY_UNREACHABLE),
        (
            PREFIX + "unexpected status from GET request: 503 Service Unavailable",
            PullFailure.REGISTRY_UNREACHABLE,
        ),
        (
            PREFIX
            + "failed to extract layer: write /var/lib/containerd/tmpmounts/x: no space left on device",
            PullFailure.DISK_FULL,
        ),
        (
            "rpc error: code = DeadlineExceeded desc = context deadline exceeded",
            PullFailure.TIMEOUT,
        ),
        (PREFIX + "failed commit on ref: unexpected commit digest", PullFailure.OTHER),
    ],
)
def test_classify(text: str, expected: PullFailure) -> None:
    assert classify(text) is expected


def test_a_rate_limit_is_not_mistaken_for_auth_even_when_both_words_appear() -> None:
    assert (
        classify("429 Too Many Requests: unauthorized clients are limited")
        is PullFailure.RATE_LIMITED
    )


def test_reasons_are_the_words_the_alerts_route_on() -> None:
    assert {str(f) for f in PullFailure} == {
        "auth",
        "not_found",
        "rate_limited",
        "registry_unreachable",
        "disk_full",
        "timeout",
        "runtime_unavailable",
        "other",
    }
