"""Command: ``demo``, the whole loop on this machine (the README's first quick-start command)."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["register"]


def demo(
    nodes: Annotated[
        int, typer.Option(min=1, max=5, help="Simulated nodes, one containerd each.")
    ] = 2,
    sync_period: Annotated[
        str, typer.Option(help="The syncers' --sync-period (short, to see re-pulls quickly).")
    ] = "2s",
    keep: Annotated[bool, typer.Option(help="Keep the demo's directory (logs, stores).")] = False,
) -> None:
    """Run NATS, a registry, containerd and syncers locally; publish Fleets; watch images arrive."""
    from image_syncer.demo import DemoFailed, run_demo  # the sandbox is for the demo alone
    from image_syncer.sandbox.processes import MissingComponent

    try:
        run_demo(nodes=nodes, sync_period=sync_period, keep=keep)
    except (DemoFailed, MissingComponent) as e:
        typer.echo(f"demo failed: {e}", err=True)
        raise typer.Exit(1) from e


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the root app."""
    app.command("demo")(demo)
