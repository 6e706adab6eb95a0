"""`astra-ops`: start, watch, approve and cancel runbook runs; run the worker, API or dev stack.

Every command that fails prints one line saying what failed and what to do, and exits non-zero.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from runtime.access import AccessPolicyError, load_policy
from runtime.client import TemporalUnavailable, connect
from runtime.codec import CodecKeyError, new_key_line
from runtime.search_attributes import register_search_attributes
from runtime.settings import Settings, SettingsError, load_settings
from starters.runs import RunError, Runs, RunView
from starters.sandbox_cli import sandbox_app
from workflows.catalogue import RUNBOOKS
from workflows.models import Decision, RunbookResult

T = TypeVar("T")

app = typer.Typer(
    help="Astra operations runbooks as durable Temporal workflows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(sandbox_app, name="sandbox")
# Piped output (scripts, logs) is not cut to 80 columns; a terminal gets its own width.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

As = Annotated[str | None, typer.Option("--as", help="Who you are (default: ASTRA_OPS_USER).")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def clear_errors() -> Iterator[None]:
    """Turn every expected failure into one line and a non-zero exit."""
    try:
        yield
    except RunError as e:
        fail(e.message, 2 if e.kind == "invalid" else 1)
    except (TemporalUnavailable, SettingsError, CodecKeyError, AccessPolicyError) as e:
        fail(str(e))


def settings() -> Settings:
    with clear_errors():
        return load_settings()


def with_runs(action: Callable[[Runs, Settings], Awaitable[T]]) -> T:
    async def main() -> T:
        config = settings()
        runs = Runs(await connect(config), config.task_queue, load_policy(config.access_policy))
        return await action(runs, config)

    with clear_errors():
        return asyncio.run(main())


def emit_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


def parse_params(params: list[str]) -> dict[str, str]:
    parsed = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--param takes key=value, got {item!r}", 2)
        parsed[key.strip()] = value
    return parsed


@app.command()
def runbooks(as_json: Json = False) -> None:
    """List the runbooks: what triggers each, who owns it, and its steps."""
    specs = [workflow.spec for workflow in RUNBOOKS.values()]
    if as_json:
        emit_json([s.describe() for s in specs])
        return
    table = Table("runbook", "trigger", "rotation", "steps", show_lines=True)
    for s in specs:
        table.add_row(s.name, s.trigger, s.rotation, "\n".join(s.steps))
    out.print(table)


@app.command()
def start(
    runbook: Annotated[str, typer.Argument(help="Runbook name (see `astra-ops runbooks`).")],
    param: Annotated[list[str], typer.Option("--param", "-p", help="k=v, repeatable.")] = [],  # noqa: B006
    reason: Annotated[str, typer.Option(help="Why this run; shown to approvers.")] = "",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report, change nothing.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the run to finish.")] = False,
    user: As = None,
    as_json: Json = False,
) -> None:
    """Start a runbook run (or return the run already open for the same subject)."""
    params = parse_params(param)

    async def action(runs: Runs, config: Settings) -> None:
        started = await runs.start(
            runbook, params, requester=user or config.user or "", reason=reason, dry_run=dry_run
        )
        if as_json and not wait:
            emit_json({"run_id": started.run_id, "existing": started.existing})
            return
        if not as_json:
            verb = "already open" if started.existing else "started"
            out.print(
                f"{started.run_id} {verb}; follow it with `astra-ops status {started.run_id}`"
            )
        if wait:
            result = await runs.client.get_workflow_handle(
                started.run_id, result_type=RunbookResult
            ).result()
            if as_json:
                emit_json({"run_id": started.run_id, **result.model_dump(mode="json")})
            else:
                out.print(f"{result.outcome.value}: {result.summary}")

    with_runs(action)


@app.command()
def ps(
    awaiting_approval: Annotated[
        bool, typer.Option("--awaiting-approval", help="Only runs waiting for a person.")
    ] = False,
    as_json: Json = False,
) -> None:
    """List recent runs, newest first."""

    async def action(runs: Runs, _: Settings) -> None:
        listed = await runs.list_runs(awaiting_approval=awaiting_approval)
        if as_json:
            emit_json([r.model_dump(mode="json") for r in listed])
            return
        table = Table()
        for heading in ("run", "state", "step", "approval?", "started"):
            table.add_column(heading, no_wrap=heading != "step")
        for r in listed:
            table.add_row(
                r.run_id,
                r.state,
                r.step or "",
                "waiting" if r.awaiting_approval else "",
                f"{r.started_at:%m-%d %H:%M:%S}" if r.started_at else "",
            )
        out.print(table)

    with_runs(action)


def print_view(view: RunView) -> None:
    out.print(f"[bold]{view.run_id}[/bold]  {view.runbook}  [bold]{view.state}[/bold]")
    if view.status:
        out.print(
            f"requested by {view.status.requester}: {view.status.reason or '-'}"
            + ("  (dry-run)" if view.status.dry_run else "")
        )
    table = Table("step", "state", "started", "finished", "detail")
    for step in view.steps:
        table.add_row(
            step.name,
            step.state.value,
            f"{step.started_at:%H:%M:%S}" if step.started_at else "",
            f"{step.finished_at:%H:%M:%S}" if step.finished_at else "",
            step.detail,
        )
    out.print(table)
    for pending in view.status.pending_approvals if view.status else []:
        out.print(
            f"awaiting approval of '{pending.step}' by {', '.join(pending.groups)} "
            f"({len(pending.approvers)}/{pending.required}; eligible: "
            f"{', '.join(pending.members)}) until {pending.deadline:%Y-%m-%d %H:%M:%S}Z:"
            f" `astra-ops approve {view.run_id}`"
        )
    if view.result:
        out.print(f"{view.result.outcome.value}: {view.result.summary}")
    if view.failure:
        out.print(f"[red]failed:[/red] {view.failure}")


@app.command()
def status(run_id: str, as_json: Json = False) -> None:
    """Show a run: its state, each step with times, and pending approvals."""

    async def action(runs: Runs, _: Settings) -> None:
        view = await runs.view(run_id)
        if not as_json:
            print_view(view)
            return
        emit_json(
            {
                "run_id": view.run_id,
                "runbook": view.runbook,
                "state": view.state,
                "started_at": view.started_at,
                "closed_at": view.closed_at,
                "steps": [s.model_dump(mode="json") for s in view.steps],
                "pending_approvals": [
                    p.model_dump(mode="json")
                    for p in (view.status.pending_approvals if view.status else [])
                ],
                "decisions": [
                    d.model_dump(mode="json")
                    for d in (view.status.decisions if view.status else [])
                ],
                "result": view.result.model_dump(mode="json") if view.result else None,
                "failure": view.failure,
            }
        )

    with_runs(action)


def decide(run_id: str, verdict: str, step: str | None, comment: str, user: str | None) -> None:
    async def action(runs: Runs, config: Settings) -> None:
        said = await runs.decide(
            run_id,
            Decision(
                approver=user or config.user or "",
                step=step,
                comment=comment,
                decision=verdict,
            ),
        )
        out.print(said)

    with_runs(action)


Step = Annotated[str | None, typer.Option(help="The step to decide (default: the pending one).")]
Comment = Annotated[str, typer.Option(help="Why; recorded with the decision.")]


@app.command()
def approve(run_id: str, step: Step = None, comment: Comment = "", user: As = None) -> None:
    """Approve the step a run is waiting on (you cannot approve your own run)."""
    decide(run_id, "approve", step, comment, user)


@app.command()
def reject(run_id: str, step: Step = None, comment: Comment = "", user: As = None) -> None:
    """Reject the step a run is waiting on; the run stops safely."""
    decide(run_id, "reject", step, comment, user)


@app.command()
def cancel(run_id: str, user: As = None) -> None:
    """Cancel a run; it undoes what it changed before it stops."""

    async def action(runs: Runs, config: Settings) -> None:
        await runs.cancel(run_id, user or config.user or "")
        out.print(f"{run_id}: cancellation requested; it rolls back what it changed")

    with_runs(action)


@app.command()
def worker() -> None:
    """Run one worker against the configured Temporal until SIGTERM."""
    from workers.worker import run_worker

    with clear_errors():
        asyncio.run(run_worker(settings()))


@app.command()
def api() -> None:
    """Serve the HTTP API (and the UI's codec endpoints) until SIGTERM."""
    from starters.api import serve

    with clear_errors():
        serve(settings())


@app.command()
def dev() -> None:
    """Run the whole stack locally: Temporal + UI, sandbox cluster, worker, API. Ctrl-C stops it."""
    from starters.dev import run_dev

    with clear_errors():
        sys.exit(asyncio.run(run_dev(settings())))


@app.command()
def setup() -> None:
    """Register astra-ops' search attributes on the configured Temporal namespace (once)."""

    async def register() -> None:
        config = settings()
        client = await connect(config)
        await register_search_attributes(client, config.temporal_namespace)
        out.print(f"search attributes registered on namespace {config.temporal_namespace}")

    with clear_errors():
        asyncio.run(register())


@app.command()
def keygen(key_id: Annotated[str, typer.Argument(help="Name of the new key.")] = "k1") -> None:
    """Print a new payload-encryption key line for ASTRA_OPS_CODEC_KEYS or a key file."""
    out.print(new_key_line(key_id), highlight=False)


def main() -> None:
    try:
        app()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    sys.stdout.flush()
    sys.stderr.flush()
    # The SDK's native threads can abort interpreter finalization of a short-lived client
    # ("PyGILState_Release ... finalizing", temporalio/sdk-python#300); every command has
    # finished and cleaned up by now, so skip finalization rather than risk an abort.
    os._exit(code)


if __name__ == "__main__":
    main()
