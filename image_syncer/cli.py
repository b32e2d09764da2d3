"""The ``image-syncer`` command: the roof of the project.

It only turns flags into settings and calls into ``broadcaster``, ``syncer`` and ``wire``; no logic
of its own lives here. Each group of commands sits in its own module under ``commands/``.
"""

from __future__ import annotations

import sys
from typing import Annotated, Protocol, cast

import typer

from image_syncer.commands import (
    auth,
    broadcaster,
    crio,
    demo,
    events,
    publish,
    replay,
    status,
    stream,
    syncer,
    wait,
)
from ops.logs import LogFormat, configure

_LOG_FORMATS: dict[str, LogFormat] = {"logfmt": "logfmt", "json": "json"}

app = typer.Typer(
    name="image-syncer",
    help="Pre-pull the images of Agones Fleets onto every node, from a NATS JetStream event log.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def root(
    log_level: Annotated[
        str, typer.Option(envvar="LOG_LEVEL", help="debug, info, warning or error.")
    ] = "info",
    log_format: Annotated[
        str, typer.Option(envvar="LOG_FORMAT", help="logfmt or json.")
    ] = "logfmt",
) -> None:
    fmt = _LOG_FORMATS.get(log_format)
    if fmt is None:
        raise typer.BadParameter("must be logfmt or json", param_hint="--log-format")
    configure(log_level, fmt)


for module in (
    stream,
    publish,
    events,
    broadcaster,
    syncer,
    auth,
    status,
    wait,
    replay,
    crio,
    demo,
):
    module.register(app)


class _UsageError(Protocol):
    """What the handler below reads of click's UsageError."""

    ctx: typer.Context | None
    exit_code: int

    def format_message(self) -> str: ...


# typer vendors click and exports only BadParameter; its base class is click's UsageError.
_USAGE_ERROR: type[Exception] = typer.BadParameter.__mro__[1]


def main() -> None:
    """The console script: usage errors are one ``error:`` line, as every other refusal is."""
    try:
        code = app(standalone_mode=False)
    except _USAGE_ERROR as e:
        error = cast(_UsageError, e)
        hint = f" (see: {error.ctx.command_path} --help)" if error.ctx is not None else ""
        typer.echo(f"error: {error.format_message()}{hint}", err=True)
        sys.exit(error.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
