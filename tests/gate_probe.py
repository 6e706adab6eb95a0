"""A one-step runbook that exercises the approval gate with any policy the test chooses."""

from __future__ import annotations

from temporalio import workflow

from workflows.models import ApprovalPolicy, Outcome, RunbookRequest, RunbookResult
from workflows.runbook import Runbook, RunbookSpec


class GateProbeRequest(RunbookRequest):
    subject: str
    policy: ApprovalPolicy


SPEC = RunbookSpec(
    name="gate-probe",
    title="Gate probe",
    trigger="tests",
    rotation="kernel-sre",
    severity="SEV3",
    steps=("approve change", "change"),
    request=GateProbeRequest,
    subject=lambda req: req.subject,
)


@workflow.defn(name="gate-probe")
class GateProbe(Runbook):
    spec = SPEC

    @workflow.run
    async def run(self, req: GateProbeRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._body(req))

    async def _body(self, req: GateProbeRequest) -> RunbookResult:
        await self.steps.approval("approve change", req.policy)
        return self.steps.finish(Outcome.DONE, "approved")
