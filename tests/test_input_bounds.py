"""No input can wedge a run: every runbook, every parameter, extreme values.

Each value is refused before anything starts (one line naming the parameter), or the run it starts
ends, completed or failed, within a deadline. The cases are derived from the catalogue and the
request models, so a new runbook or parameter is covered the day it is added. Which cases are
accepted is predicted with the request model; ``Runs.start`` must agree, so the refusals need no
worker and the accepted cases share one worker per runbook.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import types
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from runtime.access import load_policy
from runtime.identity import digest, statement
from runtime.settings import REPO_ROOT, Settings
from starters.run_views import DecisionRefused, InvalidInput
from starters.runbook_cards import runbook_request
from starters.runs import Runs
from tests.conftest_kube import eventually
from tests.helpers import TEST_SIGNER, handle_of, status
from workers.worker import running_worker
from workflows.catalogue import RUNBOOKS, steer_actions
from workflows.models import Decision, RunbookRequest, SteerAction
from workflows.worker_lost import WorkerLostRequest

POLICY = load_policy(REPO_ROOT / "deploy" / "access-policy.yaml")
REQUESTER = "alice"  # may start every runbook; every approval has someone else to decide it
FROM_THE_CALLER = {"requester", "dry_run", "authorization"}  # who and how, not parameters

NUMBERS: dict[str, object] = {
    "zero": 0,
    "negative": -1,
    "3e11": 3e11,
    "1e14": 1e14,
    "1e300": 1e300,
    "10**30": 10**30,
    "inf": math.inf,
    "-inf": -math.inf,
    "nan": math.nan,
    "text 1e999": "1e999",
    "text NaN": "NaN",
}
TEXTS: dict[str, object] = {
    "empty": "",
    "very long": "x" * 100_000,
    "quotes": "it's \"quoted\"; `rm -rf /` $(id) ' OR 1=1 --",
    "newlines": "line one\nline two\r\n",
    "unicode": "Ünïcødé ✓ 漢字 😀 \u202eevil",
    "control characters": "nul\x00bell\x07",
    "lone surrogate": "\ud800",
}
FLAGS: dict[str, object] = {
    "true": True,
    "text yes": "yes",
    "number 2": 2,
    "null": None,
    "list": [True],
}
LISTS: dict[str, object] = {
    "empty": [],
    "very long": ["TimeoutError"] * 10_000,
    **{f"item {label}": [value] for label, value in TEXTS.items()},
}


def kind_of(field: FieldInfo) -> type:
    """bool, int, float, str or list: what a field holds, under ``| None`` and ``Annotated``."""
    annotation: Any = field.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    kind = get_origin(annotation) or annotation
    assert kind in (bool, int, float, str, list), (
        f"no extreme values for {field}; add its kind here"
    )
    return kind  # type: ignore[no-any-return]


def extremes(field: FieldInfo) -> dict[str, object]:
    return {bool: FLAGS, int: NUMBERS, float: NUMBERS, str: TEXTS, list: LISTS}[kind_of(field)]


def baseline(model: type[RunbookRequest]) -> dict[str, Any]:
    """A valid start: every required parameter set to its documented example."""
    required = {n: f for n, f in model.model_fields.items() if f.is_required()}
    missing = [n for n, f in required.items() if n not in FROM_THE_CALLER and not f.examples]
    assert not missing, f"{model.__name__}: give {missing} an example"
    return {n: f.examples[0] for n, f in required.items() if f.examples}


def with_value(runbook: str, param: str, value: object) -> tuple[dict[str, Any], str]:
    """The parameters and reason of a start that differs from the baseline in one parameter."""
    params = baseline(RUNBOOKS[runbook].spec.request)
    if param == "reason":
        assert isinstance(value, str)
        return params, value
    return {**params, param: value}, "extreme values"


def accepted(runbook: str, param: str, value: object) -> bool:
    params, reason = with_value(runbook, param, value)
    try:
        RUNBOOKS[runbook].spec.request.model_validate(
            {**params, "requester": REQUESTER, "reason": reason}
        )
    except ValidationError:
        return False
    return True


def cases() -> Iterator[tuple[str, str, str, object]]:
    for runbook, workflow in RUNBOOKS.items():
        for param, field in workflow.spec.request.model_fields.items():
            if param not in FROM_THE_CALLER:
                for label, value in extremes(field).items():
                    yield runbook, param, label, value


REFUSED = [pytest.param(r, p, v, id=f"{r}-{p}-{lbl}") for r, p, lbl, v in cases()
           if not accepted(r, p, v)]  # fmt: skip
ACCEPTED: dict[str, list[tuple[str, object]]] = {}
for _runbook, _param, _label, _value in cases():
    if accepted(_runbook, _param, _value):
        ACCEPTED.setdefault(_runbook, []).append((_param, _value))


@pytest.fixture(scope="module")
def runs_without_worker(temporal: WorkflowEnvironment) -> Runs:
    """``Runs`` as the CLI and the API use it, on a task queue nobody polls: a refused start
    must never reach Temporal, and one that did would stay visible there."""
    return Runs(temporal.client, f"nobody-{uuid.uuid4().hex[:8]}", POLICY, TEST_SIGNER)


@pytest.mark.parametrize(("runbook", "param", "value"), REFUSED)
async def test_extreme_value_is_refused_before_start(
    runs_without_worker: Runs, runbook: str, param: str, value: object
) -> None:
    params, reason = with_value(runbook, param, value)
    with pytest.raises(InvalidInput) as refused:
        await runs_without_worker.start(runbook, params, requester=REQUESTER, reason=reason)

    message = refused.value.message
    assert re.search(rf"\b{param}(\.\d+)?: ", message), message  # a list names the item
    assert "\n" not in message and len(message) < 500, message


@pytest.mark.parametrize(
    ("param", "value", "bound"),
    [
        ("approval_timeout_seconds", 3e11, "less than or equal to 604800"),
        ("rollout_timeout_seconds", 1e14, "less than or equal to 86400"),
        ("rollout_timeout_seconds", math.inf, "a finite number"),
    ],
)
async def test_values_that_overflowed_workflow_code_are_refused_with_their_bound(
    runs_without_worker: Runs, param: str, value: float, bound: str
) -> None:
    with pytest.raises(InvalidInput, match=f"{param}: Input should be {bound}$"):
        await runs_without_worker.start(
            "shard-scaling", {"shards": 12, param: value}, requester=REQUESTER
        )


def test_every_runbook_and_parameter_is_tried() -> None:
    tried = {(r, p) for r, p, _, _ in cases()}
    for runbook, workflow in RUNBOOKS.items():
        params = set(workflow.spec.request.model_fields) - FROM_THE_CALLER
        assert params and {(runbook, p) for p in params} <= tried


async def drive_to_an_end(runs: Runs, client: Client, run_id: str) -> WorkflowExecutionStatus:
    """Reject whatever approval the run waits for (as an eligible person) until it closes; a
    release run's window (30 minutes by default) is aborted as its requester would."""
    handle = handle_of(client, run_id)

    async def closed() -> bool:
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            return True
        current = await status(handle)
        if SteerAction.ABORT in steer_actions(current.runbook) and not current.steered:
            with contextlib.suppress(DecisionRefused):  # still starting: the next poll aborts
                await runs.steer(run_id, REQUESTER, SteerAction.ABORT, "extreme values")
        for pending in current.pending_approvals:
            await runs.decide(
                run_id,
                Decision(approver=pending.members[0], step=pending.step, decision="reject"),
            )
        return False

    await eventually(closed, timeout=20, interval=0.05, message=f"{run_id} ending")
    closed_as = (await handle.describe()).status
    assert closed_as is not None
    return closed_as


@pytest.mark.parametrize("runbook", sorted(ACCEPTED))
async def test_accepted_extreme_values_end_cleanly(
    client: Client, astra_settings: Settings, runbook: str
) -> None:
    runs = Runs(client, astra_settings.task_queue, POLICY, TEST_SIGNER)
    with ThreadPoolExecutor(max_workers=4) as executor:
        async with running_worker(client, astra_settings, executor):
            for param, value in ACCEPTED[runbook]:
                params, reason = with_value(runbook, param, value)
                started = await runs.start(runbook, params, requester=REQUESTER, reason=reason)
                assert not started.existing, f"{started.run_id} was left open by another test"

                ended = await drive_to_an_end(runs, client, started.run_id)

                assert ended in (
                    WorkflowExecutionStatus.COMPLETED,
                    WorkflowExecutionStatus.FAILED,
                ), (param, value, ended)


@pytest.mark.parametrize("value", [1e14, None], ids=["1e14", "inf sent as null"])
async def test_a_history_whose_input_does_not_decode_fails_instead_of_looping(
    client: Client, worker: Worker, namespace: str, value: float | None
) -> None:
    # Started around Runs.start, as a run started before the bounds existed was.
    raw = {"requester": REQUESTER, "shards": 12, "namespace": namespace}
    handle = await client.start_workflow(
        "shard-scaling",
        {**raw, "rollout_timeout_seconds": value},
        id=f"shard-scaling/{namespace}",
        task_queue=worker.task_queue,
    )

    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), timeout=15)

    assert "rollout_timeout_seconds" in str(failure.value.cause)
    assert (await handle.describe()).status == WorkflowExecutionStatus.FAILED


def test_a_run_started_with_a_since_retired_parameter_still_decodes_under_its_signature() -> None:
    """``poll_seconds`` left the task-health runbooks' inputs: runs started before still carry
    it, signed. Their history must decode, and the start's signature still cover the request."""
    today = WorkerLostRequest(requester=REQUESTER, worker_id="astra-worker-7")
    signed_then = json.dumps(
        {**today.model_dump(mode="json", exclude={"authorization"}), "poll_seconds": 0.2},
        sort_keys=True,
        separators=(",", ":"),
    )
    said = statement("start", REQUESTER, "worker-lost/astra-worker-7", signed_then)
    stored = {
        **json.loads(signed_then),
        "authorization": TEST_SIGNER.sign(said).model_dump(mode="json"),
    }

    decoded = WorkerLostRequest.model_validate_json(json.dumps(stored))

    assert "poll_seconds" not in decoded.model_dump()
    assert decoded.signed_payload() == signed_then
    assert decoded.authorization is not None
    assert decoded.authorization.statement.digest == digest(decoded.signed_payload())


def test_a_new_start_naming_a_retired_parameter_is_refused() -> None:
    spec = RUNBOOKS["worker-lost"].spec
    with pytest.raises(InvalidInput, match="poll_seconds: no longer a parameter of worker-lost"):
        runbook_request(
            spec, POLICY.runbook("worker-lost"), {"worker_id": "w-1", "poll_seconds": 1},
            requester=REQUESTER,
        )  # fmt: skip
