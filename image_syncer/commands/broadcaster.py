"""Command: ``broadcaster``, the one-per-cluster process that publishes Agones events to the log.

Flags only become :class:`broadcaster.settings.Settings` here; the process itself lives in
:mod:`broadcaster.runner`. Every flag has an env twin, so a Deployment can set either.
"""

import logging
import os
from typing import Annotated, Any

import typer

from broadcaster.settings import Settings, SidecarSettings, default_identity
from image_syncer.oneshot import fail
from image_syncer.options import (
    DEFAULT_DUPLICATE_WINDOW,
    DEFAULT_PREFIX,
    DEFAULT_TOMBSTONE_TTL,
    DuplicateWindowOption,
    Duration,
    PrefixOption,
    TombstoneTtlOption,
    split_values,
    with_nats_options,
)
from image_syncer.preflight import check_listen, check_readable, missing_extra
from ops.durations import format_duration
from ops.lifecycle import run_until_signalled
from wire.contract import ContractError, Kind, check_prefix
from wire.eventlog import LogSettings
from wire.labelselector import LabelSelector, SelectorError
from wire.natsconn import NatsSettings

log = logging.getLogger(__name__)


def _duration(seconds: float) -> Any:
    """A duration default as typer shows it and parses it back (``5m``), from the settings."""
    return format_duration(seconds)


def _kinds(text: str) -> tuple[Kind, ...]:
    try:
        return tuple(dict.fromkeys(Kind(k) for k in split_values([text]))) or (Kind.FLEET,)
    except ValueError as e:
        raise typer.BadParameter(
            f"{text!r}: kinds are {', '.join(k.value for k in Kind)}", param_hint="--kinds"
        ) from e


@with_nats_options
def broadcaster(
    nats: NatsSettings,
    kubeconfig: Annotated[
        str | None,
        typer.Option(envvar="KUBECONFIG", help="kubeconfig file; in-cluster config when unset."),
    ] = None,
    subject_prefix: PrefixOption = DEFAULT_PREFIX,
    namespace: Annotated[
        list[str],
        typer.Option(
            "--namespace",
            envvar="NAMESPACES",
            help="Namespace to watch; repeat or comma-separate. Default: all namespaces.",
        ),
    ] = [],  # noqa: B006 - typer reads the default, it is never mutated
    label_selector: Annotated[
        str,
        typer.Option(envvar="LABEL_SELECTOR", help="Only objects matching this label selector."),
    ] = "",
    kinds: Annotated[
        str,
        typer.Option(envvar="KINDS", help="What to watch: fleet, gameserver (comma-separated)."),
    ] = "fleet",
    replicas: Annotated[
        int,
        typer.Option(min=1, max=5, envvar="STREAM_REPLICAS", help="Stream replicas (3 in prod)."),
    ] = LogSettings.replicas,
    tombstone_ttl: TombstoneTtlOption = DEFAULT_TOMBSTONE_TTL,
    duplicate_window: DuplicateWindowOption = DEFAULT_DUPLICATE_WINDOW,
    watch_timeout: Annotated[
        float,
        Duration("Server-side timeout of one watch request (then resumed).", "WATCH_TIMEOUT"),
    ] = _duration(Settings.watch_timeout),
    drain_timeout: Annotated[
        float,
        Duration("On SIGTERM, how long to wait for queued events to be acked.", "DRAIN_TIMEOUT"),
    ] = _duration(Settings.drain_timeout),
    publish_timeout: Annotated[
        float,
        Duration("How long to wait for one JetStream ack before retrying.", "PUBLISH_TIMEOUT"),
    ] = _duration(Settings.publish_timeout),
    max_backoff: Annotated[
        float,
        Duration("Longest wait between retries (NATS or API server down).", "MAX_BACKOFF"),
    ] = _duration(Settings.backoff_max),
    missing_crd_log_interval: Annotated[
        float,
        Duration(
            "While the Fleet CRD is not installed (Agones missing), say so at most this often.",
            "MISSING_CRD_LOG_INTERVAL",
        ),
    ] = _duration(Settings.missing_crd_log_interval),
    metrics_addr: Annotated[
        str,
        typer.Option(envvar="METRICS_ADDR", help="Address of /healthz, /readyz and /metrics."),
    ] = Settings.metrics_addr,
    ha: Annotated[
        bool,
        typer.Option(
            "--ha/--no-ha",
            envvar="BROADCASTER_HA",
            help="Run as one of several replicas: only the lease holder watches and publishes.",
        ),
    ] = Settings.ha,
    lease_ttl: Annotated[
        float,
        Duration("With --ha: how long a dead active's lease outlives it.", "LEASE_TTL"),
    ] = _duration(Settings.lease_ttl),
    identity: Annotated[
        str,
        typer.Option(
            envvar="BROADCASTER_IDENTITY",
            help="With --ha: this replica's name in the lease. Default: hostname-pid.",
        ),
    ] = "",
    agones_namespace: Annotated[
        str,
        typer.Option(
            envvar="AGONES_NAMESPACE",
            help="Namespace of the agones-controller Deployment, whose SIDECAR_IMAGE every "
            "node pre-pulls; empty: do not follow it.",
        ),
    ] = SidecarSettings.namespace,
    sidecar_refresh: Annotated[
        float,
        Duration("How often to re-read the agones-controller's SIDECAR_IMAGE.", "SIDECAR_REFRESH"),
    ] = _duration(SidecarSettings.refresh),
    fleet_events: Annotated[
        bool,
        typer.Option(
            "--fleet-events/--no-fleet-events",
            envvar="FLEET_EVENTS",
            help="Record Kubernetes Events on Fleets when their nodes' convergence changes "
            "(ImagesPrePulled, ImagePullFailing); needs create/patch on events.",
        ),
    ] = Settings.fleet_events,
    fleet_events_interval: Annotated[
        float,
        Duration("How often the nodes' status is folded per Fleet.", "FLEET_EVENTS_INTERVAL"),
    ] = _duration(Settings.fleet_events_interval),
    node_stale_after: Annotated[
        float,
        Duration(
            "A node whose status has no heartbeat this long is left out of the convergence.",
            "NODE_STALE_AFTER",
        ),
    ] = _duration(Settings.node_stale_after),
) -> None:
    """Publish every add/update/delete of Agones Fleets (and GameServers) to the event log."""
    try:
        check_prefix(subject_prefix)
    except ContractError as e:
        raise typer.BadParameter(str(e), param_hint="--subject-prefix") from e
    check_listen(metrics_addr, "--metrics-addr")
    for path in (kubeconfig or "").split(os.pathsep):  # KUBECONFIG may list several files
        check_readable(path, "--kubeconfig")
    check_readable(nats.creds_file, "--nats-creds")
    check_readable(nats.token_file, "--nats-token-file")
    check_readable(nats.tls_ca, "--nats-tls-ca")
    try:
        # The API server would refuse it on every list, retried forever: refuse it here, once.
        LabelSelector.parse(label_selector)
    except SelectorError as e:
        raise typer.BadParameter(str(e), param_hint="--label-selector") from e
    if ha and lease_ttl < 1.0:
        # Renewals run every ttl/3; below a second they would race the server's expiry checks.
        raise typer.BadParameter("--lease-ttl must be at least 1s", param_hint="--lease-ttl")
    settings = Settings(
        nats=nats,
        log=LogSettings(
            prefix=subject_prefix,
            replicas=replicas,
            duplicate_window=duplicate_window,
            tombstone_ttl=tombstone_ttl,
        ),
        kubeconfig=kubeconfig or None,
        namespaces=split_values(namespace),
        label_selector=label_selector,
        kinds=_kinds(kinds),
        metrics_addr=metrics_addr,
        watch_timeout=watch_timeout,
        drain_timeout=drain_timeout,
        publish_timeout=publish_timeout,
        backoff_max=max_backoff,
        missing_crd_log_interval=missing_crd_log_interval,
        ha=ha,
        lease_ttl=lease_ttl,
        identity=identity or default_identity(),
        sidecar=SidecarSettings(namespace=agones_namespace, refresh=sidecar_refresh),
        fleet_events=fleet_events,
        fleet_events_interval=fleet_events_interval,
        node_stale_after=node_stale_after,
    )
    # Imported here: the Kubernetes client is heavy, and every other command (the syncer first of
    # all, one per node) would pay for it in memory just by loading the CLI. A syncer-only
    # install has none: say which extra to install instead of a traceback.
    problem = missing_extra("kubernetes", "broadcaster", "broadcaster")
    if problem is not None:
        fail(problem)
    from broadcaster.kubeapi import KubeConfigError
    from broadcaster.runner import run

    try:
        code = run_until_signalled(lambda stopping: run(settings, stopping))
    except KubeConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("broadcaster")(broadcaster)
