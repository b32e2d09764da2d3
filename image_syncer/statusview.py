"""``image-syncer status`` as a person reads it: the summary first, then what is wrong, grouped.

Drawn for an 80-column terminal and for thousands of nodes: one summary line; the problems
grouped by (image, reason) with node counts and a few names (:mod:`image_syncer.problems`);
the Fleets that are not ready, then the ready ones; the nodes with problems, then the healthy
ones, each section cut to what fits a screen with a line saying what was left out and how to see
it. The matrix (``--matrix``) draws Fleets x nodes when the nodes fit across the terminal, and
lists the cells that are not ok when they do not.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from image_syncer.nodeview import FleetRollup, NodeRollup
from image_syncer.problems import ProblemGroup, group_problems, name_some, natural_key
from ops.durations import format_duration
from wire.nodestatus import NodeStatus, PinSummary, is_stale
from wire.readiness import fleet_progress

__all__ = ["Overview", "ago", "matrix", "overview"]

# Above this many rows a section lists only what needs attention, and says how many it left out.
MAX_ROWS = 30
# A matrix cell: "ok", "0/2", "-", plus padding.
_CELL = 5


def ago(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "never"
    return f"{format_duration(round(max((now - then).total_seconds(), 0.0)))} ago"


@dataclass
class Overview:
    """The rollups and what the summary line and ``--exit-code`` say about them."""

    fleets: dict[str, FleetRollup]
    nodes: dict[str, NodeRollup]
    problems: list[ProblemGroup]

    @property
    def live(self) -> list[NodeRollup]:
        return [r for r in self.nodes.values() if not r.stale]

    @property
    def stale(self) -> list[NodeRollup]:
        return [r for r in self.nodes.values() if r.stale]

    @property
    def ready_everywhere(self) -> list[FleetRollup]:
        return [r for r in self.fleets.values() if not r.not_ready]

    @property
    def failing(self) -> list[FleetRollup]:
        """Fleets some live node cannot pull (not only in progress)."""
        bad = {fleet for group in self.problems if group.failing for fleet in group.fleets}
        return [r for r in self.fleets.values() if r.fleet in bad]

    @property
    def all_well(self) -> bool:
        """Every Fleet ready on every live node, no stale or flagged node: ``--exit-code`` 0."""
        return (
            bool(self.live)
            and all(r.healthy for r in self.nodes.values())
            and not any(r.not_ready for r in self.fleets.values())
        )

    def summary_line(self) -> str:
        live, stale = len(self.live), len(self.stale)
        nodes = f"{live} live node{'s' * (live != 1)}" + (f", {stale} stale" if stale else "")
        ready, failing = len(self.ready_everywhere), len(self.failing)
        in_progress = len(self.fleets) - ready - failing
        parts = [f"{ready} ready everywhere", f"{failing} failing"]
        if in_progress:
            parts.append(f"{in_progress} in progress")
        flagged = sum(1 for r in self.live if r.excludes_all)
        if flagged:
            parts.append(f"{flagged} node{'s want' if flagged != 1 else ' wants'} no Fleet")
        versions = Counter(r.status.version for r in self.live)
        mixed = f"; versions {', '.join(f'{v} ({n})' for v, n in versions.items())}"
        return (
            f"{len(self.fleets)} Fleet{'s' * (len(self.fleets) != 1)}, {nodes}: {', '.join(parts)}"
            f"{mixed if len(versions) > 1 else ''}"
        )


def overview(fleets: dict[str, FleetRollup], nodes: dict[str, NodeRollup]) -> Overview:
    items = (
        (node, rollup.fleet, image, why)
        for rollup in fleets.values()
        for node, image, why in rollup.missing
    )
    return Overview(fleets, nodes, group_problems(items))


def problems_table(groups: list[ProblemGroup]) -> Table:
    """One row per (image, reason): the reason, then the image, its nodes and its Fleets on
    lines of their own, so long image references fit 80 columns."""
    table = Table(title="Problems (by image and reason)", title_justify="left")
    table.add_column("Why", no_wrap=True)
    table.add_column("Image / nodes / Fleets", overflow="fold")
    for group in groups[:MAX_ROWS]:
        style = "red" if group.failing else "yellow"
        nodes = f"{len(group.nodes)} node{'s' * (len(group.nodes) != 1)}: {name_some(group.nodes)}"
        lines = [group.image, nodes] if group.image else [nodes]
        if group.fleets:
            lines.append(f"Fleets: {name_some(group.fleets)}")
        table.add_row(Text(group.reason, style=style), "\n".join(lines))
    if len(groups) > MAX_ROWS:
        table.caption = f"+{len(groups) - MAX_ROWS} more (--json)"
    return table


def fleets_table(overview: Overview) -> tuple[Table, int]:
    """Not-ready Fleets first (failing, then in progress), then ready ones; and how many ready
    ones it left out."""
    failing = {r.fleet for r in overview.failing}
    rows = sorted(
        overview.fleets.values(),
        key=lambda r: (not r.not_ready, r.fleet not in failing, natural_key(r.fleet)),
    )
    shown = [r for r in rows if r.not_ready]
    shown += [r for r in rows if not r.not_ready][: max(0, MAX_ROWS - len(shown))]
    table = Table(title="Fleets (live nodes)", title_justify="left")
    table.add_column("Fleet", overflow="fold")
    table.add_column("Ready", no_wrap=True, justify="right")
    table.add_column("Not ready: why (nodes)", overflow="fold")
    for r in shown:
        style = "green" if not r.not_ready else "red" if r.fleet in failing else "yellow"
        table.add_row(r.fleet, Text(f"{len(r.ready)}/{r.total}", style=style), _why_nodes(r))
    return table, len(rows) - len(shown)


def _why_nodes(rollup: FleetRollup) -> str:
    """``not found (6), pulling (1)``: a not-ready Fleet's reasons with the nodes each."""
    nodes_by_reason: dict[str, set[str]] = {}
    for group in group_problems((n, rollup.fleet, i, w) for n, i, w in rollup.missing):
        nodes_by_reason.setdefault(group.reason, set()).update(group.nodes)
    return ", ".join(f"{reason} ({len(nodes)})" for reason, nodes in nodes_by_reason.items())


def nodes_table(nodes: dict[str, NodeRollup], now: datetime) -> tuple[Table, int]:
    """Nodes with problems first (stale, then wanting no Fleet, then the others), then healthy
    ones; and how many healthy ones it left out."""
    rows = sorted(
        nodes.values(),
        key=lambda r: (r.healthy, not r.stale, not r.excludes_all, natural_key(r.node)),
    )
    shown = [r for r in rows if not r.healthy]
    shown += [r for r in rows if r.healthy][: max(0, MAX_ROWS - len(shown))]
    table = Table(title="Nodes", title_justify="left")
    table.add_column("Node", overflow="fold")
    table.add_column("Fleets", no_wrap=True, justify="right")
    table.add_column("Pinned", no_wrap=True, justify="right")
    table.add_column("Heartbeat", no_wrap=True)
    table.add_column("Problems", overflow="fold")
    for r in shown:
        name = Text(f"{r.node} (stale)", style="bold red") if r.stale else Text(r.node)
        ready = Text(
            f"{r.fleets_ready}/{r.fleets_total}",
            style="green" if r.fleets_ready == r.fleets_total else "yellow",
        )
        beat = Text(ago(now, r.status.reported_at), style="red" if r.stale else "")
        problems = Text(", ".join(r.problems), style="red" if r.excludes_all else "")
        table.add_row(name, ready, _pins_cell(r.status.summary.pins), beat, problems)
    return table, len(rows) - len(shown)


def _pins_cell(pins: PinSummary | None) -> Text:
    if pins is None:
        return Text("-", style="dim")
    if not pins.enabled:
        return Text("off", style="dim")
    style = "green" if pins.pinned == pins.images else "yellow"
    return Text(f"{pins.pinned}/{pins.images}", style=style)


def render_overview(console: Console, view: Overview, now: datetime) -> None:
    console.print(view.summary_line(), markup=False, highlight=False)
    if view.problems:
        console.print(problems_table(view.problems))
    fleets, ready_left_out = fleets_table(view)
    console.print(fleets)
    if ready_left_out:
        console.print(f"+{ready_left_out} more Fleets, ready everywhere (--json)")
    nodes, healthy_left_out = nodes_table(view.nodes, now)
    console.print(nodes)
    if healthy_left_out:
        console.print(f"+{healthy_left_out} more nodes, all Fleets ready (--node NODE, --json)")


def matrix(
    view: dict[str, NodeStatus], now: datetime, stale_after: float, width: int
) -> RenderableType:
    """Fleets x nodes, nodes numbered across (a legend names them), when they fit ``width``;
    else the cells that are not ok, as a list. Fleets every node holds are left out when there
    are more than a screen of them."""
    nodes = sorted(view, key=natural_key)
    fleets = sorted(
        {fleet for status in view.values() for fleet in status.summary.fleets}, key=natural_key
    )
    cells = {(f, n): _cell(view[n], f) for f in fleets for n in nodes}
    if len(fleets) > MAX_ROWS:
        fleets = [f for f in fleets if any(cells[(f, n)][0] not in ("ok", "-") for n in nodes)]
    fleet_width = max((len(f) for f in fleets), default=5)
    if fleet_width + 4 + _CELL * len(nodes) > width or not fleets:
        return _cell_list(view, fleets, nodes, cells, now, stale_after)
    table = Table(title="Fleets x nodes (legend below)", title_justify="left")
    table.add_column("Fleet", no_wrap=True)
    for i, _ in enumerate(nodes, 1):
        table.add_column(str(i), justify="center", no_wrap=True, min_width=_CELL - 2)
    for fleet in fleets:
        table.add_row(fleet, *(Text(*cells[(fleet, n)]) for n in nodes))
    legend = [f"{i}={n}{_stale(view[n], now, stale_after)}" for i, n in enumerate(nodes, 1)]
    table.caption = "  ".join(legend)
    table.caption_justify = "left"
    return table


def _stale(status: NodeStatus, now: datetime, stale_after: float) -> str:
    return " (stale)" if is_stale(status, now, stale_after) else ""


def _cell(status: NodeStatus, fleet: str) -> tuple[str, str]:
    progress = fleet_progress(status, fleet)
    if progress is None:
        return "-", "dim"
    if progress.complete:
        return "ok", "green"
    return f"{progress.ready}/{progress.total}", "red"


def _cell_list(
    view: dict[str, NodeStatus],
    fleets: list[str],
    nodes: list[str],
    cells: dict[tuple[str, str], tuple[str, str]],
    now: datetime,
    stale_after: float,
) -> Table:
    table = Table(title="Fleets x nodes: the cells not ok (too wide to draw)", title_justify="left")
    table.add_column("Fleet", overflow="fold")
    table.add_column("Nodes not ok (images ready/total)", overflow="fold")
    for fleet in fleets:
        bad = [
            f"{n}{_stale(view[n], now, stale_after)} {cells[(fleet, n)][0]}"
            for n in nodes
            if cells[(fleet, n)][0] not in ("ok", "-")
        ]
        if bad:
            table.add_row(fleet, ", ".join(bad))
    if not table.row_count:
        table.caption = "every node holds every Fleet it wants"
    return table
