"""How one-shot commands (publish, events, stream, status, wait, replay) meet the user.

A long-running process logs and retries; a command run by a person or a pipeline must instead
stop at the first thing it cannot do and say so in one line, with exit 1 for trouble it met
(NATS down, a refused setting) and 2 for input it was given wrong. Every command runs its
coroutine through :func:`run_nats_command` and talks to NATS through :func:`jetstream`, so all
of them fail the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

import nats.errors
import typer
from nats.js import JetStreamContext

from image_syncer.fleets import FleetError
from wire.contract import ContractError
from wire.natsconn import NatsSettings, NatsUnavailable, connect
from wire.nodestatus import StatusError

__all__ = ["CommandError", "fail", "jetstream", "run_nats_command"]

T = TypeVar("T")


class CommandError(Exception):
    """A mistake or situation the user can fix; shown as one line, without a traceback."""


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# What a user can cause (wrong URL, no JetStream, bad input, a server refusing a setting):
# one line each. Anything else is a bug and keeps its traceback.
_USER_ERRORS = (
    NatsUnavailable,
    CommandError,
    FleetError,
    ContractError,
    StatusError,
    nats.errors.Error,
)


def run_nats_command(work: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; user errors become one stderr line and exit 1, Ctrl-C exit 130."""
    try:
        return asyncio.run(work)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except nats.errors.NoRespondersError:
        fail("no JetStream responded: is the server started with JetStream enabled (-js)?")
    except _USER_ERRORS as e:
        fail(" ".join(str(e).split()) or type(e).__name__)


@asynccontextmanager
async def jetstream(settings: NatsSettings, name: str) -> AsyncIterator[JetStreamContext]:
    """A JetStream context on a fresh connection that fails fast, closed on the way out."""
    nc = await connect(settings, name=name, retry_forever=False)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()
