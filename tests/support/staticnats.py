"""The static install of deploy/nats in a real nats-server: its config files as the pods mount
them, its users' passwords, logins, and the server's own word on what it refused.

Shared by the tests of the static accounts (tests/deploy/test_deploy_nats.py) and of the
read-only ``reader`` user (tests/deploy/test_deploy_nats_reader.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client

from image_syncer.sandbox.nats_server import nats_server_binary
from image_syncer.sandbox.processes import free_port, stop_process, wait_until
from support.deploy import nats_config_files
from support.polling import eventually
from wire.permissions import PASSWORD_ENV

__all__ = [
    "PASSWORDS",
    "Server",
    "login",
    "no_violations",
    "password_env",
    "route_env",
    "running",
    "violation",
    "write_config",
]

PASSWORDS = {user: f"pw-{user}-{os.getpid()}" for user in PASSWORD_ENV}


def password_env() -> dict[str, str]:
    """What the StatefulSet fills from the Secret: each user's password variable."""
    return {PASSWORD_ENV[user]: password for user, password in PASSWORDS.items()}


def route_env() -> dict[str, str]:
    # What the StatefulSet composes from the Secret (test_deploy_nats_routes runs it for real).
    password = f"route-{os.getpid()}"
    return {
        "NATS_ROUTE_PASSWORD": password,
        "NATS_ROUTES": f"[nats://route:{password}@127.0.0.1:{free_port()}]",
    }


def write_config(name: str, directory: Path) -> Path:
    """The pod's /etc/nats, with only the in-pod paths moved into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    files = nats_config_files(name)
    conf = files["nats.conf"]
    for pod_path, local in (("/data", directory / "data"), ("/var/run/nats", directory)):
        assert pod_path in conf
        conf = conf.replace(f"{pod_path}/", f"{local}/")
    (directory / "nats.conf").write_text(conf)
    (directory / "auth.conf").write_text(files["auth.conf"])
    return directory / "nats.conf"


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_file: Path
    # (user, error) as each client's error callback heard them.
    errors: list[tuple[str, str]] = field(default_factory=list)


@contextlib.contextmanager
def running(directory: Path) -> Iterator[Server]:
    """deploy/nats/single's config in a real server, the passwords in its environment."""
    config = write_config("nats/single", directory)
    port, monitor = free_port(), free_port()
    command = [nats_server_binary(), "-c", str(config), "-a", "127.0.0.1"]
    command += ["-p", str(port), "-m", str(monitor)]
    log_file = directory / "nats.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            command,
            env={**os.environ, "SERVER_NAME": "nats-0", **password_env()},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready() -> bool:
        url = f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"
        with urllib.request.urlopen(url, timeout=1) as response:
            result: bool = response.status == 200
            return result

    try:
        wait_until(ready, timeout=30, what="nats-server (deploy config)", process=process,
                   log_file=log_file)  # fmt: skip
        yield Server(f"nats://127.0.0.1:{port}", process, log_file)
    finally:
        stop_process(process)


async def login(server: Server, user: str, *, inbox_prefix: str | None = None) -> Client:
    """``user`` with its password; what the server refuses it lands in ``server.errors``."""

    async def on_error(e: Exception) -> None:
        server.errors.append((user, str(e)))

    options = {"inbox_prefix": inbox_prefix.encode()} if inbox_prefix else {}
    return await nats.connect(
        server.url,
        user=user,
        password=PASSWORDS[user],
        error_cb=on_error,
        name=f"test-{user}",
        allow_reconnect=False,
        **options,
    )


async def violation(server: Server, user: str, subject: str) -> None:
    """Return once the server reported a permissions violation on ``subject`` to ``user``."""
    wanted = f'"{subject.lower()}"'

    def denied() -> bool:
        hits = [e for u, e in server.errors if u == user and wanted in e.lower()]
        return any("permissions violation" in e.lower() for e in hits)

    await eventually(denied, lambda: f"{user} denied {subject}; errors seen: {server.errors}")


def no_violations(server: Server, user: str) -> None:
    mine = [e for u, e in server.errors if u == user]
    assert not [e for e in mine if "permissions violation" in e.lower()], mine
