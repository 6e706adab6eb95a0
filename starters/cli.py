"""`astra-ops`: start, watch, approve and cancel runbook runs; run the worker, API or dev stack.

Every command that fails prints one line saying what failed and what to do, and exits non-zero.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeAlias, TypeVar

import typer

from runtime.client import DevStack, TemporalUnavailable, connect, dev_stack, dev_stack_marker
from runtime.errors import ConfigError
from runtime.settings import Settings, SettingsError, load_settings
from starters.run_views import RunbookCard, RunError, RunView
from workflows.models import Decision

if TYPE_CHECKING:
    # typer's own copy of click, whose types its group methods take.
    from typer._click import Command, Context

    from starters.api_client import ApiRuns
    from starters.runs import Runs

T = TypeVar("T")
FOLLOW_POLL_SECONDS = 0.5

app = typer.Typer(
    help="Astra operations runbooks as durable Temporal workflows.",
    # Plain help: flags read as flags (`--dry-run`, not `--dry-run <bool>`).
    rich_markup_mode=None,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def say(text: str = "") -> None:
    """Plain text out: rich would cost every command a tenth of a second to import."""
    print(text)


def table(headings: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; one line per row, wherever it goes (terminal, pipe)."""
    cells = [headings, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headings))]
    return "\n".join(
        " " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


As = Annotated[
    str | None,
    typer.Option(
        "--as",
        help="Who you are, in dev mode only (default: ASTRA_OPS_USER). Elsewhere the API knows "
        "you by ASTRA_OPS_API_TOKEN.",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, without the credentials a URL in it may carry."""
    from runtime.redact import redact

    print(f"error: {redact(message)}", file=sys.stderr)
    raise typer.Exit(code)


@contextmanager
def clear_errors() -> Iterator[None]:
    """Turn every expected failure into one line and a non-zero exit."""
    try:
        yield
    except RunError as e:
        fail(e.message, 2 if e.kind == "invalid" else 1)
    except (TemporalUnavailable, ConfigError) as e:
        fail(str(e))


def settings() -> Settings:
    with clear_errors():
        return load_settings()


AnyRuns: TypeAlias = "Runs | ApiRuns"


def dev_mode(config: Settings) -> bool:
    """Dev mode: set explicitly, or this directory runs `astra-ops dev` (its marker file)."""
    return config.dev_mode or dev_stack_marker(config).is_file()


def caller(config: Settings, user: str | None) -> str:
    """Who acts: a name in dev mode; outside it the API decides from the token, so a name given
    here would be a claim nobody checks, and is refused."""
    if dev_mode(config):
        return user or config.user or ""
    if user:
        fail(
            "--as works only in dev mode; outside it the API knows you by ASTRA_OPS_API_TOKEN",
            2,
        )
    return ""


def dev_api(stack: DevStack, name: str, acts: bool) -> ApiRuns:
    """The dev stack's API as ``name`` (its dev token); a read needs no name."""
    from starters.api_client import ApiRuns

    if not name:
        if acts or not stack.tokens:
            fail("say who you are: --as NAME (or set ASTRA_OPS_USER)", 2)
        return ApiRuns(stack.api_url, next(iter(stack.tokens.values())))
    if name not in stack.tokens:
        fail(
            f"{name} has no token in this dev stack; it knows {', '.join(sorted(stack.tokens))} "
            "(ASTRA_OPS_API_TOKENS of `astra-ops dev`)",
            2,
        )
    return ApiRuns(stack.api_url, stack.tokens[name])


def api_runs(config: Settings, user: str | None = None, *, acts: bool = False) -> ApiRuns | None:
    """The API this command goes through: the running dev stack's, as ``--as`` names; outside
    dev mode the configured one, as the token's owner. None: dev mode set without a dev stack,
    where the CLI talks to Temporal itself."""
    from starters.api_client import ApiRuns

    stack = dev_stack(config)
    if stack is not None:
        return dev_api(stack, caller(config, user), acts)
    if dev_mode(config):
        return None
    caller(config, user)  # refuses --as
    if config.api_token is None:
        raise SettingsError(
            "outside dev mode the CLI goes through the API: set ASTRA_OPS_API_URL and "
            "ASTRA_OPS_API_TOKEN (or run `astra-ops dev` for a local stack)"
        )
    return ApiRuns(config.api_url, config.api_token.get_secret_value())


def with_runs(
    action: Callable[[AnyRuns, Settings], Awaitable[T]],
    user: str | None = None,
    *,
    acts: bool = False,
) -> T:
    """Run ``action`` through the API (beside `astra-ops dev`, and everywhere outside dev mode)
    or, in dev mode without a dev stack, against Temporal itself. ``acts``: the command changes
    something, so it needs to know who you are."""

    async def main() -> T:
        config = settings()
        api = api_runs(config, user, acts=acts)
        if api is not None:
            return await action(api, config)
        from runtime.access import load_policy
        from starters.runs import Runs  # the Temporal client: only this path needs it

        policy = load_policy(config.access_policy)
        return await action(Runs(await connect(config), config.task_queue, policy), config)

    with clear_errors():
        return asyncio.run(main())


def emit_json(data: Any) -> None:
    say(json.dumps(data, default=str, indent=2))


def parse_params(params: list[str]) -> dict[str, str]:
    parsed = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--param takes key=value, got {item!r}", 2)
        parsed[key.strip()] = value
    return parsed


async def catalogue(name: str | None, params: dict[str, str]) -> list[RunbookCard]:
    """The runbooks as the API describes them (its catalogue and policy are the ones that apply),
    or from this checkout's when no API is configured."""
    config = settings()
    if dev_stack(config) is not None or (not dev_mode(config) and config.api_token is not None):
        api = api_runs(config)
        assert api is not None
        return [await api.runbook(name, params)] if name else await api.runbooks()
    # The catalogue brings the workflow definitions (and Temporal's workflow module).
    from runtime.access import load_policy
    from starters.runbook_cards import runbook_cards

    return runbook_cards(load_policy(config.access_policy), name, params)


@app.command()
def runbooks(
    name: Annotated[
        str | None, typer.Argument(help="One runbook to show in full (default: all, briefly).")
    ] = None,
    param: Annotated[
        list[str],
        typer.Option("--param", "-p", help="k=v: show the steps a start with these would take."),
    ] = [],  # noqa: B006
    as_json: Json = False,
) -> None:
    """List the runbooks with their trigger, owner and parameters, or show one in full.

    Example: astra-ops runbooks shard-scaling -p shards=12 -p scheduler=goal-service
    """
    params = parse_params(param)
    if params and name is None:
        fail("--param needs a runbook: astra-ops runbooks NAME --param k=v", 2)
    with clear_errors():
        cards = asyncio.run(catalogue(name, params))
    if as_json:
        emit_json([card.model_dump(mode="json") for card in cards])
        return
    if name is None:
        for card in cards:
            say(f"{card.name}  ({card.severity}, {card.rotation})  {card.trigger}")
            for p in card.parameters:
                say(f"  {p.line()}")
        say("`astra-ops runbooks NAME` shows one runbook's steps and approvals too.")
        return
    card = cards[0]
    say(f"{card.name}: {card.title}")
    for label, value in (
        ("trigger", card.trigger),
        ("rotation", card.rotation),
        ("severity", card.severity),
        ("started by", ", ".join(card.started_by) or "nobody"),
        ("dry runs by", ", ".join(card.dry_runs_by) or "nobody"),
        ("cancelled by", ", ".join(["the requester", *card.cancelled_by])),
    ):
        say(f"{label}: {value}")
    say("steps:")
    for number, step in enumerate(card.steps, 1):
        say(f"  {number}. {step}")
    say("approvals:")
    for line in card.approvals:
        say(f"  {line}")
    say("parameters:")
    for p in card.parameters:
        say(f"  {p.line()}")


@app.command()
def start(
    runbook: Annotated[str, typer.Argument(help="Runbook name (see `astra-ops runbooks`).")],
    param: Annotated[list[str], typer.Option("--param", "-p", help="k=v, repeatable.")] = [],  # noqa: B006
    reason: Annotated[str, typer.Option(help="Why this run; shown to approvers.")] = "",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report, change nothing.")] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the run step by step until it ends.")
    ] = False,
    user: As = None,
    as_json: Json = False,
) -> None:
    """Start a runbook run (or return the run already open for the same request).

    Example: astra-ops start shard-scaling -p shards=12 --reason "rebalance hot shards"
    """
    params = parse_params(param)

    async def action(runs: AnyRuns, config: Settings) -> int:
        started = await runs.start(
            runbook,
            params,
            requester=caller(config, user),
            reason=reason,
            dry_run=dry_run,
        )
        if as_json and not wait:
            emit_json({"run_id": started.run_id, "existing": started.existing})
            return 0
        if not as_json:
            verb = "already open" if started.existing else "started"
            say(f"{started.run_id} {verb}; follow it with `astra-ops status {started.run_id}`")
        if not wait:
            return 0
        view = await follow(runs, started.run_id, quiet=as_json)
        if as_json:
            emit_json(view_json(view))
        return exit_code(view)

    code = with_runs(action, user, acts=True)
    if code:
        raise typer.Exit(code)


async def follow(runs: AnyRuns, run_id: str, *, quiet: bool = False) -> RunView:
    """Print one line per step as it starts and ends, and the approval it waits for, until the
    run is over; then its outcome."""
    seen: dict[str, str] = {}
    while True:
        view = await runs.view(run_id)
        for step in view.steps:
            state = step.state.value
            if state != "pending" and seen.get(step.name) != state and not quiet:
                detail = f": {step.detail}" if step.detail else ""
                say(f"  {step.name}: {state}{detail}")
            seen[step.name] = state
        for pending in view.status.pending_approvals if view.status else []:
            key = f"approval:{pending.step}"
            if key not in seen and not quiet:
                say(
                    f"  waiting for {', '.join(pending.groups)} to approve '{pending.step}' "
                    f"(eligible: {', '.join(pending.members) or 'nobody'}) until "
                    f"{pending.deadline:%Y-%m-%d %H:%M:%S}Z"
                )
            seen[key] = "shown"
        if view.state != "running":
            if not quiet:
                say(outcome_line(view))
            return view
        await asyncio.sleep(FOLLOW_POLL_SECONDS)


def outcome_of(view: RunView) -> str:
    if view.result is not None:
        return view.result.outcome.value
    if view.status is not None and view.status.outcome is not None:
        return view.status.outcome.value
    return view.state


def outcome_line(view: RunView) -> str:
    if view.result is not None:
        return f"{view.result.outcome.value}: {view.result.summary}"
    if view.status is not None and view.status.outcome is not None:
        return f"{view.status.outcome.value}: {view.status.summary}"
    if view.failure:
        return f"failed: {view.failure}"
    return view.state


def exit_code(view: RunView) -> int:
    """done / no change: 0; rejected, aborted, cancelled, rolled back: 2; failed: 1."""
    outcome = outcome_of(view)
    if outcome in ("done", "no_change"):
        return 0
    if outcome in ("rejected", "aborted", "cancelled", "rolled_back"):
        return 2
    return 1


@app.command()
def ps(
    awaiting_approval: Annotated[
        bool, typer.Option("--awaiting-approval", help="Only runs waiting for a person.")
    ] = False,
    as_json: Json = False,
) -> None:
    """List recent runs, newest first, with how each ended and whether it was a dry run.

    Example: astra-ops ps --awaiting-approval
    """

    async def action(runs: AnyRuns, _: Settings) -> None:
        listed = await runs.list_runs(awaiting_approval=awaiting_approval)
        if as_json:
            emit_json([r.model_dump(mode="json") for r in listed])
            return
        rows = [
            [
                r.run_id,
                r.state,
                (r.outcome or "").replace("_", " ") + (" (dry-run)" if r.dry_run else ""),
                r.step or "",
                "waiting" if r.awaiting_approval else "",
                f"{r.started_at:%m-%d %H:%M:%S}" if r.started_at else "",
            ]
            for r in listed
        ]
        say(table(["run", "state", "outcome", "step", "approval?", "started"], rows))

    with_runs(action)


def print_view(view: RunView) -> None:
    say(f"{view.run_id}  {view.runbook}  {view.state}")
    if view.status:
        say(
            f"requested by {view.status.requester}: {view.status.reason or '-'}"
            + ("  (dry-run)" if view.status.dry_run else "")
        )
        if view.status.frozen_by and view.state == "running":
            say(
                f"FROZEN by {view.status.frozen_by}: {view.status.frozen_reason}; "
                "no mutating step starts until `astra-ops unfreeze`"
            )
    rows = [
        [
            step.name,
            step.state.value,
            f"{step.started_at:%H:%M:%S}" if step.started_at else "",
            f"{step.finished_at:%H:%M:%S}" if step.finished_at else "",
            step.detail,
        ]
        for step in view.steps
    ]
    say(table(["step", "state", "started", "finished", "detail"], rows))
    for pending in view.status.pending_approvals if view.status else []:
        say(
            f"awaiting approval of '{pending.step}' by {', '.join(pending.groups)} "
            f"({len(pending.approvers)}/{pending.required}; eligible: "
            f"{', '.join(pending.members)}) until {pending.deadline:%Y-%m-%d %H:%M:%S}Z:"
            f" `astra-ops approve {view.run_id}`"
        )
    if view.state != "running":
        say(outcome_line(view))


@app.command()
def status(
    run_id: str,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the run step by step until it ends.")
    ] = False,
    as_json: Json = False,
) -> None:
    """Show a run: its state, each step with times and what it found, pending approvals, and
    how it ended.

    Example: astra-ops status shard-scaling/astra --wait
    """

    async def action(runs: AnyRuns, _: Settings) -> int:
        if wait:
            view = await follow(runs, run_id, quiet=as_json)
        else:
            view = await runs.view(run_id)
        if as_json:
            emit_json(view_json(view))
        elif not wait:
            print_view(view)
        return exit_code(view) if wait else 0

    code = with_runs(action)
    if code:
        raise typer.Exit(code)


def view_json(view: RunView) -> dict[str, Any]:
    status = view.status
    return {
        "run_id": view.run_id,
        "runbook": view.runbook,
        "state": view.state,
        "outcome": outcome_of(view),
        "started_at": view.started_at,
        "closed_at": view.closed_at,
        "steps": [s.model_dump(mode="json") for s in view.steps],
        "pending_approvals": [
            p.model_dump(mode="json") for p in (status.pending_approvals if status else [])
        ],
        "decisions": [d.model_dump(mode="json") for d in (status.decisions if status else [])],
        "cancelled_by": status.cancelled_by if status else None,
        "frozen_by": status.frozen_by if status else None,
        "result": view.result.model_dump(mode="json") if view.result else None,
        "failure": view.failure,
    }


def decide(
    run_id: str,
    verdict: str,
    step: str | None,
    comment: str,
    user: str | None,
    print_signal: bool,
) -> None:
    async def action(runs: AnyRuns, config: Settings) -> None:
        decision = Decision(
            approver=caller(config, user), step=step, comment=comment, decision=verdict
        )
        if not print_signal:
            say(await runs.decide(run_id, decision))
            return
        signal = await runs.signed_signal(run_id, decision)
        payload = json.dumps(signal["input"], separators=(",", ":"))
        say(
            f"temporal workflow signal --workflow-id {shlex.quote(signal['workflow_id'])} "
            f"--name {signal['signal']} --input {shlex.quote(payload)}"
        )

    with_runs(action, user, acts=True)


Step = Annotated[str | None, typer.Option(help="The step to decide (default: the pending one).")]
Comment = Annotated[str, typer.Option(help="Why; recorded with the decision.")]
PrintSignal = Annotated[
    bool,
    typer.Option(
        "--print-signal",
        help="Print a signed `temporal workflow signal` command instead of deciding "
        "(valid for 10 minutes).",
    ),
]


@app.command()
def approve(
    run_id: str,
    step: Step = None,
    comment: Comment = "",
    user: As = None,
    print_signal: PrintSignal = False,
) -> None:
    """Approve the step a run is waiting on (you cannot approve your own run).

    Example: astra-ops approve shard-scaling/astra --comment "checked the shard map"
    """
    decide(run_id, "approve", step, comment, user, print_signal)


@app.command()
def reject(
    run_id: str,
    step: Step = None,
    comment: Comment = "",
    user: As = None,
    print_signal: PrintSignal = False,
) -> None:
    """Reject the step a run is waiting on; the run stops safely.

    Example: astra-ops reject shard-scaling/astra --comment "wrong count"
    """
    decide(run_id, "reject", step, comment, user, print_signal)


Reason = Annotated[str, typer.Option(help="Why; recorded in the run's history and status.")]


@app.command()
def cancel(run_id: str, reason: Reason = "", user: As = None) -> None:
    """Cancel a run; it undoes what it changed before it stops, and records who and why.

    Example: astra-ops cancel shard-scaling/astra --reason "wrong cluster"
    """

    async def action(runs: AnyRuns, config: Settings) -> None:
        say(await runs.cancel(run_id, caller(config, user), reason))

    with_runs(action, user, acts=True)


@app.command()
def freeze(reason: Reason = "", user: As = None) -> None:
    """Kill switch: hold every mutating step of every run; refuse new starts but dry runs.

    Example: astra-ops freeze --reason "database failover in progress"
    """

    async def action(runs: AnyRuns, config: Settings) -> None:
        say(await runs.freeze(caller(config, user), reason))

    with_runs(action, user, acts=True)


@app.command()
def unfreeze(reason: Reason = "", user: As = None) -> None:
    """Lift the kill switch; every held run resumes.

    Example: astra-ops unfreeze --reason "failover done"
    """

    async def action(runs: AnyRuns, config: Settings) -> None:
        say(await runs.unfreeze(caller(config, user), reason))

    with_runs(action, user, acts=True)


@app.command()
def worker() -> None:
    """Run one worker against the configured Temporal until SIGTERM.

    Example: ASTRA_OPS_TEMPORAL_ADDRESS=temporal:7233 astra-ops worker
    """
    from workers.worker import run_worker

    with clear_errors():
        asyncio.run(run_worker(settings()))


@app.command()
def api() -> None:
    """Serve the HTTP API (and the UI's codec endpoints) until SIGTERM.

    Example: ASTRA_OPS_SIGNING_KEY_FILE=/keys/api.key astra-ops api
    """
    from starters.api import serve

    with clear_errors():
        serve(settings())


@app.command()
def dev() -> None:
    """Run the whole stack locally: Temporal + UI, sandbox cluster, worker, API. Ctrl-C stops it.

    Example: astra-ops dev   (or `make run`)
    """
    from starters.dev import run_dev

    with clear_errors():
        sys.exit(asyncio.run(run_dev(settings())))


@app.command()
def setup() -> None:
    """Create or upgrade astra-ops' own tables and register its search attributes (idempotent).

    The tables go into the databases ASTRA_OPS_DATABASE_URL and ASTRA_OPS_STATE_DATABASE_URL name,
    the search attributes onto the Temporal namespace. Run it on every release, before the new
    workers start.

    Example: ASTRA_OPS_DATABASE_URL=postgresql://astra_ops@db.astra/astra astra-ops setup
    """

    async def prepare() -> None:
        config = settings()
        from runtime.migrations import MigrationError, describe, upgrade
        from runtime.search_attributes import register_search_attributes

        try:
            applied = await upgrade(config.database_url, config.state_dsn)
        except MigrationError as e:
            fail(str(e))
        databases = sorted({describe(config.database_url), describe(config.state_dsn)})
        say(
            f"{' and '.join(databases)}: "
            + (f"applied {', '.join(applied)}" if applied else "schema up to date")
        )
        client = await connect(config)
        await register_search_attributes(client, config.temporal_namespace)
        say(f"search attributes registered on namespace {config.temporal_namespace}")

    with clear_errors():
        asyncio.run(prepare())


@app.command()
def keygen(
    key_id: Annotated[str, typer.Argument(help="Name of the new key.")] = "k1",
    signing: Annotated[
        bool,
        typer.Option(
            "--signing",
            help="An Ed25519 pair for proven identities instead of a payload key: the private "
            "line goes to the API's ASTRA_OPS_SIGNING_KEY_FILE, the public line to the workers' "
            "ASTRA_OPS_TRUSTED_KEYS.",
        ),
    ] = False,
) -> None:
    """Print a new payload-encryption key line (ASTRA_OPS_CODEC_KEYS), or a signing key pair.

    Example: astra-ops keygen --signing api-2026
    """
    from runtime.identity import load_signer, new_signing_key_line
    from runtime.keys import new_key_line

    if not signing:
        say(new_key_line(key_id))
        return
    # Both lines can go into the API's key file as they are: the public one is a comment there.
    private = new_signing_key_line(key_id)
    say(private)
    public = load_signer(private).public_line()
    say(f"# public, for the workers' ASTRA_OPS_TRUSTED_KEYS: {public}")


@cache
def sandbox_commands() -> typer.core.TyperGroup:
    from starters.sandbox_cli import sandbox_app

    group = typer.main.get_command(sandbox_app)
    assert isinstance(group, typer.core.TyperGroup)
    return group


class SandboxGroup(typer.core.TyperGroup):
    """`astra-ops sandbox`, whose commands load only when one of them runs: they import the
    sandbox (the fake cluster and its server, the data-plane clients), which takes longer than
    any other command should."""

    def list_commands(self, ctx: Context) -> list[str]:
        return sandbox_commands().list_commands(ctx)

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        return sandbox_commands().get_command(ctx, cmd_name)


app.add_typer(
    typer.Typer(
        cls=SandboxGroup,
        help="The simulated Astra: inject faults, reset it, run it.",
        no_args_is_help=True,
    ),
    name="sandbox",
)


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
