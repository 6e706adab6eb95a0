"""How long an activity may take, and how soon Temporal notices that its worker died.

Temporal learns that a worker died only from a timeout: the start-to-close timeout of an activity
that sends no heartbeat, or the heartbeat timeout of one that does. Until then the run waits,
whatever new worker polls. So every activity call fits its timeouts to its work:

- a short call (a few requests that answer in milliseconds: read a ConfigMap, patch a
  Deployment, insert a row) gets ``DEFAULT_TIMEOUT`` to start and finish;
- a long one (waiting for a rollout or a failover, a rewind, batches of requeues) gets a
  start-to-close timeout that bounds its work, and heartbeats (``activities/heartbeats.py``)
  with ``HEARTBEAT_TIMEOUT``.

Either way a run whose worker dies resumes within about 15 s of a new worker polling (``bench/
recovery.py`` measures it). The step runner (``workflows/steps.py``) applies these to every step;
the approval gate, the kill switch, the incident and the scan use them for their own calls.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy

DEFAULT_TIMEOUT = timedelta(seconds=10)
"""A short call's start-to-close timeout: far above what it takes, short enough that a worker
that died inside it costs a run seconds. Clients these calls use answer or give up sooner."""
REMOTE_CALL_TIMEOUT = timedelta(seconds=30)
"""A call to a service beyond Kubernetes and Astra's stores (chat, Prometheus) whose client waits
up to 10 s for an answer: long enough that the client's own error, which says what failed, comes
first; such a call heartbeats, as a long one does."""
HEARTBEAT_TIMEOUT = timedelta(seconds=5)
"""A long call's heartbeat timeout. Its activity heartbeats every second
(``activities.heartbeats.HEARTBEAT_SECONDS``); the worker sends at most one heartbeat per
``HEARTBEAT_THROTTLE``, so a live worker is never taken for a dead one."""
HEARTBEAT_THROTTLE = timedelta(seconds=2)
"""The most a worker waits between sending an activity's heartbeats (the SDK's
``max_heartbeat_throttle_interval``; it would otherwise wait 80 % of ``HEARTBEAT_TIMEOUT``,
which leaves a loaded worker one second to spare)."""
STICKY_QUEUE_TIMEOUT = timedelta(seconds=3)
"""How long a run's next workflow task waits for the worker that ran its last one before any
worker may take it (the SDK's ``sticky_queue_schedule_to_start_timeout``, 10 s by default). A
worker that died still holds its runs this long: when a step resumed on another worker
completes within seconds of the death (a heartbeat timeout, a decision), the run waits for it.
Any worker can take the task after it, at the cost of replaying the run's history."""
DEFAULT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
)


def heartbeat_timeout(start_to_close: timedelta) -> timedelta | None:
    """The heartbeat timeout of a call given ``start_to_close``: a call allowed longer than a
    short one is a long one, which heartbeats."""
    return HEARTBEAT_TIMEOUT if start_to_close > DEFAULT_TIMEOUT else None
