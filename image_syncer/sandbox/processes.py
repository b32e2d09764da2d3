"""Shared plumbing for the sandbox launchers: free ports, readiness polling, process teardown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

__all__ = ["ManagedProcess", "MissingComponent", "free_port", "stop_process", "wait_until"]


class MissingComponent(RuntimeError):
    """A real component (binary) is not installed; the message says how to install it."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    log_file: Path | None = None,
) -> None:
    """Poll ``check`` until it is true; fail with the process' log tail if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {_tail(log_file)}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s: {_tail(log_file)}")


def _tail(log_file: Path | None, lines: int = 15) -> str:
    if log_file is None or not log_file.exists():
        return "(no log)"
    return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])


def stop_process(
    process: subprocess.Popen[bytes] | None, *, kill: bool = False, timeout: float = 10
) -> None:
    """SIGTERM (or SIGKILL) the process group and reap it; safe to call twice."""
    if process is None or process.poll() is not None:
        return
    sig = signal.SIGKILL if kill else signal.SIGTERM
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


class ManagedProcess:
    """What every sandbox daemon shares: spawn with a log file, wait, stop, restart, ``with``.

    Subclasses hold ``process`` and ``log_file`` and implement ``start()``, which spawns with
    :meth:`_spawn` and waits with :meth:`_await_ready`.
    """

    process: subprocess.Popen[bytes] | None

    @property
    def log_file(self) -> Path:
        raise NotImplementedError

    def start(self) -> ManagedProcess:
        raise NotImplementedError

    def _spawn(self, command: list[str], env: dict[str, str] | None = None) -> None:
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )

    def _await_ready(self, check: Callable[[], bool], *, timeout: float, what: str) -> None:
        wait_until(check, timeout=timeout, what=what, process=self.process, log_file=self.log_file)

    def stop(self, *, kill: bool = False) -> None:
        stop_process(self.process, kill=kill)
        self.process = None

    def restart(self, *, kill: bool = False) -> None:
        """Stop and start again with the same ports and state, as a real restart would."""
        self.stop(kill=kill)
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
