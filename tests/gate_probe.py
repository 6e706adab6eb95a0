"""A one-step runbook that exercises the approval gate with any rule the test writes into the
access policy, on a worker that trusts names (dev mode) or only the test's signing key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from temporalio import workflow

from workflows.models import Outcome, RunbookRequest, RunbookResult
from workflows.runbook import Runbook, RunbookSpec

with workflow.unsafe.imports_passed_through():
    import yaml
    from temporalio.client import Client
    from temporalio.worker import Worker

    from activities.access import AccessActivities, Trust
    from activities.communication import CommunicationActivities
    from activities.notify import NotifyActivities
    from runtime.access import ApprovalPolicy
    from runtime.settings import REPO_ROOT, Settings
    from workers.worker import workflow_options

STEP = "approve change"


class GateProbeRequest(RunbookRequest):
    subject: str


SPEC = RunbookSpec(
    name="gate-probe",
    title="Gate probe",
    trigger="tests",
    rotation="kernel-sre",
    severity="SEV3",
    request=GateProbeRequest,
    subject=lambda req: req.subject,
    steps=lambda req: [STEP, "change"],
)


@workflow.defn(name=SPEC.name)
class GateProbe(Runbook):
    spec = SPEC

    @workflow.run
    async def run(self, req: GateProbeRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._body(req))

    async def _body(self, req: GateProbeRequest) -> RunbookResult:
        await self.steps.approval(STEP)
        return self.steps.finish(Outcome.DONE, "approved")


def write_policy(path: Path, rule: ApprovalPolicy) -> None:
    """The example policy, plus the probe runbook whose one approval follows ``rule``."""
    policy = yaml.safe_load((REPO_ROOT / "deploy" / "access-policy.yaml").read_text())
    policy["runbooks"]["gate-probe"] = {
        "start": ["anyone"],
        "cancel": ["kernel-sre"],
        "approvals": {STEP: rule.model_dump()},
    }
    path.write_text(yaml.safe_dump(policy))


@asynccontextmanager
async def probe_worker(
    client: Client, settings: Settings, task_queue: str, trust: Trust, policy: Path
) -> AsyncIterator[Worker]:
    notify = NotifyActivities(policy, CommunicationActivities.from_settings(settings))
    access = AccessActivities(policy, trust, client, notify, settings.state_dsn)
    options = workflow_options()  # the probe's workflow, run as the worker runs runbooks
    options["workflows"] = [GateProbe]
    with ThreadPoolExecutor(max_workers=4) as executor:
        async with Worker(
            client,
            task_queue=task_queue,
            activities=[access.admit, access.request_approval, access.freeze_state],
            activity_executor=executor,
            **options,
        ) as worker:
            yield worker
