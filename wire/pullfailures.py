"""Why a pull failed, as one word an alert can route on.

The runtime reports a failed pull as free text wrapping the registry's answer (containerd and
CRI-O alike: ``failed to pull and unpack image ...: 401 Unauthorized``). An on-call person needs
the class, not the text: credentials (auth), a wrong tag (not_found), a registry that throttles
(rate_limited), one that is down (registry_unreachable), a full disk (disk_full), a timeout, or
a runtime that does not answer (runtime_unavailable). The text is matched once here, so the
syncer's metric, the alerts and the broadcaster's Events on Fleets agree on the words.
"""

from __future__ import annotations

import re
from enum import StrEnum

__all__ = ["PullFailure", "classify", "short_error"]


class PullFailure(StrEnum):
    AUTH = "auth"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    REGISTRY_UNREACHABLE = "registry_unreachable"
    DISK_FULL = "disk_full"
    TIMEOUT = "timeout"
    RUNTIME_UNAVAILABLE = "runtime_unavailable"
    OTHER = "other"


# Most specific first: "429 Too Many Requests" must not read as a timeout, and a 401 from a
# token endpoint that also says "not found" is still a credentials problem.
_PATTERNS: tuple[tuple[PullFailure, re.Pattern[str]], ...] = (
    (PullFailure.RATE_LIMITED, re.compile(r"\b429\b|too many requests|toomanyrequests|rate limit")),
    (PullFailure.AUTH, re.compile(r"\b40[13]\b|unauthori[sz]ed|forbidden|denied|authentication")),
    (
        PullFailure.NOT_FOUND,
        re.compile(r"\b404\b|not found|manifest unknown|name unknown|no such image"),
    ),
    (PullFailure.DISK_FULL, re.compile(r"no space left on device|disk quota exceeded")),
    (
        PullFailure.REGISTRY_UNREACHABLE,
        re.compile(
            r"connection refused|no such host|network is unreachable|no route to host"
            r"|connection reset|\b50[234]\b|tls handshake|i/o timeout|eof\b"
        ),
    ),
    (PullFailure.TIMEOUT, re.compile(r"timed out|deadline exceeded|timeout")),
)


def classify(error: str) -> PullFailure:
    """The class of a failed pull from the runtime's error text (OTHER when nothing matches)."""
    text = error.lower()
    for failure, pattern in _PATTERNS:
        if pattern.search(text):
            return failure
    return PullFailure.OTHER


# "401 Unauthorized", "429 Too Many Requests": what a person recognises in a long runtime error.
_HTTP_STATUS = re.compile(r"\b([45]\d\d) ([A-Z][A-Za-z]*(?: [A-Z][A-Za-z]*)*)")


def short_error(error: str, limit: int = 120) -> str:
    """The registry's answer inside a runtime's error, for one line a person reads."""
    match = _HTTP_STATUS.search(error)
    if match:
        return f"{match[1]} {match[2]}"
    tail = error.rsplit(": ", 1)[-1].strip() or error
    return tail if len(tail) <= limit else tail[: limit - 1] + "…"
