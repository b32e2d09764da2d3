"""Settings fields that declare their own command-line flag, so a flag is written down once.

A settings section is a frozen dataclass with a ``panel`` class attribute (the title of its help
panel); each of its fields says its flag in its metadata::

    timeout: float = field(
        default=600.0,
        metadata=flag("--pull-timeout", env="PULL_TIMEOUT", help="...", kind=Kind.DURATION),
    )

The CLI turns every such field into a typer option (``image_syncer.settingsflags``), and the
settings' own checks name the flag a user typed (:func:`flag_of`), not the field. This module
knows nothing of typer: the syncer's settings import it, and the syncer never imports the CLI.
A field whose type is a section is a group of flags; any other field without a flag (the NATS
connection) is filled in whole by whoever builds the settings.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "Flag",
    "Kind",
    "build",
    "flag",
    "flag_of",
    "flagged_fields",
    "is_section",
    "override",
    "require_positive",
    "section_fields",
]

T = TypeVar("T")

_KEY = "flag"


class Kind(enum.Enum):
    """How a flag's value is written on the command line (the CLI picks the parser)."""

    PLAIN = "plain"  # as the field's type says: text, optional text, or a --x/--no-x switch
    DURATION = "duration"  # a Go duration (15s), seconds in the field
    COUNT = "count"  # a whole number from ``low`` to ``high``, the range shown in the help
    NUMBER = "number"  # a whole number of at least ``low``
    PERCENT = "percent"  # 80% (or 0.8), a fraction in the field
    LIST = "list"  # repeatable and comma- or space-separated, a tuple in the field
    PREFIX = "prefix"  # a subject prefix, checked as the wire contract says


@dataclass(frozen=True)
class Flag:
    """One field's flag: its name, its environment twin, its help and how it is parsed."""

    name: str
    env: str
    help: str
    kind: Kind = Kind.PLAIN
    metavar: str | None = None
    low: int | None = None
    high: int | None = None
    # The help panel, when not the section's (a root setting shown beside the ones it shapes).
    panel: str | None = None

    @property
    def param(self) -> str:
        """The name of the command's parameter: ``--pull-timeout`` -> ``pull_timeout``."""
        return self.name.removeprefix("--").replace("-", "_")


def flag(
    name: str,
    *,
    env: str,
    help: str,
    kind: Kind = Kind.PLAIN,
    metavar: str | None = None,
    low: int | None = None,
    high: int | None = None,
    panel: str | None = None,
) -> dict[str, Flag]:
    """The metadata of a field set by the flag ``name`` (and the environment variable ``env``)."""
    if kind is Kind.COUNT and (low is None or high is None):
        raise TypeError(f"{name}: a count needs both bounds")
    return {_KEY: Flag(name, env, help, kind, metavar, low, high, panel)}


def is_section(kind: Any) -> bool:
    """Whether ``kind`` is a settings section (a dataclass with a help panel)."""
    return dataclasses.is_dataclass(kind) and isinstance(getattr(kind, "panel", None), str)


_FIELDS: dict[type, tuple[tuple[dataclasses.Field[Any], Any], ...]] = {}


def section_fields(section: type) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    """The fields of ``section`` with their resolved types, in declaration order."""
    if section not in _FIELDS:
        hints = typing.get_type_hints(section)
        _FIELDS[section] = tuple((f, hints[f.name]) for f in dataclasses.fields(section) if f.init)
    return _FIELDS[section]


def flagged_fields(section: type) -> Iterator[tuple[type, dataclasses.Field[Any], Any, Flag]]:
    """Every flagged field of ``section`` and of the sections within, depth first in declaration
    order (the order of the help): ``(owning section, field, type, flag)``."""
    for f, kind in section_fields(section):
        spec = f.metadata.get(_KEY)
        if spec is not None:
            yield section, f, kind, spec
        elif is_section(kind):
            yield from flagged_fields(kind)


def flag_of(section: object, name: str) -> str:
    """The flag that sets the field ``name`` of ``section`` (``--pull-timeout``), or the field's
    own name when no flag sets it: what an error about that field should say."""
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        if f.name == name:
            spec = f.metadata.get(_KEY)
            return spec.name if isinstance(spec, Flag) else name
    raise AttributeError(f"{type(section).__name__} has no field {name!r}")


def require_positive(section: object, *names: str) -> None:
    """Refuse the first of ``names`` that is zero or negative, naming its flag."""
    for name in names:
        if getattr(section, name) <= 0:
            raise ValueError(f"{flag_of(section, name)} must be positive")


def build(section: type[T], values: Mapping[str, Any]) -> T:
    """``section`` filled in from ``values``, keyed by flag parameter (``pull_timeout``) for
    flagged fields and by field name for the others; what ``values`` leaves out keeps its
    default. Each section checks itself as it is built (a ValueError naming the flag)."""
    kwargs: dict[str, Any] = {}
    for f, kind in section_fields(section):
        spec = f.metadata.get(_KEY)
        key = spec.param if isinstance(spec, Flag) else f.name
        if key in values:
            kwargs[f.name] = values[key]
        elif spec is None and is_section(kind):
            kwargs[f.name] = build(kind, values)
    return section(**kwargs)


def override(settings: T, **values: Any) -> T:
    """``settings`` with some flags set otherwise, keyed as :func:`build` keys them, in whichever
    section they live: ``override(settings, pull_timeout=30.0, status_interval=0.2)``."""
    changed, left = _override(settings, values)
    if left:
        raise TypeError(f"no such setting: {', '.join(sorted(left))}")
    return changed


def _override(settings: T, values: Mapping[str, Any]) -> tuple[T, set[str]]:
    left = set(values)
    changes: dict[str, Any] = {}
    for f, kind in section_fields(type(settings)):
        spec = f.metadata.get(_KEY)
        key = spec.param if isinstance(spec, Flag) else f.name
        if key in values:
            changes[f.name] = values[key]
            left.discard(key)
        elif spec is None and is_section(kind):
            inner, inner_left = _override(getattr(settings, f.name), values)
            if inner_left != set(values):
                changes[f.name] = inner
                left &= inner_left
    return (dataclasses.replace(settings, **changes) if changes else settings), left  # type: ignore[type-var]
