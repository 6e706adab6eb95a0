"""`astra-ops sandbox`: break the simulated Astra on purpose, reset it, or run it.

Faults are produced for real in the sandbox's PostgreSQL and Redis (the settings name them), so
the runbooks, the alert rules and people on a game day all see the same thing. That is why every
command runs only in dev mode, and `reset` only on a database that shows it is the sandbox's.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Annotated, Any, NoReturn, TypeVar

import psycopg
import redis.asyncio as aioredis
import typer
import uvicorn
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel
from rich.console import Console
from urllib3.exceptions import HTTPError

from activities.certificates import CertificateAuthority
from activities.kubernetes import unauthenticated_client
from runtime.migrations import MigrationError
from runtime.redact import redact
from runtime.settings import Settings, SettingsError, load_settings
from sandbox import faults
from sandbox.db import migrate, reset
from sandbox.loadgen import LoadGenerator
from sandbox.metrics import MetricsApp
from sandbox.platform import ClusterView
from sandbox.servers import DataPlane, ServerError
from sandbox.servers import faults as server_faults
from sandbox.servers.faults import DataPlaneFault
from sandbox.servers.plane import data_plane_record
from starters.cli import dev_mode

T = TypeVar("T")

# Its help is in `starters.cli`, which loads these commands only when one of them runs.
sandbox_app = typer.Typer()
fault_app = typer.Typer(
    help="Produce a fault in the sandbox, for real, for a runbook to find.", no_args_is_help=True
)
sandbox_app.add_typer(fault_app, name="fault")

out = Console(soft_wrap=True)
err = Console(stderr=True)
Json = Annotated[bool, typer.Option("--json", help="Print what the fault did as JSON.")]


def _fail(message: str, code: int = 1) -> NoReturn:
    """One line; without any password a database or Redis URL in it carries."""
    err.print(f"[red]error:[/red] {redact(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _settings() -> Settings:
    """The settings, in dev mode only: outside it the database and Redis they name may be
    Astra's real ones, which these commands would fill with faults or empty."""
    try:
        settings = load_settings()
    except SettingsError as e:
        _fail(str(e))
    if not dev_mode(settings):
        _fail(
            "`astra-ops sandbox` runs only in dev mode: it injects faults into and empties the "
            "database and Redis that ASTRA_OPS_DATABASE_URL and ASTRA_OPS_REDIS_URL name. Run it "
            "beside `astra-ops dev`, or set ASTRA_OPS_DEV_MODE=true for a sandbox of your own",
            2,
        )
    return _beside_dev_stack(settings)


def _beside_dev_stack(settings: Settings) -> Settings:
    """Where the dev stack runs servers of its own, a command beside it acts on those, as the
    stack's worker and platform do: the configured ones were not its (or did not answer)."""
    try:
        plane = DataPlane.read(data_plane_record(settings.state_dir))
    except FileNotFoundError:
        return settings
    return settings.model_copy(
        update={"database_url": plane.postgres_url, "redis_url": plane.redis_url}
    )


def _run(settings: Settings, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``, turning an unreachable data plane or a bad argument into one line."""
    try:
        return asyncio.run(work)
    except ValueError as e:
        _fail(str(e), 2)
    except MigrationError as e:
        _fail(str(e))
    except psycopg.OperationalError as e:
        _fail(
            f"PostgreSQL is not reachable at {settings.database_url} ({e}); set "
            "ASTRA_OPS_DATABASE_URL, and run `astra-ops sandbox reset` once to create the schema"
        )
    except (aioredis.RedisError, OSError) as e:
        _fail(f"Redis is not reachable at {settings.redis_url} ({e}); set ASTRA_OPS_REDIS_URL")


def _inject(
    fault: Callable[[faults.SandboxTarget], Awaitable[BaseModel]],
    describe: Callable[[Any], str],
    as_json: bool,
) -> None:
    settings = _settings()
    target = faults.SandboxTarget(
        dsn=settings.database_url,
        redis_url=settings.redis_url,
        key_prefix=settings.redis_key_prefix,
    )

    async def work() -> BaseModel:
        return await fault(target)

    result = _run(settings, work())
    if as_json:
        out.print_json(result.model_dump_json())
    else:
        out.print(describe(result), highlight=False)


@fault_app.command("worker-lost")
def worker_lost(
    worker: Annotated[str | None, typer.Option(help="Worker id (default: the busiest).")] = None,
    heartbeat_age: Annotated[float, typer.Option(help="Seconds the heartbeat is aged.")] = 120,
    delete_heartbeat: Annotated[bool, typer.Option(help="Delete the heartbeat key.")] = False,
    as_json: Json = False,
) -> None:
    """A worker stops heartbeating while it still holds leased tasks."""
    _inject(
        lambda t: faults.worker_lost(t, worker, heartbeat_age, delete_heartbeat),
        lambda r: (
            f"{r.worker_id} lost, holding {len(r.leased_task_ids)} tasks; "
            f"`astra-ops start worker-lost --param worker_id={r.worker_id}`"
        ),
        as_json,
    )


@fault_app.command("error-spike")
def error_spike(
    share: Annotated[float, typer.Option(help="Share of outcomes that fail (0-1].")] = 0.5,
    error: Annotated[str, typer.Option(help="The error the tasks fail with.")] = (
        faults.RETRYABLE_ERRORS[0]
    ),
    window: Annotated[float, typer.Option(help="Seconds the failures are spread over.")] = 300,
    tasks: Annotated[int, typer.Option(help="Outcomes written.")] = 100,
    worker: Annotated[str | None, typer.Option(help="Pin the failures to one worker.")] = None,
    shard: Annotated[int | None, typer.Option(help="Pin the failures to one shard.")] = None,
    stuck_pool: Annotated[
        bool, typer.Option(help="Keep failing only on today's workers (a restart cures it).")
    ] = False,
    as_json: Json = False,
) -> None:
    """A share of tasks starts failing with one error."""
    _inject(
        lambda t: faults.error_spike(t, share, error, window, tasks, worker, shard, stuck_pool),
        lambda r: (
            f"{len(r.failed_task_ids)} recent tasks failed with {r.error!r}; "
            f"the load generator keeps failing {r.share:.0%}"
        ),
        as_json,
    )


@fault_app.command("cost-spike")
def cost_spike(
    multiplier: Annotated[float, typer.Option(help="Window cost over the daily average.")] = 5,
    tenant: Annotated[str, typer.Option()] = "globex",
    agent: Annotated[str, typer.Option(help="The agent that overspends.")] = "coder-1",
    model: Annotated[str, typer.Option()] = "gpt-4o",
    window: Annotated[float, typer.Option(help="Seconds of the spike window.")] = 300,
    baseline: Annotated[float, typer.Option(help="Seconds of the trailing average.")] = 86_400,
    as_json: Json = False,
) -> None:
    """One agent's LLM spend jumps to a multiple of the daily average."""
    _inject(
        lambda t: faults.cost_spike(t, multiplier, tenant, agent, model, window, baseline),
        lambda r: (
            f"{r.agent_id} ({r.tenant}, {r.model}) now spends {r.multiplier:g}x a normal "
            f"window (${r.normal_window_cost:.2f}); added ${r.inserted_cost_usd:.2f}"
        ),
        as_json,
    )


@fault_app.command("dead-letters")
def dead_letters(
    count: Annotated[int, typer.Option(help="Tasks that exhaust their retries.")] = 10,
    retryable_share: Annotated[float, typer.Option(help="Share with transient errors.")] = 0.5,
    max_retries: Annotated[int, typer.Option()] = 3,
    as_json: Json = False,
) -> None:
    """Tasks exhaust their retries and are published to the dead-letter stream."""
    _inject(
        lambda t: faults.dead_letters(t, count, retryable_share, max_retries),
        lambda r: (
            f"{len(r.entries)} tasks dead-lettered "
            f"({sum(e.retryable for e in r.entries)} with transient errors)"
        ),
        as_json,
    )


@contextlib.contextmanager
def _cluster(settings: Settings, why: str) -> Iterator[ApiClient]:
    """A client of the sandbox cluster; one line, not a traceback, when it is not there."""
    if not settings.kube_url:
        _fail(f"{why}: set ASTRA_OPS_KUBE_URL to its URL (`astra-ops dev` prints it)")
    api = unauthenticated_client(settings.kube_url)
    try:
        yield api
    except (ApiException, HTTPError) as e:
        _fail(f"the sandbox cluster at {settings.kube_url} did not answer ({e}); is it running?")
    finally:
        api.close()  # type: ignore[no-untyped-call]


Share = Annotated[float, typer.Option(help="Share of its pods' tasks that fail (0-1].")]
BuildError = Annotated[str, typer.Option(help="The error those tasks fail with.")]


@fault_app.command("bad-rollout")
def bad_rollout(
    deployment: Annotated[str, typer.Option(help="The Deployment to roll.")] = "astra-worker",
    tag: Annotated[str, typer.Option(help="Image tag of the bad build.")] = "bad",
    share: Share = 0.5,
    error: BuildError = faults.BAD_BUILD_ERROR,
    as_json: Json = False,
) -> None:
    """A bad build rolls out: its pods fail tasks until the Deployment is rolled back."""
    settings = _settings()
    with _cluster(settings, "bad-rollout rolls a Deployment of the sandbox cluster") as api:
        _inject(
            lambda t: faults.bad_rollout(
                t, api, settings.kube_namespace, deployment, tag, share, error
            ),
            lambda r: (
                f"{r.namespace}/{r.deployment} rolled from revision {r.from_revision} to "
                f"{r.to_revision} ({r.image}); its pods fail {r.share:.0%} of their tasks with "
                f"{r.error!r} until it is rolled back"
            ),
            as_json,
        )


@fault_app.command("bad-canary")
def bad_canary(
    image: Annotated[
        str | None,
        typer.Option(
            help=f"The image that is a bad build (default: --deployment's image tagged "
            f"{faults.BAD_CANARY_TAG}, read from the sandbox cluster)."
        ),
    ] = None,
    deployment: Annotated[
        str, typer.Option(help="The Deployment whose image the default is a new build of.")
    ] = "astra-worker",
    share: Share = 0.5,
    error: BuildError = faults.BAD_BUILD_ERROR,
    clear: Annotated[
        bool, typer.Option("--clear", help="The image is a good build again: undo this fault.")
    ] = False,
    as_json: Json = False,
) -> None:
    """An image is a bad build, rolled out nowhere yet: a canary of it fails a share of the tasks
    its pods run, for the canary's analysis to catch."""
    settings = _settings()
    if image is None:
        why = (
            f"without --image, bad-canary reads the image {deployment} runs in the sandbox cluster"
        )
        with _cluster(settings, why) as api:
            namespace = settings.kube_namespace
            image = _run(settings, faults.bad_canary_image(api, namespace, deployment))
    chosen = image
    undo = f"astra-ops sandbox fault bad-canary --image {chosen} --clear"
    if clear:
        _inject(
            lambda t: faults.clear_bad_build(t, chosen),
            lambda r: (
                f"{r.image} is a good build again: pods that run it stop failing"
                if r.was_bad
                else f"{r.image} was not a bad build; nothing changed"
            ),
            as_json,
        )
        return
    _inject(
        lambda t: faults.bad_canary(t, chosen, share, error),
        lambda r: (
            f"{r.image} is now a bad build: pods that run it fail {r.share:.0%} of their tasks "
            f"with {r.error!r}. Nothing was rolled out: a canary-upgrade to this image makes its "
            f"canary pods fail, and pods of other images run as before. Undo it with `{undo}` "
            "(`astra-ops sandbox reset` undoes it too, with everything else in the sandbox)"
        ),
        as_json,
    )


def _break_servers(
    fault: Callable[[DataPlane], Coroutine[Any, Any, DataPlaneFault]], describe: str, as_json: bool
) -> None:
    """A fault of the servers the dev stack runs of its own, found through its record."""
    record = data_plane_record(_settings().state_dir)
    try:
        plane = DataPlane.read(record)
    except FileNotFoundError:
        _fail(
            "no servers of the dev stack's own to break: this fault kills, freezes or flushes the "
            f"servers `astra-ops dev --replicated` runs (it records them in {record}); start it "
            "that way"
        )
    try:
        result = asyncio.run(fault(plane))
    except ServerError as e:
        _fail(str(e))
    if as_json:
        out.print_json(result.model_dump_json())
    else:
        out.print(describe.format(r=result), highlight=False)


def _certificate_fault(
    name: str,
    fault: Callable[[Any, CertificateAuthority], Coroutine[Any, Any, faults.CertificateFault]],
    as_json: bool,
) -> None:
    """Re-issue certificates with the CA the worker signs with (the dev stack's sandbox CA)."""
    settings = _settings()
    if not settings.kube_url or not settings.tls_ca_cert_file or not settings.tls_ca_key_file:
        _fail(
            f"{name} writes certificates into the sandbox cluster's TLS Secrets: set "
            "ASTRA_OPS_KUBE_URL and ASTRA_OPS_TLS_CA_CERT_FILE/_KEY_FILE (`astra-ops dev` prints "
            "both)"
        )
    ca = CertificateAuthority.load(
        settings.tls_ca_cert_file.read_text(), settings.tls_ca_key_file.read_text()
    )
    api = unauthenticated_client(settings.kube_url)
    try:
        result = asyncio.run(fault(api, ca))
    except (ApiException, HTTPError) as e:
        _fail(f"the sandbox cluster at {settings.kube_url} did not answer ({e}); is it running?")
    finally:
        api.close()  # type: ignore[no-untyped-call]
    if as_json:
        out.print_json(result.model_dump_json())
        return
    written = ", ".join(f"{s} now holds {f}" for s, f in result.fingerprints.items())
    then = (
        "their services restart onto them"
        if result.rolled
        else "their endpoints keep serving the old ones"
    )
    out.print(f"{written} (until {result.not_after:%Y-%m-%d %H:%M}Z); {then}", highlight=False)


Services = Annotated[
    list[str] | None, typer.Option("--service", help="A TLS service (repeatable; default: all).")
]


@fault_app.command("cert-expiring")
def cert_expiring(
    service: Services = None,
    days_left: Annotated[
        float, typer.Option(help="Days until it expires (negative: already expired).")
    ] = 5,
    as_json: Json = False,
) -> None:
    """Services' certificates close to expiry (or expired), served: tls-rotation renews them."""
    namespace = _settings().kube_namespace
    _certificate_fault(
        "cert-expiring",
        lambda api, ca: faults.cert_expiring(api, ca, namespace, service, days_left),
        as_json,
    )


@fault_app.command("cert-mismatch")
def cert_mismatch(service: Services = None, as_json: Json = False) -> None:
    """A new certificate in a service's Secret (default: gateway) that its endpoint does not
    serve, since nobody restarted it: tls-rotation's scan finds the mismatch."""
    namespace = _settings().kube_namespace
    _certificate_fault(
        "cert-mismatch", lambda api, ca: faults.cert_mismatch(api, ca, namespace, service), as_json
    )


@fault_app.command("pg-primary-down")
def pg_primary_down(as_json: Json = False) -> None:
    """Kill the PostgreSQL primary (SIGKILL): connections fail until a failover or a restart."""
    _break_servers(
        server_faults.pg_primary_down,
        "PostgreSQL {r.server} at {r.address} killed (pid {r.pid}); its clients get errors "
        "until its replica is promoted or it is restarted",
        as_json,
    )


@fault_app.command("pg-primary-blip")
def pg_primary_blip(
    seconds: Annotated[float, typer.Option(help="How long the primary is frozen.", min=0)] = 5,
    as_json: Json = False,
) -> None:
    """Freeze the PostgreSQL primary (SIGSTOP) for a few seconds, then let it go on (SIGCONT)."""
    _break_servers(
        lambda plane: server_faults.pg_primary_blip(plane, seconds),
        "PostgreSQL {r.server} at {r.address} was frozen for {r.seconds:g}s and answers again",
        as_json,
    )


@fault_app.command("redis-primary-down")
def redis_primary_down(as_json: Json = False) -> None:
    """Kill the Redis primary (SIGKILL); its replica loses its link."""
    _break_servers(
        server_faults.redis_primary_down,
        "Redis {r.server} at {r.address} killed (pid {r.pid}); its clients get errors "
        "until its replica is promoted or it is restarted",
        as_json,
    )


@fault_app.command("redis-data-loss")
def redis_data_loss(as_json: Json = False) -> None:
    """FLUSHALL on the Redis primary: every key lost, while it keeps answering."""
    _break_servers(
        server_faults.redis_data_loss,
        "Redis {r.server} at {r.address} flushed: {r.keys_lost} keys lost, no outage",
        as_json,
    )


@sandbox_app.command("reset")
def reset_sandbox() -> None:
    """Bring the schema up to date and empty the sandbox: tables, Redis keys, fault knobs.

    Refused, changing nothing, for a database that exists and is not the sandbox's.
    """
    settings = _settings()

    async def work() -> list[str]:
        applied = await migrate(settings.database_url, only_sandbox=True)
        await reset(settings.database_url, settings.redis_url, settings.redis_key_prefix)
        return applied

    applied = _run(settings, work())
    out.print(
        f"sandbox reset: {redact(settings.database_url)}"
        + (f" (applied {', '.join(applied)})" if applied else "")
        + f", Redis keys {settings.redis_key_prefix}*",
        highlight=False,
    )


@sandbox_app.command()
def serve(
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster",
            help="Serve the sandbox cluster too, as `astra-ops dev` does: its Kubernetes API on "
            "ASTRA_OPS_KUBE_PORT, its TLS services, its CA under ASTRA_OPS_STATE_DIR; for a "
            "stack of separate processes (deploy/compose.yaml).",
        ),
    ] = False,
) -> None:
    """Run the simulated Astra against the sandbox cluster, with /metrics, until Ctrl-C.

    Example: ASTRA_OPS_DEV_MODE=true astra-ops sandbox serve --cluster
    """
    settings = _settings()
    if cluster:
        _run(settings, _serve_with_cluster(settings))
    elif not settings.kube_url:
        _fail(
            "serve plays the pods of the sandbox cluster: set ASTRA_OPS_KUBE_URL to its URL, "
            "or serve one with --cluster"
        )
    else:
        _run(settings, _serve(settings, settings.kube_url))


async def _serve_with_cluster(settings: Settings) -> None:
    # Loaded here: the dev stack's module brings the API's, which the fault commands need not.
    from starters.dev import sandbox_ca, sandbox_cluster

    ca, _ = sandbox_ca(settings)
    kube, tls = sandbox_cluster(settings, ca)
    await kube.start()
    tls.start()
    print(
        f"sandbox cluster: Kubernetes API at {kube.url} (namespace {settings.kube_namespace}); "
        f"TLS services on {', '.join(tls.address(s) for s in tls.services)}",
        flush=True,
    )
    try:
        await _serve(settings, kube.url)
    finally:
        tls.stop()
        await kube.stop()


class _MetricsServer(uvicorn.Server):
    """uvicorn, minus its signal capture: it re-raises SIGTERM once it has stopped, which would
    kill the process before the load generator stops; ``serve`` handles the signals instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def request_exit(self) -> None:
        self.should_exit = True


async def _serve(settings: Settings, kube_url: str) -> None:
    applied = await migrate(settings.database_url)
    api = unauthenticated_client(kube_url)
    generator = LoadGenerator(
        settings.database_url,
        settings.redis_url,
        [],
        key_prefix=settings.redis_key_prefix,
        cluster=ClusterView(api, namespace=settings.kube_namespace),
    )
    app = MetricsApp.of(generator)
    server = _MetricsServer(
        uvicorn.Config(
            app, host="127.0.0.1", port=settings.sandbox_metrics_port, log_level="warning"
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_exit)
    playing = asyncio.create_task(generator.run(settings.sandbox_tick_seconds, stop))
    print(
        f"sandbox: migrations {', '.join(applied) or 'up to date'}; Astra plays namespace "
        f"{settings.kube_namespace} every {settings.sandbox_tick_seconds:g}s; "
        f"/metrics at http://127.0.0.1:{settings.sandbox_metrics_port}/metrics",
        flush=True,
    )
    try:
        await server.serve()
    finally:
        stop.set()
        await playing
        await generator.aclose()
        api.close()  # type: ignore[no-untyped-call]
