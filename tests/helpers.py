"""Small things the workflow, CLI and API tests share: reading the sandbox, waiting for a step."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from pydantic import SecretStr
from temporalio.client import Client, WorkflowHandle

from activities.kube_annotations import CONFIG_HASH, config_hash
from runtime.identity import Signed, load_signer, new_signing_key_line, statement
from runtime.settings import ENV_PREFIX, Settings
from tests.conftest_kube import KubeSandbox, eventually
from workflows.models import Decision, RunbookRequest, RunbookResult, RunStatus, StepState
from workflows.runbook import Runbook

# The API's signing key for this test session: the `settings` fixture trusts its public half, and
# tests that start or decide without the API sign as the API would.
TEST_SIGNING_KEY = new_signing_key_line("test-api")
TEST_SIGNER = load_signer(TEST_SIGNING_KEY)


R = TypeVar("R", bound=RunbookRequest)


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as the ASTRA_OPS_* environment a deployed process reads them from."""
    env = {}
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = str(value).lower()
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    return env


def signed_start(request: R, workflow_id: str) -> R:
    """The request as the API would send it: with its signed start statement."""
    return request.signed_by(TEST_SIGNER, workflow_id)


async def signed_decision(handle: WorkflowHandle[Any, Any], decision: Decision) -> Decision:
    """The decision as the API would send it: step explicit, signed for this very run."""
    run_id = (await handle.describe()).run_id
    said = statement(
        "decision",
        decision.approver,
        handle.id,
        decision.comment,
        run_id=run_id,
        step=decision.step,
        decision=decision.decision,
    )
    signed: Signed = TEST_SIGNER.sign(said)
    return decision.model_copy(update={"authorization": signed})


def shard_count(kube: KubeSandbox, namespace: str) -> str:
    config = kube.cluster.get("configmaps", namespace, "astra-config")
    assert config is not None
    return str(config["data"]["TASK_SHARD_COUNT"])


def pod_hashes(kube: KubeSandbox, namespace: str, app: str) -> set[str | None]:
    """The config fingerprint each pod of a Deployment was started with."""
    return {
        (p["metadata"].get("annotations") or {}).get(CONFIG_HASH)
        for p in kube.cluster.pods(namespace, {"app": app})
    }


def current_config_hash(kube: KubeSandbox, namespace: str) -> str:
    config = kube.cluster.get("configmaps", namespace, "astra-config")
    assert config is not None
    return config_hash(config["data"])


def generation(kube: KubeSandbox, namespace: str, name: str) -> int:
    deployment = kube.cluster.get("deployments", namespace, name)
    assert deployment is not None
    return int(deployment["metadata"]["generation"])


async def status(handle: WorkflowHandle[Any, Any]) -> RunStatus:
    current: RunStatus = await handle.query("status", result_type=RunStatus)
    return current


async def wait_for_step(
    handle: WorkflowHandle[Any, Any], step: str, state: StepState, within: float = 15
) -> None:
    async def reached() -> bool:
        steps = {s.name: s.state for s in (await status(handle)).steps}
        return steps.get(step) == state

    await eventually(reached, timeout=within, interval=0.05, message=f"step '{step}' {state}")


async def awaiting_approval(handle: WorkflowHandle[Any, Any], step: str) -> None:
    await wait_for_step(handle, step, StepState.AWAITING_APPROVAL)


def handle_of(client: Client, run_id: str) -> WorkflowHandle[Any, RunbookResult]:
    return client.get_workflow_handle(run_id, result_type=RunbookResult)


async def start(
    client: Client, runbook: type[Runbook], request: RunbookRequest, task_queue: str
) -> WorkflowHandle[Any, RunbookResult]:
    """Start a run under a fresh id (the subject alone repeats across tests), signed as the API
    would sign it."""
    workflow_id = f"{runbook.spec.workflow_id(request)}/{uuid.uuid4().hex[:8]}"
    return await client.start_workflow(
        runbook.spec.name,
        signed_start(request, workflow_id),
        id=workflow_id,
        task_queue=task_queue,
        result_type=RunbookResult,
    )


async def decide(
    handle: WorkflowHandle[Any, RunbookResult],
    step: str,
    approver: str,
    verdict: str = "approve",
    within: float = 20,
) -> None:
    """Wait up to ``within`` seconds for ``step`` to await approval, then decide it as
    ``approver`` through the update."""

    async def pending() -> bool:
        return any(p.step == step for p in (await status(handle)).pending_approvals)

    await eventually(pending, timeout=within, interval=0.05, message=f"approval of '{step}'")
    decision = Decision(approver=approver, step=step, decision=verdict)
    await handle.execute_update("decide", await signed_decision(handle, decision), result_type=str)
