"""Command: ``replay``, make a node's syncer re-read the whole log and rebuild its desired state.

The request is a key in the node status bucket (:mod:`wire.nodestatus`): a running syncer watches
it and replays at once, a stopped one honours it on its next start.
"""

# No ``from __future__ import annotations``: with_nats_options rebuilds the signature, and typer
# must see the Annotated options as objects, not as strings.
import getpass
import socket
from typing import Annotated

import typer

from image_syncer.oneshot import CommandError, fail, run_nats_command
from image_syncer.options import DEFAULT_PREFIX, PrefixOption, with_nats_options
from image_syncer.statusbucket import open_bucket, status_settings
from wire.natsconn import NatsSettings, connect
from wire.nodestatus import (
    StatusError,
    StatusSettings,
    check_node,
    list_statuses,
    request_replay,
)

__all__ = ["register"]


async def _replay(
    nats_settings: NatsSettings, settings: StatusSettings, nodes: list[str], every: bool
) -> None:
    nc = await connect(nats_settings, name="image-syncer-replay")
    try:
        js = nc.jetstream()
        if every:
            view, invalid = await list_statuses(await open_bucket(js, settings))
            nodes = sorted({*view, *invalid})
            if not nodes:
                raise CommandError("no node reports status; name the nodes with --node")
        by = f"{getpass.getuser()}@{socket.gethostname()}"
        for node in nodes:
            request = await request_replay(js, settings, node, requested_by=by)
            typer.echo(
                f"replay requested node={node} request={request.id}: a running syncer replays "
                "the whole log now, a stopped one on its next start"
            )
    finally:
        await nc.close()


@with_nats_options
def replay(
    nats: NatsSettings,
    node: Annotated[
        list[str] | None, typer.Option("--node", help="The node to replay; repeat for several.")
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="Every node that reports status.")] = False,
    subject_prefix: PrefixOption = DEFAULT_PREFIX,
) -> None:
    """Make a node's syncer re-read the whole event log and rebuild its desired state."""
    nodes = list(dict.fromkeys(node or []))
    if bool(nodes) == every:
        fail("name nodes with --node, or use --all (not both)", code=2)
    for name in nodes:
        try:
            check_node(name)
        except StatusError as e:
            fail(f"--node: {e}", code=2)
    run_nats_command(_replay(nats, status_settings(subject_prefix), nodes, every))


def register(app: typer.Typer) -> None:
    """Add ``replay`` to the root app."""
    app.command("replay")(replay)
