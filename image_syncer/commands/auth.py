"""Commands: ``auth``, the NATS auth callout (per-identity permissions), and ``auth-keygen``.

Flags only become :class:`authcallout.service.CalloutSettings` here; the service lives in
:mod:`authcallout.service`. The Kubernetes client is imported only when the callout runs.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from image_syncer.oneshot import fail
from image_syncer.options import (
    DEFAULT_PREFIX,
    Duration,
    PrefixOption,
    split_values,
    with_nats_options,
)
from image_syncer.preflight import check_listen, check_readable, missing_extra
from ops.lifecycle import run_until_signalled
from wire.contract import ContractError, check_prefix
from wire.natsconn import NatsSettings


def _accounts(value: str, flag: str) -> tuple[str, ...]:
    accounts = split_values([value])
    for ref in accounts:
        namespace, sep, name = ref.partition("/")
        if not sep or not namespace or not name or "/" in name:
            raise typer.BadParameter(f"{ref!r} must be NAMESPACE/NAME", param_hint=flag)
    return accounts


def _account_option(role: str, envvar: str) -> Any:
    return typer.Option(
        f"--{role}-accounts",
        envvar=envvar,
        help=f"ServiceAccounts (NAMESPACE/NAME, comma-separated) whose tokens get the {role} role.",
    )


@with_nats_options
def auth(
    nats: NatsSettings,
    issuer_seed_file: Annotated[
        str,
        typer.Option(
            envvar="AUTH_ISSUER_SEED_FILE",
            help="File holding the account nkey seed (SA...) that signs user JWTs "
            "(image-syncer auth-keygen).",
        ),
    ],
    audience: Annotated[
        str,
        typer.Option(envvar="AUTH_AUDIENCE", help="Audience the clients' tokens must be for."),
    ] = "nats",
    kubeconfig: Annotated[
        str | None,
        typer.Option(envvar="KUBECONFIG", help="kubeconfig file; in-cluster config when unset."),
    ] = None,
    syncer_accounts: Annotated[
        str, _account_option("syncer", "AUTH_SYNCER_ACCOUNTS")
    ] = "image-syncer-node/image-syncer-syncer",
    broadcaster_accounts: Annotated[
        str, _account_option("broadcaster", "AUTH_BROADCASTER_ACCOUNTS")
    ] = "image-syncer/image-syncer-broadcaster",
    admin_accounts: Annotated[
        str, _account_option("admin", "AUTH_ADMIN_ACCOUNTS")
    ] = "image-syncer/image-syncer-admin",
    reader_accounts: Annotated[str, _account_option("reader", "AUTH_READER_ACCOUNTS")] = "",
    subject_prefix: PrefixOption = DEFAULT_PREFIX,
    max_session: Annotated[
        float,
        Duration(
            "Longest session a user JWT grants (never past the token's expiry).", "AUTH_MAX_SESSION"
        ),
    ] = "1h",  # type: ignore[assignment]
    metrics_addr: Annotated[
        str,
        typer.Option(envvar="METRICS_ADDR", help="Address of /healthz, /readyz and /metrics."),
    ] = ":8080",
) -> None:
    """Answer nats-server's auth callout: Kubernetes tokens in, per-identity permissions out."""
    try:
        check_prefix(subject_prefix)
    except ContractError as e:
        raise typer.BadParameter(str(e), param_hint="--subject-prefix") from e
    if max_session < 60:
        raise typer.BadParameter("must be at least 1m", param_hint="--max-session")
    check_listen(metrics_addr, "--metrics-addr")
    check_readable(issuer_seed_file, "--issuer-seed-file")
    for path in (kubeconfig or "").split(os.pathsep):  # KUBECONFIG may list several files
        check_readable(path, "--kubeconfig")
    check_readable(nats.creds_file, "--nats-creds")
    check_readable(nats.tls_ca, "--nats-tls-ca")
    # A syncer-only install has neither library: say which extra to install, not a traceback.
    for module in ("kubernetes", "nkeys"):
        problem = missing_extra(module, "auth", "auth")
        if problem is not None:
            fail(problem)
    from authcallout.natsjwt import JwtError
    from authcallout.service import CalloutSettings, Roles, run
    from authcallout.tokenreview import KubeConfigError

    settings = CalloutSettings(
        nats=nats,
        issuer_seed_file=issuer_seed_file,
        audience=audience,
        kubeconfig=kubeconfig or None,
        roles=Roles(
            syncer=_accounts(syncer_accounts, "--syncer-accounts"),
            broadcaster=_accounts(broadcaster_accounts, "--broadcaster-accounts"),
            admin=_accounts(admin_accounts, "--admin-accounts"),
            reader=_accounts(reader_accounts, "--reader-accounts"),
        ),
        subject_prefix=subject_prefix,
        max_session=max_session,
        metrics_addr=metrics_addr,
    )
    try:
        code = run_until_signalled(lambda stopping: run(settings, stopping))
    except (KubeConfigError, JwtError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    raise typer.Exit(code)


def auth_keygen() -> None:
    """Print a new issuer seed (for the callout's Secret) and, on stderr, its public key."""
    from authcallout.natsjwt import Signer, new_account_seed

    seed = new_account_seed()
    typer.echo(seed)
    typer.echo(
        f"public key (the server's NATS_CALLOUT_ISSUER): {Signer(seed).public_key}", err=True
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("auth")(auth)
    app.command("auth-keygen")(auth_keygen)
