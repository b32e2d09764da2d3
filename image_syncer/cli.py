"""The ``image-syncer`` command: the roof of the project.

It only turns flags into settings and calls into ``broadcaster``, ``syncer`` and ``wire``; no logic
of its own lives here. Each group of commands sits in its own module under ``commands/``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated, Protocol, cast

import typer

from image_syncer.helpformat import use_panelled_help
from ops.logs import LogFormat, configure

_LOG_FORMATS: dict[str, LogFormat] = {"logfmt": "logfmt", "json": "json"}

# Command name -> the module under image_syncer.commands that registers it. Only the module of
# the command being run is imported: one syncer per node must not pay in memory for the status
# tables, the publisher or the broadcaster's settings it never uses.
COMMANDS = {
    "stream": "stream",
    "publish": "publish",
    "events": "events",
    "broadcaster": "broadcaster",
    "syncer": "syncer",
    "auth": "auth",
    "auth-keygen": "auth",
    "status": "status",
    "wait": "wait",
    "rollout": "rollout",
    "replay": "replay",
    "crio-pinned-config": "crio",
    "demo": "demo",
}
# Options of the root callback that take a value (so the value is not taken for a command).
_ROOT_VALUE_OPTIONS = ("--log-level", "--log-format")


def _version(value: bool) -> None:
    if not value:
        return
    # Imported here: every other command starts without them.
    from ops.buildinfo import package_version
    from wire.nodestatus import SCHEMA

    # The CLI and the DaemonSet are upgraded together: the schema says which entries it reads.
    typer.echo(f"image-syncer {package_version()} (node status schema {SCHEMA})")
    raise typer.Exit()


def root(
    log_level: Annotated[
        str,
        typer.Option(envvar="LOG_LEVEL", metavar="LEVEL", help="debug, info, warning or error."),
    ] = "info",
    log_format: Annotated[
        str, typer.Option(envvar="LOG_FORMAT", metavar="FORMAT", help="logfmt or json.")
    ] = "logfmt",
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            help="Print the version and the node status schema it reads, and exit.",
        ),
    ] = False,
) -> None:
    fmt = _LOG_FORMATS.get(log_format)
    if fmt is None:
        raise typer.BadParameter("must be logfmt or json", param_hint="--log-format")
    configure(log_level, fmt)


def build_app(command: str | None = None) -> typer.Typer:
    """The CLI with every command, or only ``command``'s module when it is one we know."""
    app = typer.Typer(
        name="image-syncer",
        help="Pre-pull the images of Agones Fleets onto every node, from a NATS JetStream event "
        "log.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    app.callback()(root)
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        importlib.import_module(f"image_syncer.commands.{module}").register(app)
    use_panelled_help(app)
    return app


def command_of(args: list[str]) -> str | None:
    """The command named on the command line, skipping the root options before it."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _ROOT_VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def __getattr__(name: str) -> typer.Typer:
    # ``from image_syncer.cli import app``: the whole CLI, built on first use.
    if name == "app":
        return build_app()
    raise AttributeError(name)


class _UsageError(Protocol):
    """What the handler below reads of click's UsageError."""

    ctx: typer.Context | None
    exit_code: int

    def format_message(self) -> str: ...


# typer vendors click and exports only BadParameter; its base class is click's UsageError.
_USAGE_ERROR: type[Exception] = typer.BadParameter.__mro__[1]


def main() -> None:
    """The console script: usage errors are one ``error:`` line, as every other refusal is."""
    app = build_app(command_of(sys.argv[1:]))
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
