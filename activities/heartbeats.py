"""How a long activity tells Temporal its worker is alive, and hands its work back when the worker
stops.

A call allowed longer than a short one gets a heartbeat timeout of a few seconds
(``workflows/timeouts.py``): a worker that dies inside it is noticed that soon, and the activity
runs again on another worker. So such an activity heartbeats every ``HEARTBEAT_SECONDS``: from
its own loop where it has one (:func:`beat`), or beside a call that cannot report progress
(:func:`heartbeating` in an async activity, :func:`heartbeating_sync` in one that runs on the
worker's threads). The worker throttles what it sends, so beating often costs nothing.

A worker told to stop (SIGTERM) stops polling and lets its running activities finish within its
grace period. A loop that only waits (for a rollout, a failover) or works in batches need not
hold the worker that long: at its next :func:`beat` it hands the work back, a retryable failure,
and another worker takes it up at once from what it reads of the world, since every activity is
idempotent.

Outside an activity (a test or a script calling the method directly) they do nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import AsyncIterator, Iterator

from temporalio import activity
from temporalio.exceptions import ApplicationError

HEARTBEAT_SECONDS = 1.0
HANDED_BACK = "HandedBack"
"""The failure type of an activity its stopping worker handed back to the others."""


def beat(progress: str) -> None:
    """Heartbeat with ``progress`` (the UI shows the last one); if this worker is stopping,
    hand the activity back instead of holding the worker's shutdown."""
    if not activity.in_activity():
        return
    activity.heartbeat(progress)
    if activity.is_worker_shutdown():
        raise ApplicationError(
            f"handed back at '{progress}': this worker is shutting down, and another worker "
            "continues the step from where the world stands",
            type=HANDED_BACK,
        )


@contextlib.asynccontextmanager
async def heartbeating(what: str) -> AsyncIterator[None]:
    """Heartbeat every ``HEARTBEAT_SECONDS`` while the block runs: for an async activity's call
    that cannot report progress (a promotion, a rewind, a slow server's answer), so that the
    heartbeat timeout tells a dead worker from a busy one. The block is not handed back on
    shutdown: stopping it halfway would leave its work half done."""

    async def pulse() -> None:
        while True:
            activity.heartbeat(what)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    if not activity.in_activity():
        yield
        return
    task = asyncio.create_task(pulse())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def heartbeating_sync(what: str) -> Iterator[None]:
    """:func:`heartbeating` for an activity on the worker's threads (a TLS handshake, a Vault
    call): a thread of its own heartbeats in the activity's context until the block ends."""
    if not activity.in_activity():
        yield
        return
    context = contextvars.copy_context()
    done = threading.Event()

    def pulse() -> None:
        while True:
            context.run(activity.heartbeat, what)
            if done.wait(HEARTBEAT_SECONDS):
                return

    thread = threading.Thread(target=pulse, name=f"heartbeat: {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
