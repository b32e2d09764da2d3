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
import urllib.parse
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from ops.durations import DurationError, format_duration, parse_duration
from wire.contract import DEFAULT_PREFIX, ContractError, check_prefix
from wire.eventlog import LogSettings
from wire.natsconn import DEFAULT_URL, NatsSettings

__all__ = [
    "DEFAULT_DUPLICATE_WINDOW",
    "DEFAULT_PREFIX",
    "DEFAULT_TOMBSTONE_TTL",
    "NATS_PARAMS",
    "NATS_SCHEMES",
    "Count",
    "DuplicateWindowOption",
    "Duration",
    "PrefixOption",
    "StaleAfterOption",
    "TombstoneTtlOption",
    "check_nats_url",
    "count_parser",
    "duration_parser",
    "nats_settings_from",
    "prefix_parser",
    "split_values",
    "with_nats_options",
]

F = TypeVar("F", bound=Callable[..., Any])


def duration_parser(text: str) -> float:
    try:
        return parse_duration(text)
    except DurationError as e:
        raise typer.BadParameter(str(e)) from e


def Duration(help: str, envvar: str, *names: str) -> Any:
    """A Go-style duration option (``15s``), parsed to seconds, at most a year."""
    return typer.Option(
        *names, help=help, envvar=envvar, parser=duration_parser, metavar="DURATION"
    )


def count_parser(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str | int) -> int:
        # typer hands the default over as it is written: an int.
        try:
            value = text if isinstance(text, int) else int(text.strip())
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise typer.BadParameter(f"{text!r} is not a whole number from {low} to {high}")
        return value

    return parse


def Count(help: str, envvar: str, low: int, high: int, *names: str) -> Any:
    """A whole number from ``low`` to ``high`` (both in the help), refused outside them."""
    return typer.Option(
        *names,
        help=f"{help} ({low}-{high})",
        envvar=envvar,
        parser=count_parser(low, high),
        metavar="N",
    )


def prefix_parser(text: str) -> str:
    try:
        return check_prefix(text)
    except ContractError as e:
        raise typer.BadParameter(str(e)) from e


PrefixOption = Annotated[
    str,
    typer.Option(
        "--subject-prefix",
        envvar="SUBJECT_PREFIX",
        metavar="PREFIX",
        parser=prefix_parser,
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


NATS_PARAMS = [
    inspect.Parameter(
        "nats_url",
        inspect.Parameter.KEYWORD_ONLY,
        default=[DEFAULT_URL],
        annotation=Annotated[
            list[str],
            typer.Option(
                "--nats-url",
                envvar="NATS_URL",
                metavar="URL",
                help="NATS server URL (nats://, tls://, ws://, wss://); repeat or "
                "comma-separate for a cluster.",
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
            typer.Option(
                envvar="NATS_USER", metavar="USER", help="NATS user name.", rich_help_panel="NATS"
            ),
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
                metavar="PASSWORD",
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
                metavar="TOKEN",
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
                metavar="PATH",
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
            typer.Option(
                envvar="NATS_CREDS",
                metavar="PATH",
                help="NATS .creds file.",
                rich_help_panel="NATS",
            ),
        ],
    ),
    inspect.Parameter(
        "nats_tls_ca",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(
                envvar="NATS_TLS_CA",
                metavar="PATH",
                help="CA bundle to verify NATS TLS.",
                rich_help_panel="NATS",
            ),
        ],
    ),
]


def split_values(values: list[str]) -> tuple[str, ...]:
    """Repeated flags and comma- or space-separated env values mean the same list."""
    return tuple(v for raw in values for v in raw.replace(" ", ",").split(",") if v)


NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def check_nats_url(url: str) -> str:
    """``url`` if it is ``SCHEME://[USER[:PASSWORD]@]HOST[:PORT]`` with a scheme NATS clients
    speak, else ``typer.BadParameter`` naming the problem: parsed before any connection, so a
    typo is not reported seconds later as a DNS or network error."""
    shown = url.rsplit("@", 1)[-1] if "@" in url else url  # never echo a password
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in NATS_SCHEMES:
        raise typer.BadParameter(
            f"{shown!r} is not a NATS URL: expected SCHEME://HOST[:PORT], scheme one of "
            f"{', '.join(NATS_SCHEMES)}"
        )
    parts = urllib.parse.urlsplit(url)
    if any(c.isspace() for c in url) or not parts.hostname:
        raise typer.BadParameter(f"{shown!r} has no valid host: expected {scheme}://HOST[:PORT]")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise typer.BadParameter(f"{shown!r}: the port must be a number from 1 to 65535")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise typer.BadParameter(f"{shown!r}: a NATS URL has no path, query or fragment")
    return url


def nats_settings_from(
    nats_url: list[str],
    nats_user: str | None,
    nats_password: str | None,
    nats_token: str | None,
    nats_token_file: str | None,
    nats_creds: str | None,
    nats_tls_ca: str | None,
) -> NatsSettings:
    hint = "'--nats-url' / NATS_URL"
    for raw in nats_url:
        tokens = split_values([raw])
        if len(tokens) > 1 and any("://" not in token for token in tokens):
            # "nats://not a url" would read as three URLs, two without a scheme.
            raise typer.BadParameter(
                f"{raw.rsplit('@', 1)[-1]!r} is not a NATS URL: a URL holds no space (several "
                "URLs are separated by commas or spaces, each SCHEME://HOST[:PORT])",
                param_hint=hint,
            )
    servers = split_values(nats_url) or (DEFAULT_URL,)
    for server in servers:
        try:
            check_nats_url(server)
        except typer.BadParameter as e:
            # Named like click names a flag, and raised as a usage error: exit 2.
            raise typer.BadParameter(e.message, param_hint=hint) from None
    return NatsSettings(
        servers=servers,
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
        nats_kwargs = {p.name: kwargs.pop(p.name) for p in NATS_PARAMS}
        return command(*args, nats=nats_settings_from(**nats_kwargs), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*params, *NATS_PARAMS])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
