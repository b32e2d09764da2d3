"""Command: ``syncer``, the per-node process that pre-pulls every Fleet's images.

Only flags to :class:`~syncer.settings.SyncerSettings` here; the work is in ``syncer.runner``.
Every flag has an environment twin (Octops image-syncer's ``CONN_TARGET`` among them, so its
DaemonSets keep working) so the DaemonSet can configure it either way.
"""

import re
import socket
from typing import Annotated, Any

import typer

from image_syncer.options import (
    DEFAULT_PREFIX,
    Count,
    Duration,
    PrefixOption,
    help_layout,
    split_values,
    with_nats_options,
)
from image_syncer.preflight import check_listen, check_readable
from ops.durations import format_duration
from syncer.settings import DEFAULT_CRI_ENDPOINT, SyncerSettings
from wire.natsconn import NatsSettings
from wire.nodestatus import StatusError, check_node

__all__ = ["register"]


def _duration(seconds: float) -> Any:
    """A duration default as typer shows it and parses it back (``15s``), from the settings."""
    return format_duration(seconds)


def _percent(text: str) -> float:
    from syncer.keeping.diskbudget import parse_percent

    try:
        return parse_percent(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


# Help panels, so 45 flags read as a handful of topics (the NATS flags have their own panel).
PANELS = {
    "Node and runtime": (
        "node_name",
        "cri_endpoint",
        "cri_call_timeout",
        "runtime_unhealthy_after",
        "metrics_addr",
        "stop_timeout",
    ),
    "Pulls": (
        "sync_period",
        "max_parallel_pulls",
        "pull_timeout",
        "pull_backoff_min",
        "pull_backoff_max",
        "registry_auth_file",
        "kubelet_config_json",
        "extra_image",
        "max_cluster_pulls",
        "registry_backoff",
    ),
    "Which Fleets": (
        "fleet_selector",
        "respect_scheduling",
        "kube_api_url",
        "node_refresh",
        "startup_taint",
        "startup_taint_timeout",
    ),
    "Keeping images": (
        "pin_images",
        "remove_unused",
        "remove_grace",
        "max_image_fs_usage",
        "host_root",
        "removal_backoff_after",
        "removal_window",
        "removal_backoff_max",
        "ledger_ttl",
    ),
    "Event log": (
        "subject_prefix",
        "max_ack_pending",
        "ack_wait",
        "consumer_inactive_threshold",
        "consumer_provisioned",
        "fetch_expiry",
        "fetch_heartbeat",
        "refold_period",
        "lag_interval",
    ),
    "Node status": ("status_interval", "status_heartbeat", "status_replicas", "status_ttl"),
    "Seeding through a mirror": (
        "mirror",
        "seeds",
        "seed_per",
        "seed_timeout",
        "seed_report_ttl",
        "max_mirror_pulls",
    ),
}
METAVARS = {
    "node_name": "NODE",
    "cri_endpoint": "URL",
    "metrics_addr": "[HOST]:PORT",
    "registry_auth_file": "PATH",
    "kubelet_config_json": "PATH",
    "fleet_selector": "SELECTOR",
    "kube_api_url": "URL",
    "startup_taint": "KEY",
    "extra_image": "IMAGE",
    "host_root": "PATH",
    "mirror": "HOST",
    "seed_per": "LABEL",
}
# Setting names as the settings' own checks say them -> the flag a user typed.
_FLAGS = {
    "backoff_min": "--pull-backoff-min",
    "backoff_max": "--pull-backoff-max",
    "inactive_threshold": "--consumer-inactive-threshold",
    "extra_images": "--extra-image",
}


def _flag_error(error: ValueError) -> str:
    """The settings' refusal, naming flags (``--sync-period``), not fields (``sync_period``)."""
    fields = sorted(SyncerSettings.__dataclass_fields__, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(fields) + r")\b")
    return pattern.sub(lambda m: _FLAGS.get(m[1], "--" + m[1].replace("_", "-")), str(error))


@help_layout(PANELS, METAVARS)
@with_nats_options
def syncer(
    *,
    nats: NatsSettings,
    node_name: Annotated[
        str,
        typer.Option(envvar="NODE_NAME", help="This node's name; names its durable consumer."),
    ] = socket.gethostname(),
    cri_endpoint: Annotated[
        str,
        typer.Option(envvar="CONN_TARGET", help="The runtime's CRI socket, e.g. unix:///x.sock."),
    ] = DEFAULT_CRI_ENDPOINT,
    sync_period: Annotated[
        float, Duration("How often to re-check the images (jittered).", "SYNC_PERIOD")
    ] = _duration(SyncerSettings.sync_period),
    max_parallel_pulls: Annotated[
        int, Count("Pulls running at once.", "MAX_PARALLEL_PULLS", 1, 64)
    ] = SyncerSettings.max_parallel_pulls,
    pull_timeout: Annotated[
        float, Duration("Give up on one pull after this long.", "PULL_TIMEOUT")
    ] = _duration(SyncerSettings.pull_timeout),
    stop_timeout: Annotated[
        float,
        Duration(
            "On SIGTERM, let pulls in flight run this long, then cancel them; closing takes "
            "at most 7s more.",
            "STOP_TIMEOUT",
        ),
    ] = _duration(SyncerSettings.stop_timeout),
    pull_backoff_min: Annotated[
        float, Duration("First wait before retrying a failed image.", "PULL_BACKOFF_MIN")
    ] = _duration(SyncerSettings.backoff_min),
    pull_backoff_max: Annotated[
        float, Duration("Longest wait before retrying a failed image.", "PULL_BACKOFF_MAX")
    ] = _duration(SyncerSettings.backoff_max),
    subject_prefix: PrefixOption = DEFAULT_PREFIX,
    metrics_addr: Annotated[
        str,
        typer.Option(envvar="METRICS_ADDR", help="[host]:port for /metrics, /healthz, /readyz."),
    ] = ":8080",
    max_ack_pending: Annotated[
        int, Count("Events in flight at once.", "MAX_ACK_PENDING", 1, 10_000)
    ] = SyncerSettings.max_ack_pending,
    ack_wait: Annotated[
        float, Duration("Redeliver an event not acked (nor kept alive) this long.", "ACK_WAIT")
    ] = _duration(SyncerSettings.ack_wait),
    consumer_inactive_threshold: Annotated[
        float,
        Duration(
            "Delete this node's consumer after it has been unused this long.",
            "CONSUMER_INACTIVE_THRESHOLD",
        ),
    ] = _duration(SyncerSettings.inactive_threshold),
    consumer_provisioned: Annotated[
        bool,
        typer.Option(
            envvar="CONSUMER_PROVISIONED",
            help="The node's consumer is created at its NATS login (auth callout): bind to it, "
            "never create it.",
        ),
    ] = SyncerSettings.consumer_provisioned,
    cri_call_timeout: Annotated[
        float, Duration("Deadline of every CRI call but pulls.", "CRI_CALL_TIMEOUT")
    ] = _duration(SyncerSettings.cri_call_timeout),
    registry_auth_file: Annotated[
        str | None,
        typer.Option(envvar="REGISTRY_AUTH_FILE", help="dockerconfigjson with pull credentials."),
    ] = None,
    kubelet_config_json: Annotated[
        str | None,
        typer.Option(envvar="KUBELET_CONFIG_JSON", help="The kubelet's config.json, if mounted."),
    ] = None,
    status_interval: Annotated[
        float, Duration("Write this node's status at most this often.", "STATUS_INTERVAL")
    ] = _duration(SyncerSettings.status_interval),
    status_heartbeat: Annotated[
        float,
        Duration(
            "Say this node is alive this often while its status does not change.",
            "STATUS_HEARTBEAT",
        ),
    ] = _duration(SyncerSettings.status_heartbeat),
    status_replicas: Annotated[
        int, Count("Replicas of the status and pulled-image buckets.", "STATUS_REPLICAS", 1, 5)
    ] = SyncerSettings.status_replicas,
    status_ttl: Annotated[
        float, Duration("A vanished node's status entry expires after this.", "STATUS_TTL")
    ] = _duration(SyncerSettings.status_ttl),
    refold_period: Annotated[
        float,
        Duration(
            "Fold the whole log again this often (jittered), to drop Fleets whose delete never "
            "arrived; 0: only after a reconnect or a lost consumer.",
            "REFOLD_PERIOD",
        ),
    ] = _duration(SyncerSettings.refold_period),
    lag_interval: Annotated[
        float,
        Duration(
            "Also read this node's consumer lag this often (0: only from deliveries).",
            "LAG_INTERVAL",
        ),
    ] = _duration(SyncerSettings.lag_interval),
    fetch_expiry: Annotated[
        float,
        Duration("The server holds each long-poll pull request this long.", "FETCH_EXPIRY"),
    ] = _duration(SyncerSettings.fetch_expiry),
    fetch_heartbeat: Annotated[
        float,
        Duration(
            "Idle heartbeat of a held pull request (below half of --fetch-expiry).",
            "FETCH_HEARTBEAT",
        ),
    ] = _duration(SyncerSettings.fetch_heartbeat),
    runtime_unhealthy_after: Annotated[
        float,
        Duration(
            "Fail /healthz once the runtime has been unreachable this long.",
            "RUNTIME_UNHEALTHY_AFTER",
        ),
    ] = _duration(SyncerSettings.runtime_unhealthy_after),
    fleet_selector: Annotated[
        str,
        typer.Option(
            envvar="FLEET_SELECTOR", help="Label selector on Fleet labels; empty selects all."
        ),
    ] = "",
    respect_scheduling: Annotated[
        bool,
        typer.Option(
            envvar="RESPECT_SCHEDULING",
            help="Pull a Fleet's images only where its game servers could be scheduled.",
        ),
    ] = SyncerSettings.respect_scheduling,
    kube_api_url: Annotated[
        str | None,
        typer.Option(envvar="KUBE_API_URL", help="API server URL; in-cluster by default."),
    ] = None,
    node_refresh: Annotated[
        float, Duration("How often to re-read the node's labels and taints.", "NODE_REFRESH")
    ] = _duration(SyncerSettings.node_refresh),
    remove_unused: Annotated[
        bool,
        typer.Option(
            envvar="REMOVE_UNUSED",
            help="Remove images this syncer pulled once no live Fleet references them.",
        ),
    ] = SyncerSettings.remove_unused,
    remove_grace: Annotated[
        float, Duration("How long an image must stay unused before removal.", "REMOVE_GRACE")
    ] = _duration(SyncerSettings.remove_grace),
    ledger_ttl: Annotated[
        float,
        Duration(
            "How long a node's pulled-image and pin records outlive its last renewal "
            "(renewed every quarter of it while the syncer runs).",
            "LEDGER_TTL",
        ),
    ] = _duration(SyncerSettings.ledger_ttl),
    startup_taint: Annotated[
        str,
        typer.Option(
            envvar="STARTUP_TAINT",
            help="Taint key to remove from this node once its images are here; empty: off.",
        ),
    ] = "",
    startup_taint_timeout: Annotated[
        float,
        Duration(
            "Remove the startup taint anyway after this long, images or not.",
            "STARTUP_TAINT_TIMEOUT",
        ),
    ] = _duration(SyncerSettings.startup_taint_timeout),
    extra_image: Annotated[
        list[str],
        typer.Option(
            envvar="EXTRA_IMAGES",
            help="Image every node keeps besides the Fleets' (repeatable, comma-separated).",
        ),
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    max_cluster_pulls: Annotated[
        int,
        Count(
            "At most this many nodes pull one image at a time, cluster-wide; 0: no limit.",
            "MAX_CLUSTER_PULLS",
            0,
            100_000,
        ),
    ] = SyncerSettings.max_cluster_pulls,
    registry_backoff: Annotated[
        float,
        Duration(
            "With --max-cluster-pulls: hold back every node's pulls from a registry that "
            "answered 429 for this long.",
            "REGISTRY_BACKOFF",
        ),
    ] = _duration(SyncerSettings.registry_backoff),
    mirror: Annotated[
        list[str],
        typer.Option(
            envvar="MIRROR",
            help="Registry host this node's runtime pulls through a mirror or pull-through cache "
            "(hosts.toml; repeatable, comma-separated; '*': all). Turns seeding on for it.",
        ),
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    seeds: Annotated[
        int,
        typer.Option(
            envvar="SEEDS",
            min=1,
            help="With --mirror: nodes that pull a new image from the registry first, per image "
            "(per --seed-per value); the others wait, then pull from the mirror.",
        ),
    ] = SyncerSettings.seeds,
    seed_per: Annotated[
        str,
        typer.Option(
            envvar="SEED_PER",
            help="With --mirror: count seeds per value of this node label, e.g. "
            "topology.kubernetes.io/zone (reads this node from the API server); empty: cluster.",
        ),
    ] = SyncerSettings.seed_per,
    seed_timeout: Annotated[
        float,
        Duration(
            "With --mirror: after waiting this long for a seed, a node may seed as well "
            "(one more seed per timeout).",
            "SEED_TIMEOUT",
        ),
    ] = _duration(SyncerSettings.seed_timeout),
    seed_report_ttl: Annotated[
        float,
        Duration(
            "With --mirror: how long a seed's 'image complete' report stands.", "SEED_REPORT_TTL"
        ),
    ] = _duration(SyncerSettings.seed_report_ttl),
    max_mirror_pulls: Annotated[
        int,
        typer.Option(
            envvar="MAX_MIRROR_PULLS",
            min=0,
            help="At most this many nodes pull one image from the mirror at a time, "
            "cluster-wide (--max-cluster-pulls counts registry-bound pulls only); 0: no limit.",
        ),
    ] = SyncerSettings.max_mirror_pulls,
    pin_images: Annotated[
        bool,
        typer.Option(
            envvar="PIN_IMAGES",
            help="Pin the images kept here so the kubelet's image GC skips them (containerd).",
        ),
    ] = SyncerSettings.pin_images,
    max_image_fs_usage: Annotated[
        float,
        typer.Option(
            envvar="MAX_IMAGE_FS_USAGE",
            parser=_percent,
            metavar="PERCENT",
            help="Start no pull while the image filesystem is this full.",
        ),
    ] = f"{SyncerSettings.max_image_fs_usage:.0%}",  # type: ignore[assignment]
    host_root: Annotated[
        str,
        typer.Option(
            envvar="HOST_ROOT",
            help="Where the host's filesystems are mounted (read-only), e.g. /host.",
        ),
    ] = "",
    removal_backoff_after: Annotated[
        int,
        Count(
            "Back off re-pulling an image removed behind our back this often per window.",
            "REMOVAL_BACKOFF_AFTER",
            1,
            1000,
        ),
    ] = SyncerSettings.removal_backoff_after,
    removal_window: Annotated[
        float, Duration("The window removals are counted in.", "REMOVAL_WINDOW")
    ] = _duration(SyncerSettings.removal_window),
    removal_backoff_max: Annotated[
        float,
        Duration("Longest wait before re-pulling such an image.", "REMOVAL_BACKOFF_MAX"),
    ] = _duration(SyncerSettings.removal_backoff_max),
) -> None:
    """Pre-pull the images of every Fleet onto this node and keep them there."""
    try:
        check_node(node_name)
    except StatusError as e:
        # Its durable, its status keys and its permissions are all named after it.
        raise typer.BadParameter(str(e), param_hint="'--node-name' / NODE_NAME") from e
    check_listen(metrics_addr, "--metrics-addr")
    check_readable(registry_auth_file, "--registry-auth-file")
    check_readable(kubelet_config_json, "--kubelet-config-json")
    check_readable(nats.creds_file, "--nats-creds")
    check_readable(nats.tls_ca, "--nats-tls-ca")
    check_readable(nats.token_file, "--nats-token-file")
    from image_syncer.syncerproc import exec_syncer

    try:
        settings = SyncerSettings(
            node_name=node_name,
            cri_endpoint=cri_endpoint,
            sync_period=sync_period,
            max_parallel_pulls=max_parallel_pulls,
            pull_timeout=pull_timeout,
            stop_timeout=stop_timeout,
            backoff_min=pull_backoff_min,
            backoff_max=pull_backoff_max,
            subject_prefix=subject_prefix,
            metrics_addr=metrics_addr,
            max_ack_pending=max_ack_pending,
            ack_wait=ack_wait,
            inactive_threshold=consumer_inactive_threshold,
            consumer_provisioned=consumer_provisioned,
            cri_call_timeout=cri_call_timeout,
            registry_auth_file=registry_auth_file,
            kubelet_config_json=kubelet_config_json,
            status_interval=status_interval,
            status_replicas=status_replicas,
            status_ttl=status_ttl,
            status_heartbeat=status_heartbeat,
            lag_interval=lag_interval,
            refold_period=refold_period,
            fetch_expiry=fetch_expiry,
            fetch_heartbeat=fetch_heartbeat,
            runtime_unhealthy_after=runtime_unhealthy_after,
            fleet_selector=fleet_selector,
            respect_scheduling=respect_scheduling,
            kube_api_url=kube_api_url,
            node_refresh=node_refresh,
            remove_unused=remove_unused,
            remove_grace=remove_grace,
            ledger_ttl=ledger_ttl,
            startup_taint=startup_taint,
            startup_taint_timeout=startup_taint_timeout,
            extra_images=split_values(extra_image),
            max_cluster_pulls=max_cluster_pulls,
            registry_backoff=registry_backoff,
            mirror=split_values(mirror),
            seeds=seeds,
            seed_per=seed_per,
            seed_timeout=seed_timeout,
            seed_report_ttl=seed_report_ttl,
            max_mirror_pulls=max_mirror_pulls,
            pin_images=pin_images,
            max_image_fs_usage=max_image_fs_usage,
            host_root=host_root,
            removal_backoff_after=removal_backoff_after,
            removal_window=removal_window,
            removal_backoff_max=removal_backoff_max,
            nats=nats,
        )
    except ValueError as e:
        raise typer.BadParameter(_flag_error(e)) from e
    # The long-running process sheds the CLI's libraries (see image_syncer.syncerproc).
    exec_syncer(settings)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("syncer")(syncer)
