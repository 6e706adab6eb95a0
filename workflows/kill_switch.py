"""The kill switch: while it is on, no mutating step starts in any run.

It is a workflow that exists only while the platform is frozen (``kill-switch/astra-ops``): its
history says who froze, why, and who lifted it; "is it running" is the frozen state that starts
and new runs read. It tells every open run to hold, and later to resume, by signal; it tells them
twice, a moment apart, so a run that started while the first round went out still hears it (and
a frozen run re-reads the switch on its own every half minute).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

from workflows.approval import operator_refusal
from workflows.models import FreezeNotice
from workflows.timeouts import DEFAULT_RETRY, DEFAULT_TIMEOUT, heartbeat_timeout

with workflow.unsafe.imports_passed_through():
    from activities.access import (
        AccessActivities,
        FreezeBroadcast,
        Operators,
    )

SECOND_ROUND = timedelta(seconds=2)
BROADCAST_TIMEOUT = timedelta(minutes=2)


@workflow.defn(name="kill-switch")
class KillSwitch:
    def __init__(self) -> None:
        self.notice: FreezeNotice | None = None
        self.lifted: FreezeNotice | None = None
        self.operators: Operators | None = None

    @workflow.run
    async def run(self, notice: FreezeNotice) -> str:
        self.operators = await workflow.execute_activity_method(
            AccessActivities.operators,
            start_to_close_timeout=DEFAULT_TIMEOUT,
            retry_policy=DEFAULT_RETRY,
            summary="check the access policy",
        )
        why = self._refusal("freeze", notice, run_id="")
        if why is not None:
            return f"freeze refused: {why}"
        self.notice = notice.model_copy(update={"switch_run": workflow.info().run_id})
        await self._tell("freeze", self.notice)
        await workflow.wait_condition(lambda: self.lifted is not None)
        assert self.lifted is not None
        await self._tell("unfreeze", self.lifted)
        return (
            f"frozen by {notice.actor} ({notice.reason}); lifted by {self.lifted.actor} "
            f"({self.lifted.reason})"
        )

    def _refusal(self, act: str, notice: FreezeNotice, run_id: str) -> str | None:
        assert self.operators is not None
        return operator_refusal(notice, self.operators.members, self.operators.trust, act, run_id)

    async def _tell(self, signal: str, notice: FreezeNotice) -> None:
        """Tell every open run, then again a moment later for runs that started meanwhile.

        A freeze's second round is dropped when an unfreeze arrives first: that goes out at once.
        """
        await self._broadcast(signal, notice, 1)
        if signal == "freeze":
            if await self._lifted_within(SECOND_ROUND):
                return
        else:
            await workflow.sleep(SECOND_ROUND)
        await self._broadcast(signal, notice, 2)

    async def _broadcast(self, signal: str, notice: FreezeNotice, round_: int) -> None:
        await workflow.execute_activity_method(
            AccessActivities.broadcast_freeze,
            FreezeBroadcast(signal=signal, notice=notice),
            start_to_close_timeout=BROADCAST_TIMEOUT,
            heartbeat_timeout=heartbeat_timeout(BROADCAST_TIMEOUT),
            retry_policy=DEFAULT_RETRY,
            summary=f"tell every open run to {signal} (round {round_})",
        )

    async def _lifted_within(self, window: timedelta) -> bool:
        try:
            await workflow.wait_condition(lambda: self.lifted is not None, timeout=window)
        except TimeoutError:
            return False
        return True

    @workflow.update
    def unfreeze(self, notice: FreezeNotice) -> str:
        self.lifted = notice.model_copy(update={"switch_run": workflow.info().run_id})
        return f"unfrozen by {notice.actor}"

    @unfreeze.validator
    def _validate_unfreeze(self, notice: FreezeNotice) -> None:
        if self.notice is None:
            raise ValueError("the switch is still turning on; try again in a moment")
        if self.lifted is not None:
            raise ValueError("already unfrozen")
        why = self._refusal("unfreeze", notice, run_id=workflow.info().run_id)
        if why is not None:
            raise ValueError(why)

    @workflow.query
    def state(self) -> FreezeNotice | None:
        return self.notice if self.lifted is None else None
