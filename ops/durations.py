"""Go-style durations (``15s``, ``1m30s``, ``250ms``, ``10m``), as Octops' users write them.

Every duration flag and its environment twin goes through :func:`parse_duration`, so ``15s`` means
the same thing everywhere and a typo is refused with the offending text, never read as zero.
"""

from __future__ import annotations

import re

__all__ = ["MAX_DURATION", "DurationError", "format_duration", "parse_duration"]

# No setting of the project means anything beyond a year; a larger value is a typo (a unit
# missing a letter, digits repeated), refused rather than read as "forever".
MAX_DURATION = 366 * 24 * 3600.0

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class DurationError(ValueError):
    """The text is not a Go duration; the message quotes it and shows valid examples."""


def parse_duration(text: str) -> float:
    """Seconds in ``text``. A bare ``0`` is allowed, as in Go; other numbers need a unit."""
    value = text.strip()
    if value == "0":
        return 0.0
    if not value:
        raise DurationError("empty duration; expected e.g. 15s, 1m30s, 250ms")
    position, total = 0, 0.0
    for match in _PART.finditer(value):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(value):
        raise DurationError(f"invalid duration {text!r}; expected e.g. 15s, 1m30s, 250ms")
    if total > MAX_DURATION:
        raise DurationError(
            f"duration {text!r} is longer than a year ({format_duration(MAX_DURATION)}), the "
            "longest any setting takes"
        )
    return total


def format_duration(seconds: float) -> str:
    """The shortest Go-style spelling of ``seconds`` (``90`` -> ``1m30s``)."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms" if seconds else "0s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    frac = seconds - whole
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    if secs or frac or not (hours or minutes):
        parts.append(f"{secs + frac:g}s")
    return "".join(parts)
