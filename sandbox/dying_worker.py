"""The production worker with one fault, for bench/recovery.py, bench/proof.py and
tests/test_kill_anywhere.py: it SIGKILLs its own process inside one activity of one run, as a
node that dies or an OOM kill would end it.

``ASTRA_BENCH_KILL_AT`` names the run's workflow id (``*``: whichever run takes the activity,
for a task queue with one run), the activity's id in that run (ids follow the order a run
schedules its activities, local ones included, so a run of the same shape gives the same step
the same id; ``#n``: the n-th activity this worker starts for the run) and how many seconds into
the activity's first attempt to die. If the activity returns (or fails) before then, the process
dies right after, before the worker reports the result: the activity's effect happened, and
Temporal does not know. Without the variable it is a plain worker, the one that takes over.

The fault sits in an activity interceptor that joins the worker's own
(``workers.worker.running_worker``): nothing in production code knows of it.

    ASTRA_OPS_...=... python -m sandbox.dying_worker
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from temporalio import activity
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from runtime.client import connect
from runtime.settings import load_settings
from workers.worker import running_worker

KILL_AT = "ASTRA_BENCH_KILL_AT"
POLLING = "worker polling since"
"""The line (with the epoch time) the bench reads to learn when this worker began to poll."""
DYING = "SIGKILL:"
"""The line the worker writes just before it kills itself, saying where."""
ANY_RUN = "*"

log = logging.getLogger("dying_worker")


@dataclass(frozen=True)
class Trap:
    workflow_id: str
    activity_id: str
    delay: float

    def encode(self) -> str:
        return f"{self.workflow_id} {self.activity_id} {self.delay:.6f}"

    @classmethod
    def parse(cls, text: str) -> Trap:
        workflow_id, activity_id, delay = text.split()
        return cls(workflow_id, activity_id, float(delay))


def die(where: str) -> None:
    log.warning("%s %s", DYING, where)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillInActivity(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, trapped: Trapped) -> None:
        super().__init__(next)
        self.trapped = trapped

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        if not self.trapped.is_the_one(info):
            return await self.next.execute_activity(input)
        # A timer thread: it fires whether the activity runs on this event loop or on a thread
        # of the executor, and whatever either is doing.
        delay = self.trapped.trap.delay
        where = f"{info.activity_type} {delay:.3f} s into its first attempt"
        timer = threading.Timer(delay, die, [where])
        timer.start()
        try:
            return await self.next.execute_activity(input)
        finally:
            timer.cancel()
            die(f"{info.activity_type} ended, before its result was reported")


class Trapped(Interceptor):
    """The worker's trap, and how many activities (first attempts, local ones aside) of the
    trapped run it has started: the interceptor above is made afresh for each activity."""

    def __init__(self, trap: Trap) -> None:
        self.trap = trap
        self.started = 0

    def is_the_one(self, info: activity.Info) -> bool:
        if info.is_local or info.attempt != 1:
            return False
        if self.trap.workflow_id not in (ANY_RUN, info.workflow_id):
            return False
        self.started += 1
        if self.trap.activity_id.startswith("#"):
            return self.started == int(self.trap.activity_id[1:])
        return info.activity_id == self.trap.activity_id

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return KillInActivity(next, self)


async def main() -> None:
    settings = load_settings()
    trap = Trap.parse(os.environ[KILL_AT]) if os.environ.get(KILL_AT) else None
    client = await connect(settings)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    traps = [Trapped(trap)] if trap is not None else []
    with ThreadPoolExecutor(max_workers=16) as executor:
        async with running_worker(client, settings, executor, interceptors=traps):
            log.info("%s %.3f", POLLING, time.time())
            await stop.wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(created).3f %(name)s %(message)s")
    asyncio.run(main())
