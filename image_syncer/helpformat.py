"""Help that fits a terminal: options grouped in panels, nothing cut at 80 columns.

typer's rich help draws each panel as a table of up to six columns (name, short name, ``--no-``
name, short ``--no-`` name, type, help); at 80 columns rich shrinks them until option names,
environment variables and defaults end in "…" (``--max-parallel-p…``,
``CONSUMER_INACTIVE_THRE…``). This formatter writes click's two-column definition list instead,
which wraps the help text and never cuts a name, one section per ``rich_help_panel`` so 45
flags still read as a handful of topics. Options without an explicit metavar get a word, never
a Python type.
"""

from __future__ import annotations

import re
from typing import Any, get_args

import typer
from typer.core import TyperCommand, TyperGroup

__all__ = ["PanelledCommand", "PanelledGroup", "use_panelled_help"]

_PYTHON_TYPE = re.compile(r" <(str|int|float|bool|list\[\w+\])>")


def _sections(command: Any, ctx: Any, formatter: Any) -> None:
    panels: dict[str, list[tuple[str, str]]] = {}
    for param in command.get_params(ctx):
        _default_metavar(param)
        record = param.get_help_record(ctx)
        if record is None:
            continue
        # typer adds an argument's Python type to its name ("NAMESPACE/NAME <str>").
        record = (_PYTHON_TYPE.sub("", record[0]), record[1])
        default = "Arguments" if param.param_type_name == "argument" else "Options"
        panels.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(record)
    for title, rows in panels.items():
        with formatter.section(title):
            formatter.write_dl(rows)


def _default_metavar(param: Any) -> None:
    """A word for an option that has no metavar: ``N`` for numbers, else its name's last word
    (``--label-selector`` -> ``SELECTOR``); flags take no value and show none."""
    if param.param_type_name != "option" or param.metavar is not None or param.is_flag:
        return
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation in (int, float) or set(get_args(annotation)) & {int, float}:
        param.metavar = "N"
    else:
        param.metavar = param.opts[-1].lstrip("-").split("-")[-1].upper()


class PanelledCommand(TyperCommand):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        # click's own layout (usage, text, sections), not typer's rich tables.
        super(TyperCommand, self).format_help(ctx, formatter)

    def format_options(self, ctx: Any, formatter: Any) -> None:
        _sections(self, ctx, formatter)


class PanelledGroup(TyperGroup):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        super(TyperGroup, self).format_help(ctx, formatter)

    def format_options(self, ctx: Any, formatter: Any) -> None:
        _sections(self, ctx, formatter)
        self.format_commands(ctx, formatter)


def use_panelled_help(app: typer.Typer) -> None:
    """Every command and group of ``app`` (and of the groups it holds) formats its help here."""
    app.info.cls = PanelledGroup
    for command in app.registered_commands:
        command.cls = PanelledCommand
    for group in app.registered_groups:
        if group.typer_instance is not None:
            use_panelled_help(group.typer_instance)
