"""Command: ``demo``, the whole loop on this machine (the README's first quick-start command)."""

# No ``from __future__ import annotations``: typer must see the Annotated options as objects.
from typing import Annotated

import typer

from image_syncer.options import Count, Duration
from ops.durations import format_duration

__all__ = ["register"]


def demo(
    nodes: Annotated[int, Count("Simulated nodes, one containerd each.", "DEMO_NODES", 1, 5)] = 2,
    sync_period: Annotated[
        float,
        Duration(
            "The syncers' --sync-period (short, to see re-pulls quickly).", "DEMO_SYNC_PERIOD"
        ),
    ] = "2s",  # type: ignore[assignment]
    keep: Annotated[
        bool,
        typer.Option(envvar="DEMO_KEEP", help="Keep the demo's directory (logs, stores)."),
    ] = False,
) -> None:
    """Run NATS, a registry, containerd and syncers locally; publish Fleets; watch images arrive."""
    from image_syncer.demo import DemoFailed, run_demo  # the sandbox is for the demo alone
    from image_syncer.sandbox.processes import MissingComponent

    if sync_period <= 0:
        raise typer.BadParameter("must be positive", param_hint="'--sync-period'")
    try:
        run_demo(nodes=nodes, sync_period=format_duration(sync_period), keep=keep)
    except (DemoFailed, MissingComponent) as e:
        typer.echo(f"demo failed: {e}", err=True)
        raise typer.Exit(1) from e


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the root app."""
    app.command("demo")(demo)
