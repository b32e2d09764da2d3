"""Checks a long-running process makes on its flags before it starts anything.

A DaemonSet pod that fails only once its NATS connection, its runtime and its loops are up
crash-loops with a traceback at the end of a page of logs. Whatever can be known wrong from the
flags alone (an address that does not parse, a port someone else holds, a file that cannot be
read) is refused here instead, as one ``error:`` line and exit code 2 (a usage error), before the
first connection.
"""

from __future__ import annotations

import socket

import typer

from ops.serving import parse_addr

__all__ = ["check_listen", "check_readable", "missing_extra"]


def check_listen(addr: str, flag: str) -> None:
    """``addr`` parses as ``[host]:port`` and the port can be bound now; "" means off."""
    if not addr:
        return
    try:
        host, port = parse_addr(addr)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from e
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As asyncio's server binds: a port in TIME_WAIT is free, one listened on is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise typer.BadParameter(
            f"cannot listen on {addr}: {e.strerror or e}", param_hint=flag
        ) from e


def check_readable(path: str | None, flag: str) -> None:
    """``path`` (if set) is a file this process can read."""
    if not path:
        return
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise typer.BadParameter(f"cannot read {path}: {e.strerror or e}", param_hint=flag) from e


def missing_extra(module: str, extra: str, command: str) -> str | None:
    """One line saying which extra to install when ``module`` cannot be imported, else None."""
    try:
        __import__(module)
    except ImportError:
        return (
            f"`image-syncer {command}` needs the {extra!r} extra, which this install lacks "
            f"(no module {module!r}): pip install 'image-syncer[{extra}]'"
        )
    return None
