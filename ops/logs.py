"""Log lines for machines and people: logfmt by default, JSON on request.

Code logs a short fixed message and puts the facts in ``extra``::

    log.info("fleet synced", extra={"fleet": "default/simple", "image": img, "ref": ref})

which renders as ``ts=... level=info logger=syncer.pulling.inventory msg="fleet synced"
fleet=default/simple image=... ref=...``. The fixed message keeps lines greppable (Octops
image-syncer's (Go) ``image already present`` and ``fleet synced`` stay exactly as operators know
them); the fields make them queryable.
Only the CLI calls :func:`configure`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from typing import IO, Any, Literal

__all__ = ["LogFormat", "configure", "configured", "describe_error", "fields_of"]

LogFormat = Literal["logfmt", "json"]

# What the last configure() was asked for, so a process that re-executes itself can pass it on.
_configured: tuple[str, LogFormat] = ("info", "logfmt")


def configured() -> tuple[str, LogFormat]:
    """The level and format of the last :func:`configure`."""
    return _configured


# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def describe_error(error: BaseException) -> str:
    """An exception as one log field: its message on one line, its type when it has none."""
    return (str(error) or type(error).__name__).replace("\n", " ")


_NEEDS_QUOTES = re.compile(r'[\s="\\]')


@functools.lru_cache(maxsize=4)
def _second(created: int) -> str:
    # A busy process logs many lines per second; format each second once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))


def _timestamp(record: logging.LogRecord) -> str:
    return f"{_second(int(record.created))}.{int(record.msecs):03d}Z"


def _document(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, Any]:
    """The line's facts in order: time, level, logger, message, then the ``extra`` fields."""
    doc = {
        "ts": _timestamp(record),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
        **fields_of(record),
    }
    if record.exc_info:
        doc["exc"] = formatter.formatException(record.exc_info)
    return doc


def _logfmt_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float):
        text = str(value).lower() if isinstance(value, bool) else str(value)
    else:
        text = json.dumps(value, default=str)
    if not text or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = _document(record, self)
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in doc.items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_document(record, self), default=str)


def configure(
    level: str = "info", fmt: LogFormat = "logfmt", stream: IO[str] | None = None
) -> None:
    """Send every log line to ``stream`` (stderr by default); calling it again replaces it.

    Lines are written in the caller's thread on purpose: a writer thread (QueueHandler) was
    measured slower for a syncer, whose formatting is CPU work that contends for the GIL.
    """
    global _configured
    _configured = (level, fmt)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The clients' own chatter is debug-level for us.
    for noisy in ("kubernetes", "urllib3", "grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
