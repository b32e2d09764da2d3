"""A command's settings as flags, generated from the settings' own fields.

A command declares ``settings: SomeSettings`` and decorates itself with
:func:`with_settings_options`: every field that declares its flag (:mod:`ops.flagfields`), in the
root and in each of its sections, becomes one typer option with its environment twin, help,
metavar, parser and help panel (its section's); a ``NatsSettings`` field becomes the ``--nats-*``
flags of :func:`~image_syncer.options.with_nats_options`. The command receives the settings
built from the parsed values, each section checked as it is built; a refusal is a usage error
naming the flag. Defaults come from the fields, so ``--help`` shows what the settings hold.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

import typer

from image_syncer.options import (
    NATS_PARAMS,
    count_parser,
    duration_parser,
    nats_settings_from,
    prefix_parser,
    split_values,
)
from ops.durations import format_duration
from ops.flagfields import Flag, Kind, build, flagged_fields, is_section, section_fields
from wire.natsconn import NatsSettings

__all__ = ["settings_params", "with_settings_options"]

F = TypeVar("F", bound=Callable[..., Any])


def _percent(text: str) -> float:
    # Imported when parsed: the help does not pay for the disk budget's imports.
    from syncer.keeping.diskbudget import parse_percent

    try:
        return parse_percent(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"the setting {f.name} has no default to show")


def _parsing(spec: Flag, kind: Any, default: Any) -> tuple[Any, dict[str, Any], Any]:
    """For a flag of this kind: the Python type typer sees, how the option parses and shows its
    value, and the default as typer shows it and parses it back (``15s``, ``80%``)."""
    match spec.kind:
        case Kind.DURATION:
            return (
                float,
                {"parser": duration_parser, "metavar": "DURATION"},
                format_duration(default),
            )
        case Kind.COUNT:
            assert spec.low is not None and spec.high is not None
            return int, {"parser": count_parser(spec.low, spec.high), "metavar": "N"}, default
        case Kind.NUMBER:
            return int, {"min": spec.low}, default
        case Kind.PERCENT:
            return float, {"parser": _percent, "metavar": "PERCENT"}, f"{default:.0%}"
        case Kind.LIST:
            return list[str], {}, list(default)
        case Kind.PREFIX:
            return str, {"parser": prefix_parser}, default
    return kind, {}, default


def _option(spec: Flag, kind: Any, default: Any, panel: str) -> tuple[Any, Any]:
    """The typer annotation of one flag, and its default."""
    python, parsing, shown = _parsing(spec, kind, default)
    if spec.metavar is not None:
        parsing["metavar"] = spec.metavar
    # A switch shows its --no- twin, as typer names it when it is given no name.
    names = (f"{spec.name}/--no-{spec.name[2:]}",) if python is bool else (spec.name,)
    # A count shows its range, as every count flag of the CLI does.
    text = f"{spec.help} ({spec.low}-{spec.high})" if spec.kind is Kind.COUNT else spec.help
    option = typer.Option(*names, help=text, envvar=spec.env, rich_help_panel=panel, **parsing)
    return Annotated[python, option], shown


def settings_params(root: type) -> Iterator[inspect.Parameter]:
    """One keyword parameter per flag of ``root`` and its sections, in the order of the help."""
    for section, f, kind, spec in flagged_fields(root):
        annotation, default = _option(spec, kind, _default(f), spec.panel or section.panel)  # type: ignore[attr-defined]
        yield inspect.Parameter(
            spec.param, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
        )
    if _nats_field(root) is not None:
        yield from NATS_PARAMS


def _nats_field(root: type) -> str | None:
    """The root's ``NatsSettings`` field, filled in from the ``--nats-*`` flags."""
    return next((f.name for f, kind in section_fields(root) if kind is NatsSettings), None)


def with_settings_options(command: F) -> F:
    """Replace the command's ``settings`` parameter by the flags of its type's fields."""
    # eval_str: modules with `from __future__ import annotations` hold their hints as strings.
    signature = inspect.signature(command, eval_str=True)
    root = signature.parameters["settings"].annotation
    if not is_section(root):
        raise TypeError(f"{command.__name__}: settings must be a section, not {root!r}")
    flags = list(settings_params(root))
    lists = {spec.param for _, _, _, spec in flagged_fields(root) if spec.kind is Kind.LIST}
    nats = _nats_field(root)
    params = [p for p in signature.parameters.values() if p.name != "settings"]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {p.name: kwargs.pop(p.name) for p in flags if p.name in kwargs}
        for name in lists:
            values[name] = split_values(values[name])
        if nats is not None:
            nats_values = {p.name: values.pop(p.name) for p in NATS_PARAMS}
            values[nats] = nats_settings_from(**nats_values)
        try:
            settings = build(root, values)
        except ValueError as e:
            # The sections name the flag they refuse (--pull-timeout must be positive).
            raise typer.BadParameter(str(e)) from e
        return command(*args, settings=settings, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*params, *flags])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
