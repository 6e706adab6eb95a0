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
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeAlias, TypeVar

import typer

from runtime.client import DevStack, TemporalUnavailable, connect, dev_stack, dev_stack_marker
from runtime.errors import ConfigError
from runtime.settings import Settings, SettingsError, load_settings
from starters.run_views import RunbookCard, RunError, RunView
from workflows.models import Decision, SteerAction

if TYPE_CHECKING:
    from temporalio.client import Client

    # typer's own copy of click, whose types its group methods take.
    from typer._click import Command, Context

    from starters.api_client import ApiClient, ApiRuns
    from starters.api_incidents import ApiIncidents
    from starters.incidents import Incidents
    from starters.runs import Runs

T = TypeVar("T")
Steer = TypeVar("Steer")
ApiT = TypeVar("ApiT", bound="ApiClient")
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
AnyIncidents: TypeAlias = "Incidents | ApiIncidents"


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


def dev_api(stack: DevStack, name: str, acts: bool, kind: type[ApiT]) -> ApiT:
    """The dev stack's API as ``name`` (its dev token); a read needs no name."""
    if not name:
        if acts or not stack.tokens:
            fail("say who you are: --as NAME (or set ASTRA_OPS_USER)", 2)
        return kind(stack.api_url, next(iter(stack.tokens.values())))
    if name not in stack.tokens:
        fail(
            f"{name} has no token in this dev stack; it knows {', '.join(sorted(stack.tokens))} "
            "(ASTRA_OPS_API_TOKENS of `astra-ops dev`)",
            2,
        )
    return kind(stack.api_url, stack.tokens[name])


def api_of(
    kind: type[ApiT], config: Settings, user: str | None = None, *, acts: bool = False
) -> ApiT | None:
    """The API this command goes through: the running dev stack's, as ``--as`` names; outside
    dev mode the configured one, as the token's owner. None: dev mode set without a dev stack,
    where the CLI talks to Temporal itself."""
    stack = dev_stack(config)
    if stack is not None:
        return dev_api(stack, caller(config, user), acts, kind)
    if dev_mode(config):
        return None
    caller(config, user)  # refuses --as
    if config.api_token is None:
        raise SettingsError(
            "outside dev mode the CLI goes through the API: set ASTRA_OPS_API_URL and "
            "ASTRA_OPS_API_TOKEN (or run `astra-ops dev` for a local stack)"
        )
    return kind(config.api_url, config.api_token.get_secret_value())


def api_runs(config: Settings, user: str | None = None, *, acts: bool = False) -> ApiRuns | None:
    from starters.api_client import ApiRuns

    return api_of(ApiRuns, config, user, acts=acts)


def steer(
    remote: Callable[[Settings], Steer | None],
    local: Callable[[Client, Settings], Steer],
    action: Callable[[Steer, Settings], Awaitable[T]],
) -> T:
    """Run ``action`` through the API (``remote``: beside `astra-ops dev`, and everywhere
    outside dev mode) or, in dev mode without a dev stack, against Temporal itself (``local``)."""

    async def main() -> T:
        config = settings()
        api = remote(config)
        if api is not None:
            return await action(api, config)
        return await action(local(await connect(config), config), config)

    with clear_errors():
        return asyncio.run(main())


def local_runs(client: Client, config: Settings) -> Runs:
    """Runs against Temporal itself; only this path loads the Temporal client."""
    from runtime.access import load_policy
    from starters.runs import Runs

    return Runs(client, config.task_queue, load_policy(config.access_policy))


def with_runs(
    action: Callable[[AnyRuns, Settings], Awaitable[T]],
    user: str | None = None,
    *,
    acts: bool = False,
) -> T:
    """Run ``action`` on the runs, through the API or in dev mode against Temporal (``steer``).
    ``acts``: the command changes something, so it needs to know who you are."""

    def remote(config: Settings) -> AnyRuns | None:
        return api_runs(config, user, acts=acts)

    def local(client: Client, config: Settings) -> AnyRuns:
        return local_runs(client, config)

    return steer(remote, local, action)


def with_incidents(
    action: Callable[[AnyIncidents, Settings], Awaitable[T]],
    user: str | None = None,
    *,
    acts: bool = False,
) -> T:
    """Run ``action`` on the incidents, as ``with_runs`` on the runs."""

    def remote(config: Settings) -> AnyIncidents | None:
        from starters.api_incidents import ApiIncidents

        return api_of(ApiIncidents, config, user, acts=acts)

    def local(client: Client, config: Settings) -> AnyIncidents:
        from starters.incidents import Incidents

        return Incidents(local_runs(client, config))

    return steer(remote, local, action)


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
    for steered in view.status.steered if view.status else []:
        say(
            f"{steered.action.value} by {steered.actor} at {steered.at:%Y-%m-%d %H:%M:%S}Z"
            + (f": {steered.reason}" if steered.reason else "")
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


canary_app = typer.Typer(
    help="Steer a canary-upgrade run: end its window now, stop its clock, or roll it back.\n\n"
    "Example: astra-ops canary pause canary-upgrade/astra/astra-worker --reason 'a dip'",
    no_args_is_help=True,
)
app.add_typer(canary_app, name="canary")


def steer_release(run_id: str, action: SteerAction, reason: str, user: str | None) -> None:
    async def act(runs: AnyRuns, config: Settings) -> None:
        say(await runs.steer(run_id, caller(config, user), action, reason))

    with_runs(act, user, acts=True)


@canary_app.command("promote")
def canary_promote(run_id: str, reason: Reason = "", user: As = None) -> None:
    """End the canary's window now and go on to the next step (its approvers may).

    Example: astra-ops canary promote canary-upgrade/astra/astra-worker --reason "dashboards clean"
    """
    steer_release(run_id, SteerAction.PROMOTE, reason, user)


@canary_app.command("abort")
def canary_abort(run_id: str, reason: Reason = "", user: As = None) -> None:
    """Stop the canary and roll back to the image that ran before.

    Example: astra-ops canary abort canary-upgrade/astra/astra-worker --reason "p95 doubled"
    """
    steer_release(run_id, SteerAction.ABORT, reason, user)


@canary_app.command("pause")
def canary_pause(run_id: str, reason: Reason = "", user: As = None) -> None:
    """Stop the window's clock (the analysis goes on) until `resume`.

    Example: astra-ops canary pause canary-upgrade/astra/astra-worker --reason "checking a dip"
    """
    steer_release(run_id, SteerAction.PAUSE, reason, user)


@canary_app.command("resume")
def canary_resume(run_id: str, reason: Reason = "", user: As = None) -> None:
    """Start the paused window's clock again.

    Example: astra-ops canary resume canary-upgrade/astra/astra-worker
    """
    steer_release(run_id, SteerAction.RESUME, reason, user)


blue_green_app = typer.Typer(
    help="Steer a blue-green-upgrade run while blue is kept: send the work back to blue, or "
    "end the window.\n\nExample: astra-ops blue-green switch-back "
    "blue-green-upgrade/astra/astra-worker --reason '5xx'",
    no_args_is_help=True,
)
app.add_typer(blue_green_app, name="blue-green")


@blue_green_app.command("switch-back")
def blue_green_switch_back(run_id: str, reason: Reason = "", user: As = None) -> None:
    """Send the Service's work back to blue at once (while blue is kept), and end the run.

    Example: astra-ops blue-green switch-back blue-green-upgrade/astra/astra-worker --reason "5xx"
    """
    steer_release(run_id, SteerAction.SWITCH_BACK, reason, user)


@blue_green_app.command("promote")
def blue_green_promote(run_id: str, reason: Reason = "", user: As = None) -> None:
    """End the window now: blue is scaled down (its approvers may).

    Example: astra-ops blue-green promote blue-green-upgrade/astra/astra-worker
    """
    steer_release(run_id, SteerAction.PROMOTE, reason, user)


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


class WorkerKind(StrEnum):
    ALL = "all"
    STANDARD = "standard"
    PRIVILEGED = "privileged"


@app.command()
def worker(
    kind: Annotated[
        WorkerKind | None,
        typer.Option(
            help="standard: the runs and what needs no rights on Astra; privileged: only what "
            "acts on Astra's cluster, data plane and secrets (deploy it with those rights); "
            "all: both. Default: ASTRA_OPS_WORKER_KIND, else all.",
        ),
    ] = None,
) -> None:
    """Run one worker against the configured Temporal until SIGTERM.

    Example: ASTRA_OPS_TEMPORAL_ADDRESS=temporal:7233 astra-ops worker --kind standard
    """
    from workers.worker import run_worker

    with clear_errors():
        config = settings()
        if kind is not None:
            config = config.model_copy(update={"worker_kind": kind.value})
        asyncio.run(run_worker(config))


@app.command()
def api() -> None:
    """Serve the HTTP API (and the UI's codec endpoints) until SIGTERM.

    Example: ASTRA_OPS_SIGNING_KEY_FILE=/keys/api.key astra-ops api
    """
    from starters.api import serve

    with clear_errors():
        serve(settings())


@app.command()
def dev(
    replicated: Annotated[
        bool,
        typer.Option(
            "--replicated",
            help="Own PostgreSQL with a streaming replica and own Redis with a replica "
            "(synchronous unless ASTRA_OPS_DATA_PLANE_REPLICATION=async).",
        ),
    ] = False,
    sentinel: Annotated[
        bool, typer.Option("--sentinel", help="Redis Sentinel beside the own Redis.")
    ] = False,
) -> None:
    """Run the whole stack locally: Temporal + UI, sandbox cluster, worker, API. Ctrl-C stops it.

    PostgreSQL and Redis are the configured ones where they answer, else servers of its own
    under ASTRA_OPS_STATE_DIR (ASTRA_OPS_DATA_PLANE=auto|own|external says which).

    Example: astra-ops dev --replicated   (or `make run`)
    """
    from starters.dev import run_dev

    with clear_errors():
        config = settings()
        if replicated and config.data_plane_replication == "none":
            config = config.model_copy(update={"data_plane_replication": "sync"})
        if sentinel:
            config = config.model_copy(update={"data_plane_sentinel": True})
        sys.exit(asyncio.run(run_dev(config)))


@app.command()
def setup() -> None:
    """Create or upgrade astra-ops' own tables, register its search attributes and its schedules
    (the daily certificate scan); idempotent.

    The tables go into the databases ASTRA_OPS_DATABASE_URL and ASTRA_OPS_STATE_DATABASE_URL name,
    the search attributes and schedules onto the Temporal namespace. Run it on every release,
    before the new workers start.

    Example: ASTRA_OPS_DATABASE_URL=postgresql://astra_ops@db.astra/astra astra-ops setup
    """

    async def prepare() -> None:
        config = settings()
        from runtime.migrations import MigrationError, describe, upgrade
        from runtime.search_attributes import register_search_attributes
        from starters.schedules import register_schedules

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
        for line in await register_schedules(client, config):
            say(f"schedule {line}")

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


# -- upgrade safety ----------------------------------------------------------------------------


@app.command("check-migrations")
def check_migrations(
    directory: Annotated[Path, typer.Argument(help="A directory of SQL migration files.")],
    uses: Annotated[
        list[Path],
        typer.Option(
            "--uses",
            help="The running binary's queries, as SQL (repeatable). Without it every existing "
            "table and column counts as in use.",
        ),
    ] = [],  # noqa: B006
    applied: Annotated[
        str | None,
        typer.Option(
            help="The last migration the running schema already has: it and the files before "
            "it are not checked."
        ),
    ] = None,
    as_json: Json = False,
) -> None:
    """Flag migrations that break the binary that is running, each with the expand/contract way.

    Exit 0: none; 1: findings; 2: a file could not be read or parsed.

    Example: astra-ops check-migrations migrations/ --uses queries.sql --applied 0007_index.sql
    """
    # PostgreSQL's parser is loaded by this command only: every other one starts without it.
    from runtime.migration_safety import (
        SqlFile,
        SqlInputError,
        check_migrations,
        read_migrations_dir,
    )

    try:
        report = check_migrations(
            read_migrations_dir(directory),
            [SqlFile.read(path) for path in uses] if uses else None,
            applied,
        )
    except SqlInputError as err:
        fail(str(err), 2)
    if as_json:
        emit_json({**report.model_dump(mode="json"), "basis": report.basis()})
    else:
        for finding in report.findings:
            say(f"{finding.file}:{finding.line}: {finding.kind} {finding.subject()}")
            say(f"  {' '.join(finding.statement.split())}")
            say(f"  why: {finding.why}")
            say(f"  instead: {finding.instead}")
        verdict = f"{len(report.findings)} finding(s)" if report.findings else "no findings"
        say(f"{verdict} in {len(report.checked)} migration file(s); {report.basis()}")
    if report.findings:
        raise typer.Exit(1)


@app.command("check-contracts")
def check_contracts(
    old: Annotated[
        str, typer.Argument(help="The running version: a JSON Schema file or module:Model.")
    ],
    new: Annotated[str, typer.Argument(help="The new version, likewise.")],
    as_json: Json = False,
) -> None:
    """Flag what a new message schema removes or narrows: fields, requirements, types, bounds.

    Exit 0: compatible; 1: findings; 2: a schema could not be loaded.

    Example: astra-ops check-contracts old/runbook-request.json workflows.models:RunbookRequest
    """
    from runtime.contract_safety import ContractInputError, check_contracts, load_contract

    try:
        report = check_contracts(load_contract(old), load_contract(new))
    except ContractInputError as err:
        fail(str(err), 2)
    if as_json:
        emit_json(report.model_dump(mode="json"))
    else:
        for finding in report.findings:
            say(f"{finding.path}: {finding.kind}: {finding.detail}")
            say(f"  why: {finding.why}")
        verdict = f"{len(report.findings)} finding(s)" if report.findings else "compatible"
        say(f"{verdict}: {new} against {old}")
    if report.findings:
        raise typer.Exit(1)


# -- incidents ---------------------------------------------------------------------------------

incident_app = typer.Typer(
    help="Incidents: open, watch and steer them (acknowledge, command, severity, notes, "
    "runbooks, stages, action items).\n\nExample: astra-ops incident list --open",
    no_args_is_help=True,
)
app.add_typer(incident_app, name="incident")
items_app = typer.Typer(
    help="An incident's action items (Remediation Review).\n\n"
    "Example: astra-ops incident action complete 4f2a9c1e0b7d3a5c6e8f item-1",
    no_args_is_help=True,
)
incident_app.add_typer(items_app, name="action")

IncidentId = Annotated[
    str, typer.Argument(help="The incident, as `incident list` shows it (`incident/` optional).")
]
Note = Annotated[str, typer.Option("--note", help="A note for the timeline.")]
Why = Annotated[str, typer.Option("--reason", help="Why; recorded on the timeline.")]
DATES = ["%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"]

if TYPE_CHECKING:
    from pydantic import BaseModel

    from workflows.incident_models import IncidentState

M = TypeVar("M", bound="BaseModel")


def model_of(model: type[M], **values: Any) -> M:
    """The request a command's options make, or one line naming what is wrong with them."""
    from pydantic import ValidationError

    try:
        return model.model_validate(values)
    except ValidationError as err:
        fail(
            "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in err.errors()
            ),
            2,
        )


def act_on(incident_id: str, kind: str, user: str | None, as_json: bool, **fields: Any) -> None:
    """Send one action to an incident as the person this command runs as."""
    from workflows.incident_models import ActionKind, ActionRequest

    request = model_of(ActionRequest, **fields)

    async def action(incidents: AnyIncidents, config: Settings) -> None:
        said = await incidents.act(
            incident_id, ActionKind(kind), request, actor=caller(config, user)
        )
        if as_json:
            emit_json({"message": said})
        else:
            say(said)

    with_incidents(action, user, acts=True)


@incident_app.command("list")
def incident_list(
    open_only: Annotated[bool, typer.Option("--open", help="Only open incidents.")] = False,
    severity: Annotated[
        str | None, typer.Option(help="Only this severity: SEV1, SEV2 or SEV3.")
    ] = None,
    as_json: Json = False,
) -> None:
    """List incidents, newest first: severity, stage, title, who opened them.

    Example: astra-ops incident list --open --severity SEV1
    """
    from workflows.incident_models import Severity

    level = None
    if severity is not None:
        try:
            level = Severity(severity.upper())
        except ValueError:
            fail(f"--severity takes SEV1, SEV2 or SEV3, not {severity!r}", 2)

    async def action(incidents: AnyIncidents, _: Settings) -> None:
        listed = await incidents.list_incidents(open_only=open_only, severity=level)
        if as_json:
            emit_json([i.model_dump(mode="json") for i in listed])
            return
        rows = [
            [
                i.incident_id,
                i.severity or "",
                i.stage or "",
                i.state,
                f"{i.opened_at:%m-%d %H:%M}" if i.opened_at else "",
                i.opened_by,
                i.title,
            ]
            for i in listed
        ]
        say(table(["incident", "sev", "stage", "state", "opened", "by", "title"], rows))

    with_incidents(action)


def print_incident(state: IncidentState) -> None:
    say(f"{state.incident_id}  {state.severity.value}  {state.stage.value}")
    say(state.title)
    for label, value in (
        ("opened", f"{state.opened_at:%Y-%m-%d %H:%M:%S}Z by {state.opened_by}"),
        ("rotation", state.rotation),
        ("components", ", ".join(state.components)),
        ("commander", state.commander or "nobody yet"),
        ("acknowledged by", state.acknowledged_by or "nobody yet"),
        ("alerts firing", str(state.firing)),
        ("tags", ", ".join(state.tags)),
        ("user-visible", "yes" if state.user_visible else ""),
        ("postmortem", state.postmortem or ""),
    ):
        if value:
            say(f"{label}: {value}")
    if state.runs:
        say("runbooks:")
        rows = [[r.run_id, r.runbook, r.started_by, r.outcome or "running"] for r in state.runs]
        say(table(["run", "runbook", "by", "outcome"], rows))
    if state.items:
        say("action items:")
        rows = [[i.id, i.state, i.owner, f"{i.due:%Y-%m-%d}", i.text] for i in state.items]
        say(table(["item", "state", "owner", "due", "text"], rows))
    say("timeline:")
    # In time order, as the postmortem: a runbook's steps join the timeline when it ends.
    rows = [
        [f"{e.at:%m-%d %H:%M:%S}", e.kind, e.actor, e.text]
        for e in sorted(state.timeline, key=lambda e: e.at)
    ]
    say(table(["at", "what", "who", ""], rows))


@incident_app.command("show")
def incident_show(incident_id: IncidentId, as_json: Json = False) -> None:
    """Show an incident: severity, stage, commander, runbooks, action items and its timeline.

    Example: astra-ops incident show incident/4f2a9c1e0b7d3a5c6e8f
    """

    async def action(incidents: AnyIncidents, _: Settings) -> None:
        view = await incidents.show(incident_id)
        if as_json:
            emit_json(view.model_dump(mode="json", by_alias=True))
        elif view.incident is not None:
            print_incident(view.incident)
            if view.state != "running":
                say(f"({view.state})")
        else:
            say(f"{view.incident_id}  {view.severity or ''}  {view.stage or ''}  {view.state}")
            say(view.title)
            say(view.unanswered or "")

    with_incidents(action)


@incident_app.command("open")
def incident_open(
    title: Annotated[str, typer.Option(help="What is wrong, in one line.")],
    severity: Annotated[str, typer.Option(help="SEV1, SEV2 or SEV3 (see the README).")],
    component: Annotated[
        list[str],
        typer.Option("--component", "-c", help="An affected component, repeatable (workers)."),
    ] = [],  # noqa: B006
    tag: Annotated[
        list[str], typer.Option("--tag", help="A tag, repeatable (auth, data-exposure).")
    ] = [],  # noqa: B006
    user_visible: Annotated[
        bool, typer.Option("--user-visible", help="Users see it: the status page says so.")
    ] = False,
    reason: Annotated[str, typer.Option(help="What you see; on the timeline.")] = "",
    idempotency_key: Annotated[
        str | None, typer.Option(help="Open at most one incident for this key, however often.")
    ] = None,
    user: As = None,
    as_json: Json = False,
) -> None:
    """Open an incident by hand (an alert group opens its own).

    Example: astra-ops incident open --severity SEV2 --title "task failures at 9%" -c tasks
    """
    from workflows.incident_models import IncidentRequest

    request = model_of(
        IncidentRequest,
        title=title,
        severity=severity.upper(),
        components=component,
        tags=tag,
        user_visible=user_visible,
        reason=reason,
    )

    async def action(incidents: AnyIncidents, config: Settings) -> None:
        opened = await incidents.open(
            request, opened_by=caller(config, user), idempotency_key=idempotency_key
        )
        if as_json:
            emit_json(opened.model_dump(mode="json"))
            return
        verb = "was opened earlier with this key" if opened.existing else "opened"
        say(f"{opened.incident_id} {verb}; `astra-ops incident show {opened.incident_id}`")

    with_incidents(action, user, acts=True)


@incident_app.command("ack")
def incident_ack(
    incident_id: IncidentId, note: Note = "", user: As = None, as_json: Json = False
) -> None:
    """Acknowledge the incident: you are on it, and the escalation stops.

    Example: astra-ops incident ack 4f2a9c1e0b7d3a5c6e8f
    """
    act_on(incident_id, "acknowledge", user, as_json, text=note)


@incident_app.command("command")
def incident_command(
    incident_id: IncidentId,
    person: Annotated[
        str | None, typer.Option(help="Nominate this person (default: take it yourself).")
    ] = None,
    note: Note = "",
    user: As = None,
    as_json: Json = False,
) -> None:
    """Take the incident commander role, or nominate someone.

    Example: astra-ops incident command 4f2a9c1e0b7d3a5c6e8f --person bob
    """
    act_on(incident_id, "command", user, as_json, person=person, text=note)


@incident_app.command("severity")
def incident_severity(
    incident_id: IncidentId,
    severity: Annotated[str, typer.Argument(help="SEV1, SEV2 or SEV3.")],
    reason: Annotated[str, typer.Option(help="Why it changes; required.")],
    user: As = None,
    as_json: Json = False,
) -> None:
    """Change the incident's severity, saying why.

    Example: astra-ops incident severity 4f2a9c1e0b7d3a5c6e8f SEV1 --reason "all regions"
    """
    act_on(incident_id, "severity", user, as_json, severity=severity.upper(), text=reason)


@incident_app.command("note")
def incident_note(
    incident_id: IncidentId,
    text: Annotated[str, typer.Argument(help="The note.")],
    user: As = None,
    as_json: Json = False,
) -> None:
    """Add a note to the incident's timeline.

    Example: astra-ops incident note 4f2a9c1e0b7d3a5c6e8f "replica lag back to 0"
    """
    act_on(incident_id, "note", user, as_json, text=text)


@incident_app.command("runbook")
def incident_runbook(
    incident_id: IncidentId,
    runbook: Annotated[str, typer.Argument(help="Runbook name (see `astra-ops runbooks`).")],
    param: Annotated[list[str], typer.Option("--param", "-p", help="k=v, repeatable.")] = [],  # noqa: B006
    reason: Annotated[str, typer.Option(help="Why this runbook; shown to approvers.")] = "",
    user: As = None,
    as_json: Json = False,
) -> None:
    """Start a runbook as part of the incident; its steps and outcome join the timeline.

    Example: astra-ops incident runbook 4f2a9c1e0b7d3a5c6e8f worker-lost -p worker_id=astra-worker-7
    """
    act_on(
        incident_id, "runbook", user, as_json, runbook=runbook, params=parse_params(param),
        text=reason,
    )  # fmt: skip


def _stage_command(kind: str, summary: str, example: str) -> None:
    def command(
        incident_id: IncidentId, note: Note = "", user: As = None, as_json: Json = False
    ) -> None:
        act_on(incident_id, kind, user, as_json, text=note)

    command.__doc__ = f"{summary}\n\nExample: astra-ops incident {example}\n"
    incident_app.command(kind)(command)


_stage_command("contain", "Mark the incident contained.", "contain 4f2a9c1e0b7d3a5c6e8f")
_stage_command(
    "remediate",
    "Mark the incident remediated.",
    'remediate 4f2a9c1e0b7d3a5c6e8f --note "failover done"',
)
_stage_command(
    "resolve",
    "Resolve the incident: the postmortem draft is written, the review begins.",
    'resolve 4f2a9c1e0b7d3a5c6e8f --note "error rate normal for 30 min"',
)


@incident_app.command("reopen")
def incident_reopen(
    incident_id: IncidentId,
    reason: Annotated[str, typer.Option(help="Why it is back; required.")],
    user: As = None,
    as_json: Json = False,
) -> None:
    """Reopen a resolved incident (back to triage), saying why.

    Example: astra-ops incident reopen 4f2a9c1e0b7d3a5c6e8f --reason "failures are back"
    """
    act_on(incident_id, "reopen", user, as_json, text=reason)


@items_app.command("add")
def item_add(
    incident_id: IncidentId,
    text: Annotated[str, typer.Argument(help="What must be done.")],
    owner: Annotated[str, typer.Option(help="Who does it.")],
    due: Annotated[datetime, typer.Option(formats=DATES, help="When it is due (UTC).")],
    user: As = None,
    as_json: Json = False,
) -> None:
    """Add an action item with its owner and due date.

    Example: astra-ops incident action add "$INCIDENT" "lag alert" --owner bob --due 2026-12-01
    """
    due_at = due if due.tzinfo else due.replace(tzinfo=UTC)
    act_on(incident_id, "add_item", user, as_json, text=text, person=owner, due=due_at)


@items_app.command("complete")
def item_complete(
    incident_id: IncidentId,
    item: Annotated[str, typer.Argument(help="The item, as `incident show` lists it.")],
    note: Note = "",
    user: As = None,
    as_json: Json = False,
) -> None:
    """Mark an action item done.

    Example: astra-ops incident action complete 4f2a9c1e0b7d3a5c6e8f item-1
    """
    act_on(incident_id, "complete_item", user, as_json, item=item, text=note)


@items_app.command("drop")
def item_drop(
    incident_id: IncidentId,
    item: Annotated[str, typer.Argument(help="The item, as `incident show` lists it.")],
    reason: Annotated[str, typer.Option(help="Why it will not be done; required.")],
    user: As = None,
    as_json: Json = False,
) -> None:
    """Drop an action item, saying why.

    Example: astra-ops incident action drop 4f2a9c1e0b7d3a5c6e8f item-2 --reason "superseded"
    """
    act_on(incident_id, "drop_item", user, as_json, item=item, text=reason)


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
        help="The simulated Astra: inject faults, reset it, run it.\n\n"
        "Example: astra-ops sandbox fault worker-lost",
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
