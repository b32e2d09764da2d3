"""Options that several commands share, each a flag with an environment-variable twin.

Commands declare ``nats: NatsSettings`` and decorate themselves with :func:`with_nats_options`;
the decorator adds the ``--nats-*`` flags to the command's signature, so every command that talks
to NATS takes the same flags with the same env twins, written once. The other shared options
(:data:`PrefixOption`, :data:`StaleAfterOption`) are declared here once too, and commands take
their defaults from the settings they fill in, never restated.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from ops.durations import DurationError, format_duration, parse_duration
from wire.contract import DEFAULT_PREFIX
from wire.eventlog import LogSettings
from wire.natsconn import DEFAULT_URL, NatsSettings

__all__ = [
    "DEFAULT_DUPLICATE_WINDOW",
    "DEFAULT_PREFIX",
    "DEFAULT_TOMBSTONE_TTL",
    "DuplicateWindowOption",
    "Duration",
    "PrefixOption",
    "StaleAfterOption",
    "TombstoneTtlOption",
    "split_values",
    "with_nats_options",
]

F = TypeVar("F", bound=Callable[..., Any])


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except DurationError as e:
        raise typer.BadParameter(str(e)) from e


def Duration(help: str, envvar: str, *names: str) -> Any:
    """A Go-style duration option (``15s``), parsed to seconds."""
    return typer.Option(*names, help=help, envvar=envvar, parser=_duration, metavar="DURATION")


PrefixOption = Annotated[
    str,
    typer.Option(
        "--subject-prefix",
        envvar="SUBJECT_PREFIX",
        metavar="PREFIX",
        help="First token(s) of every subject; each prefix has its own streams and buckets.",
    ),
]
StaleAfterOption = Annotated[
    float,
    Duration("A node without heartbeat for this long is stale.", "STALE_AFTER", "--stale-after"),
]
# The log's layout, set by ``stream init`` and by the broadcaster that creates missing streams.
TombstoneTtlOption = Annotated[
    float,
    Duration("How long a deleted object's tombstone stays in the log.", "TOMBSTONE_TTL"),
]
DuplicateWindowOption = Annotated[
    float,
    Duration("Window in which a re-published change is dropped.", "DUPLICATE_WINDOW"),
]
# Duration defaults as typer shows them, written from the settings they fill in.
DEFAULT_TOMBSTONE_TTL: Any = format_duration(LogSettings.tombstone_ttl)
DEFAULT_DUPLICATE_WINDOW: Any = format_duration(LogSettings.duplicate_window)


_NATS_PARAMS = [
    inspect.Parameter(
        "nats_url",
        inspect.Parameter.KEYWORD_ONLY,
        default=[DEFAULT_URL],
        annotation=Annotated[
            list[str],
            typer.Option(
                "--nats-url",
                envvar="NATS_URL",
                help="NATS server URL; repeat or comma-separate for a cluster.",
                rich_help_panel="NATS",
            ),
        ],
    ),
    inspect.Parameter(
        "nats_user",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(envvar="NATS_USER", help="NATS user name.", rich_help_panel="NATS"),
        ],
    ),
    inspect.Parameter(
        "nats_password",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(
                envvar="NATS_PASSWORD",
                help="NATS password (prefer the env var).",
                show_default=False,
                rich_help_panel="NATS",
            ),
        ],
    ),
    inspect.Parameter(
        "nats_token",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(
                envvar="NATS_TOKEN",
                help="NATS auth token (prefer the env var).",
                show_default=False,
                rich_help_panel="NATS",
            ),
        ],
    ),
    inspect.Parameter(
        "nats_token_file",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(
                envvar="NATS_TOKEN_FILE",
                help="File holding the NATS auth token (a projected ServiceAccount token), "
                "read again on every reconnect.",
                rich_help_panel="NATS",
            ),
        ],
    ),
    inspect.Parameter(
        "nats_creds",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(envvar="NATS_CREDS", help="NATS .creds file.", rich_help_panel="NATS"),
        ],
    ),
    inspect.Parameter(
        "nats_tls_ca",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(
                envvar="NATS_TLS_CA", help="CA bundle to verify NATS TLS.", rich_help_panel="NATS"
            ),
        ],
    ),
]


def split_values(values: list[str]) -> tuple[str, ...]:
    """Repeated flags and comma- or space-separated env values mean the same list."""
    return tuple(v for raw in values for v in raw.replace(" ", ",").split(",") if v)


def nats_settings_from(
    nats_url: list[str],
    nats_user: str | None,
    nats_password: str | None,
    nats_token: str | None,
    nats_token_file: str | None,
    nats_creds: str | None,
    nats_tls_ca: str | None,
) -> NatsSettings:
    return NatsSettings(
        servers=split_values(nats_url) or (DEFAULT_URL,),
        user=nats_user,
        password=nats_password,
        token=nats_token,
        token_file=nats_token_file,
        creds_file=nats_creds,
        tls_ca=nats_tls_ca,
    )


def with_nats_options(command: F) -> F:
    """Replace the command's ``nats: NatsSettings`` parameter by the ``--nats-*`` flags."""
    # eval_str: modules with `from __future__ import annotations` hold their hints as strings,
    # and typer would silently drop their Annotated options.
    signature = inspect.signature(command, eval_str=True)
    params = [p for p in signature.parameters.values() if p.name != "nats"]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nats_kwargs = {p.name: kwargs.pop(p.name) for p in _NATS_PARAMS}
        return command(*args, nats=nats_settings_from(**nats_kwargs), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*params, *_NATS_PARAMS])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
