"""The incident: one alert group (or one person's report), from detection to the last action item.

Seed: Detect -> Triage -> Contain -> Remediate -> Postmortem -> Remediation Review. The workflow
keeps the incident's state and timeline; people act through one update per action (validated by
``workflows.incident_rules`` before anything enters history), Alertmanager through the ``alerts``
signal, and everyone reads the ``state`` query.

Why it is shaped this way:

- Every deadline (the next escalation page, the next commander request, a sustained SEV1, an
  item's reminder) is an absolute time in the state, and one loop waits for the earliest with a
  durable timer. A worker restart replays to the same wait; a continue-as-new carries the
  deadlines, so nothing is paged twice or forgotten.
- Messages go through an outbox: an action decides what to say and returns at once; each message
  is delivered in the background with a long retry, under an event key numbered from the
  incident's history. A receiver that is down delays a message, never an action; one that gives
  up or rejects it shows on the timeline.
- Runbooks run as child workflows, so Temporal records that this incident started them: the
  runbook's admission trusts that record (a client cannot forge it) instead of a signature, and
  its approvals apply as always.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Coroutine
from datetime import datetime, timedelta
from typing import Any, Literal

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    WorkflowAlreadyStartedError,
    is_cancelled_exception,
)

from runtime import search_attributes as sa
from workflows.approval import proven
from workflows.incident_messages import chat, page, status_page
from workflows.incident_models import (
    ALERTS_SIGNAL,
    INCIDENT_WORKFLOW,
    MAX_ALERTS,
    MAX_TIMELINE,
    STATE_QUERY,
    ActionItem,
    ActionKind,
    Alert,
    AlertNotification,
    IncidentAction,
    IncidentCarry,
    IncidentOpen,
    IncidentState,
    LinkedRun,
    Outgoing,
    PageRecord,
    Severity,
    Stage,
    TimelineEntry,
)
from workflows.incident_rules import (
    MAX_RUN_IDS,
    MAX_RUNBOOKS,
    MOVES,
    RESOLVED,
    SECURITY_TAGS,
    needs_commander,
    refusal,
)
from workflows.models import RunbookResult, StepState
from workflows.steps import ADMIT_TIMEOUT, failure_message
from workflows.timeouts import DEFAULT_RETRY, DEFAULT_TIMEOUT, heartbeat_timeout

with workflow.unsafe.imports_passed_through():
    from activities.communication import (
        ChatMessage,
        CommunicationActivities,
        DeliveryOutcome,
        DeliveryResult,
        PageEvent,
        StatusPageUpdate,
    )
    from activities.incident import (
        IncidentActivities,
        IncidentAdmission,
        IncidentAdmissionRequest,
        PostmortemRequest,
        RunbookPlan,
        RunbookPlanRequest,
    )

SYSTEM = "astra-ops"
"""The actor of what the incident does on its own (escalation, stage moves, drafts)."""
IN_ORDER = "deliveries-in-order-per-receiver"
"""A patch: each receiver gets the incident's messages one at a time, in the order they were
written, so a status page never ends on an older status than the incident's (a late
"investigating" after "identified") and a pager never hears "resolve" before "trigger". Runs
begun before it delivered them side by side, and replay so."""
QUIET_REPEATS = "alert-repeats-leave-the-loop-asleep"
"""A patch: a notification that changes no alert's status (Alertmanager repeats a group every
``repeat_interval``, and retries) leaves the lifecycle loop waiting, so its workflow task carries
no command; before, each one cancelled the loop's timer and started it again, two events and a
timer on the server per repeat. Runs begun before it woke on every one, and replay so."""
DELIVERY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
    maximum_attempts=0,
)
DELIVERY_GIVE_UP = timedelta(days=1)
"""A message not delivered within a day is reported failed on the timeline."""
DELIVERY_ATTEMPT = timedelta(seconds=30)
"""One delivery: a request whose client waits up to 10 s, and its bookkeeping; it heartbeats."""
EARLY_ALERTS = 100
"""Notifications kept while the incident is still opening (it cannot check them yet)."""
MAX_CONSIDERED = 1_000


def _duration(seconds: float) -> str:
    if seconds >= 3_600:
        return f"{seconds / 3_600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _alert_name(alert: Alert) -> str:
    return alert.labels.get("alertname", alert.fingerprint)


@workflow.defn(name=INCIDENT_WORKFLOW)
class Incident:
    @workflow.init
    def __init__(self, opened: IncidentOpen) -> None:
        info = workflow.info()
        # A continued run carries the incident; a start that claims to is ignored.
        carried = opened.carried if info.continued_run_id is not None else None
        self.opened = opened
        self.fresh = carried is None
        self.carry = carried or IncidentCarry(
            state=IncidentState(
                incident_id=info.workflow_id,
                title=opened.title,
                severity=opened.severity,
                stage=Stage.DETECT,
                components=list(opened.components),
                rotation="",
                opened_by=opened.opened_by,
                opened_at=workflow.now(),
                user_visible=opened.user_visible,
                tags=list(opened.tags),
            )
        )
        self.carry.run_ids = [*self.carry.run_ids, info.run_id][-MAX_RUN_IDS:]
        self.admission: IncidentAdmission | None = None
        self._wake = False
        self._early: list[AlertNotification] = []
        self._sending: set[str] = set()
        self._planning = False
        self._children: set[str] = set()
        self._writing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._shown: dict[str, str] = {}

    @property
    def state(self) -> IncidentState:
        return self.carry.state

    # -- opening ----------------------------------------------------------------------------

    @workflow.run
    async def run(self, opened: IncidentOpen) -> IncidentState:
        alerts = opened.notification
        labels = {**alerts.alerts[0].labels, **alerts.common_labels} if alerts else {}
        self.admission = await workflow.execute_local_activity_method(
            IncidentActivities.admit_incident,
            IncidentAdmissionRequest(
                components=self.state.components,
                rotation_label=labels.get("rotation"),
                rotation=self.state.rotation or None,
            ),
            start_to_close_timeout=ADMIT_TIMEOUT,
            retry_policy=DEFAULT_RETRY,
            summary="check the access policy",
        )
        if self.fresh:
            why = self._open_refusal(opened, self.admission)
            if why is not None:
                workflow.set_current_details(f"**incident refused**: {why}")
                raise ApplicationError(
                    f"incident refused: {why}", type="IncidentRefused", non_retryable=True
                )
            self._open(opened, self.admission)
        for notification in self._early:
            self.alerts(notification)
        self._early.clear()
        self._show()
        await self._lifecycle()
        return self.state

    def _open_refusal(self, opened: IncidentOpen, admission: IncidentAdmission) -> str | None:
        why = proven(
            opened.authorization,
            admission.trust,
            act="incident.open",
            actor=opened.opened_by,
            payload=opened.signed_payload(),
            run_id="",
            at=workflow.info().workflow_start_time,
        )
        if why is not None:
            return why
        if opened.opened_by != admission.alert_sender and opened.opened_by not in (
            admission.openers
        ):
            return (
                f"{opened.opened_by} may not open incidents; the access policy lets "
                f"{', '.join(admission.openers) or 'nobody'} (incidents.open)"
            )
        return None

    def _open(self, opened: IncidentOpen, admission: IncidentAdmission) -> None:
        state = self.state
        state.rotation = admission.rotation
        self._timeline(
            "opened",
            f"{state.severity.value} ({state.severity.meaning}) opened: {state.title}"
            + (f" — {opened.reason}" if opened.reason else "")
            + f"; rotation {admission.rotation_title}",
            opened.opened_by,
        )
        if opened.notification is not None:
            self._merge(opened.notification)
        self._say(
            "opened",
            "the opening message",
            f"opened by {opened.opened_by} ({state.severity.meaning}); rotation "
            f"{admission.rotation_title}. `astra-ops incident show {state.incident_id}`",
        )
        self._tell_public("opened")
        if state.severity == Severity.SEV1:
            self._sev1_began()
        if needs_commander(state):
            self.carry.next_commander_request_at = workflow.now()
        tagged = sorted(SECURITY_TAGS & set(state.tags))
        if tagged:
            self._tell_stakeholders(
                "security",
                "security",
                admission.security,
                f"the incident is tagged {', '.join(tagged)}",
            )
        self._page_next()

    # -- the loop ---------------------------------------------------------------------------

    async def _lifecycle(self) -> None:
        """Until closed: start what is due, then wait for a change or the next deadline."""
        while True:
            self._wake = False
            self._fire_due()
            self._dispatch()
            self._close_review_if_done()
            if self.state.stage == Stage.CLOSED and not self.carry.outbox:
                return
            if self._should_continue() and self._quiet():
                workflow.continue_as_new(
                    self.opened.model_copy(
                        update={"carried": self.carry, "notification": None, "authorization": None}
                    )
                )
            if self._wake:
                continue
            deadline = self._next_deadline()
            timeout = None if deadline is None else deadline - workflow.now()
            if timeout is not None and timeout <= timedelta(0):
                continue
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self._wake, timeout=timeout, timeout_summary="next incident deadline"
                )

    def _deadlines(self) -> list[datetime]:
        carry, state = self.carry, self.state
        assert self.admission is not None
        found = []
        if carry.next_page_at is not None:
            found.append(carry.next_page_at)
        if needs_commander(state) and carry.next_commander_request_at is not None:
            found.append(carry.next_commander_request_at)
        sustained = self._sev1_due()
        if sustained is not None:
            found.append(sustained)
        before = timedelta(seconds=self.admission.item_reminder_seconds)
        for item in state.items:
            if item.state != "open":
                continue
            if f"{item.id}:reminder" not in carry.item_notices:
                found.append(item.due - before)
            elif f"{item.id}:overdue" not in carry.item_notices:
                found.append(item.due)
        return found

    def _next_deadline(self) -> datetime | None:
        deadlines = self._deadlines()
        return min(deadlines) if deadlines else None

    def _fire_due(self) -> None:
        carry, state, now = self.carry, self.state, workflow.now()
        assert self.admission is not None
        if carry.next_page_at is not None and now >= carry.next_page_at:
            self._page_next()
        if (
            needs_commander(state)
            and carry.next_commander_request_at is not None
            and now >= carry.next_commander_request_at
        ):
            self._ask_for_commander()
        due = self._sev1_due()
        if due is not None and now >= due:
            self._tell_product_owner()
        before = timedelta(seconds=self.admission.item_reminder_seconds)
        for item in state.items:
            if item.state == "open":
                if now >= item.due - before:
                    self._item_notice(item, "reminder")
                if now >= item.due:
                    self._item_notice(item, "overdue")

    def _dispatch(self) -> None:
        """Start, in the background, what waits: messages, the alerts' runbooks, the draft."""
        in_order = workflow.patched(IN_ORDER)
        busy = {o.channel for o in self.carry.outbox if self._key(o) in self._sending}
        for outgoing in self.carry.outbox:
            key = self._key(outgoing)
            if key in self._sending or (in_order and outgoing.channel in busy):
                continue
            busy.add(outgoing.channel)
            self._sending.add(key)
            self._spawn(self._deliver(key, outgoing))
        if self.carry.runbook_queue and not self._planning:
            self._planning = True
            self._spawn(self._runbooks_for_alerts())
        if self.state.stage == Stage.POSTMORTEM and not self._writing:
            self._writing = True
            self._spawn(self._write_postmortem())

    @staticmethod
    def _key(outgoing: Outgoing) -> str:
        return f"{outgoing.channel}/{outgoing.event_key}"

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _should_continue(self) -> bool:
        assert self.admission is not None
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self.admission.continue_as_new_after_events
        )

    def _quiet(self) -> bool:
        """Nothing in flight that a new run could not pick up: no update handler, runbook or
        draft (messages are carried in the outbox and sent again, which the ledger allows)."""
        return (
            workflow.all_handlers_finished()
            and not self._planning
            and not self._children
            and not self._writing
        )

    def _changed(self) -> None:
        self._wake = True
        self._show()

    # -- escalation ---------------------------------------------------------------------------

    def _page_next(self) -> None:
        """Page the next level of the rotation's escalation; time the one after it."""
        carry, admission = self.carry, self.admission
        assert admission is not None
        carry.next_page_at = None
        level = len(carry.pages)
        if self.state.acknowledged_by is not None or level >= len(admission.escalation):
            return
        target, person = admission.escalation[level].target, admission.escalation[level].person
        carry.pages.append(PageRecord(target=target, person=person, at=workflow.now()))
        timeout = admission.ack_timeout_seconds
        self._timeline(
            "page",
            f"paged {person} ({target} of {admission.rotation})"
            + (f": not acknowledged within {_duration(timeout)}" if level else ""),
            SYSTEM,
        )
        self._send(page(self.state, f"page:{target}", "trigger", target, person))
        if level + 1 < len(admission.escalation):
            carry.next_page_at = workflow.now() + timedelta(seconds=timeout)
        self._changed()

    def _close_pages(self, how: Literal["acknowledge", "resolve"]) -> None:
        """Acknowledge or resolve every page still open at the pager (once each)."""
        for record in self.carry.pages:
            if record.closed in (how, "resolve"):
                continue
            record.closed = how
            key = f"{how}:{record.target}"
            self._send(page(self.state, key, how, record.target, record.person))

    def _ask_for_commander(self) -> None:
        carry, admission = self.carry, self.admission
        assert admission is not None
        carry.commander_requests += 1
        n = carry.commander_requests
        self._timeline(
            "commander_request",
            f"asked {admission.rotation} for an incident commander (request {n})",
            SYSTEM,
        )
        self._say(
            f"commander-request:{n}",
            f"commander request {n}",
            f"{self.state.severity.value} needs an incident commander ({admission.rotation}, "
            f"request {n}): `astra-ops incident command {self.state.incident_id}` to take it",
        )
        carry.next_commander_request_at = workflow.now() + timedelta(
            seconds=admission.commander_request_interval_seconds
        )

    def _sev1_began(self) -> None:
        self.carry.sev1_since = workflow.now()
        self.carry.sev1_periods += 1

    def _sev1_due(self) -> datetime | None:
        carry, admission = self.carry, self.admission
        assert admission is not None
        if (
            carry.sev1_since is None
            or self.state.severity != Severity.SEV1
            or self.state.stage in RESOLVED
            or carry.product_owner_told >= carry.sev1_periods
        ):
            return None
        return carry.sev1_since + timedelta(seconds=admission.sustained_sev1_seconds)

    def _tell_product_owner(self) -> None:
        assert self.admission is not None
        self.carry.product_owner_told = self.carry.sev1_periods
        owner = self.admission.product_owner
        self._tell_stakeholders(
            f"product-owner:{self.carry.sev1_periods}",
            "product owner",
            [owner] if owner else [],
            f"SEV1 for more than {_duration(self.admission.sustained_sev1_seconds)} "
            "(a sustained SEV1)",
        )

    def _tell_stakeholders(self, event: str, role: str, people: list[str], why: str) -> None:
        if not people:
            self._timeline("stakeholder", f"no {role} in the access policy to tell: {why}", SYSTEM)
            return
        self._timeline("stakeholder", f"told {', '.join(people)} ({role}): {why}", SYSTEM)
        self._say(
            event,
            f"the message to {role}",
            f"{', '.join('@' + p for p in people)} ({role}): {why}",
        )

    def _item_notice(self, item: ActionItem, notice: str) -> None:
        key = f"{item.id}:{notice}"
        if key in self.carry.item_notices:
            return
        self.carry.item_notices.append(key)
        if notice == "reminder":
            text = f"reminder: {item.id} ({item.text}) is due {item.due:%Y-%m-%d %H:%M}Z"
            to = item.owner
        else:
            assert self.admission is not None
            # The commander, else the last level of the rotation's escalation (its manager).
            to = self.state.commander or self.admission.escalation[-1].person
            text = (
                f"overdue: {item.id} ({item.text}) of {item.owner} was due "
                f"{item.due:%Y-%m-%d %H:%M}Z"
            )
        self._timeline("item", f"{text}; told {to}", SYSTEM)
        self._say(f"item:{key}", f"the {notice} of {item.id}", f"@{to} {text}")

    # -- messages ---------------------------------------------------------------------------

    def _event(self, name: str) -> str:
        self.carry.events += 1
        return f"{self.carry.events}:{name}"

    def _send(self, outgoing: Outgoing) -> None:
        self.carry.outbox.append(outgoing)
        self._wake = True

    def _say(self, event: str, what: str, text: str) -> None:
        """A message to the incident channel."""
        self._send(chat(self.state, self._event(event), what, text))

    def _tell_public(self, event: str, body: str = "") -> None:
        """Seed: update the status page (if configured) when user-visible. What the public reads
        is the stage's standard words, never a person's note."""
        if self.state.user_visible:
            self._send(status_page(self.state, self._event(event), "the status page update", body))

    async def _deliver(self, key: str, outgoing: Outgoing) -> None:
        try:
            result = await self._delivery(outgoing)
        except ActivityError as err:
            if is_cancelled_exception(err):
                raise
            self._timeline(
                "delivery_failed",
                f"{outgoing.what} was not delivered to the {outgoing.channel}: "
                f"{failure_message(err)}",
                SYSTEM,
            )
        else:
            if result.outcome == DeliveryOutcome.DELIVERED and result.attempts > 1:
                self._timeline(
                    "delivery_late",
                    f"{outgoing.what} reached the {outgoing.channel} late, after "
                    f"{result.attempts - 1} failed attempts",
                    SYSTEM,
                )
            elif result.outcome == DeliveryOutcome.NOT_CONFIGURED:
                self._unconfigured(outgoing, result.detail)
        # Not in a ``finally``: a run evicted from the worker's cache closes these coroutines,
        # and workflow calls then are not allowed.
        self.carry.outbox = [o for o in self.carry.outbox if self._key(o) != key]
        self._sending.discard(key)
        self._changed()

    def _unconfigured(self, outgoing: Outgoing, detail: str) -> None:
        """Every page that reached nobody is on the timeline (a person was not woken); of other
        messages, the first per receiver."""
        page = outgoing.channel == "pager" and outgoing.body.get("action") == "trigger"
        if outgoing.channel in self.carry.unconfigured and not page:
            return
        if outgoing.channel not in self.carry.unconfigured:
            self.carry.unconfigured.append(outgoing.channel)
        self._timeline("delivery_skipped", f"{outgoing.what} went nowhere: {detail}", SYSTEM)

    def _delivery(self, outgoing: Outgoing) -> Awaitable[DeliveryResult]:
        options: dict[str, Any] = {
            "start_to_close_timeout": DELIVERY_ATTEMPT,
            "heartbeat_timeout": heartbeat_timeout(DELIVERY_ATTEMPT),
            "schedule_to_close_timeout": DELIVERY_GIVE_UP,
            "retry_policy": DELIVERY_RETRY,
            "summary": f"{outgoing.channel}: {outgoing.what}",
        }
        if outgoing.channel == "chat":
            return workflow.execute_activity_method(
                CommunicationActivities.post_to_channel,
                ChatMessage.model_validate(outgoing.body),
                **options,
            )
        if outgoing.channel == "status page":
            return workflow.execute_activity_method(
                CommunicationActivities.update_status_page,
                StatusPageUpdate.model_validate(outgoing.body),
                **options,
            )
        return workflow.execute_activity_method(
            CommunicationActivities.page, PageEvent.model_validate(outgoing.body), **options
        )

    # -- alerts -----------------------------------------------------------------------------

    @workflow.signal(name=ALERTS_SIGNAL)
    def alerts(self, notification: AlertNotification) -> None:
        """Later notifications of the group. Outside dev mode only the alert sender's, as the
        API signed them, count; others are counted and ignored."""
        admission = self.admission
        if admission is None:
            if len(self._early) < EARLY_ALERTS:
                self._early.append(notification)
            else:
                self.state.refused_alerts += 1
            return
        why = proven(
            notification.authorization,
            admission.trust,
            act="incident.alerts",
            actor=admission.alert_sender,
            payload=notification.signed_payload(),
            run_id="",
        )
        if why is not None:
            self.state.refused_alerts += 1
            workflow.logger.warning("ignored an alerts signal: %s", why)
            return
        news = self._merge(notification)
        # A repeat wakes the loop only when the history has grown enough to continue as new.
        if news or self._should_continue() or not workflow.patched(QUIET_REPEATS):
            self._changed()

    def _merge(self, notification: AlertNotification) -> bool:
        """Take in the group's alerts: new ones and changes of status go on the timeline,
        repeats change nothing, and an alert naming a runbook is queued once. Whether any
        alert was new or changed its status."""
        assert self.admission is not None
        state, sender = self.state, self.admission.alert_sender
        was_firing = state.firing
        index = {a.fingerprint: i for i, a in enumerate(state.alerts)}
        news = False
        for alert in notification.alerts:
            name, summary = _alert_name(alert), alert.annotations.get("summary", "")
            at = index.get(alert.fingerprint)
            before = state.alerts[at].status if at is not None else None
            if at is None:
                index[alert.fingerprint] = len(state.alerts)
                state.alerts.append(alert)
            else:
                state.alerts[at] = alert
            if alert.status == before:
                continue
            news = True
            if alert.status == "firing":
                again = " again" if before == "resolved" else ""
                self._timeline("alert", f"{name} firing{again}: {summary}".rstrip(": "), sender)
                self._consider_runbook(alert)
            else:
                self._timeline("resolved_alert", f"{name} resolved", sender)
        self._keep_recent_alerts()
        state.firing = sum(a.status == "firing" for a in state.alerts)
        if was_firing and not state.firing:
            self._timeline("resolved_alert", "every alert of the group resolved", sender)
            if state.stage in MOVES[ActionKind.CONTAIN][0]:
                self._move(Stage.CONTAIN, sender, "every alert of the group resolved")
        return news

    def _keep_recent_alerts(self) -> None:
        alerts = self.state.alerts
        while len(alerts) > MAX_ALERTS:
            resolved = next((i for i, a in enumerate(alerts) if a.status == "resolved"), 0)
            del alerts[resolved]

    def _consider_runbook(self, alert: Alert) -> None:
        carry = self.carry
        if "runbook" not in alert.labels or alert.fingerprint in carry.considered:
            return
        if len(carry.considered) >= MAX_CONSIDERED:
            return
        carry.considered.append(alert.fingerprint)
        carry.runbook_queue.append(alert)

    # -- runbooks ---------------------------------------------------------------------------

    async def _runbooks_for_alerts(self) -> None:
        while self.carry.runbook_queue:
            await self._runbook_for_alert(self.carry.runbook_queue[0])
            self.carry.runbook_queue.pop(0)
        self._planning = False
        self._changed()

    async def _runbook_for_alert(self, alert: Alert) -> None:
        """Start the runbook an alert names when the policy lets an incident do so on its own;
        otherwise propose it on the timeline and in the channel for a person to start."""
        state, name, runbook = self.state, _alert_name(alert), alert.labels["runbook"]
        if self.carry.runbook_starts >= MAX_RUNBOOKS:
            self._timeline(
                "runbook",
                f"{runbook} for {name} not started: the incident already started "
                f"{MAX_RUNBOOKS} runbooks",
                SYSTEM,
            )
            return
        try:
            plan = await self._plan(
                RunbookPlanRequest(
                    incident_id=state.incident_id,
                    runbook=runbook,
                    requester=state.incident_id,
                    reason=f"alert {name}: {alert.annotations.get('summary', '')}".rstrip(": "),
                    labels=alert.labels,
                )
            )
        except ActivityError as err:
            if is_cancelled_exception(err):
                raise
            self._timeline(
                "runbook", f"{runbook} for {name} not planned: {failure_message(err)}", SYSTEM
            )
            return
        if plan.refused is not None:
            self._timeline("runbook", f"{runbook} for {name} cannot start: {plan.refused}", SYSTEM)
            return
        if plan.choose:
            what, why = runbook, f"a person chooses {', '.join(plan.choose)}"
        elif any(run.run_id == plan.workflow_id for run in state.runs):
            return
        elif plan.on_alert == "start" and state.stage not in RESOLVED:
            await self._start_child(plan, f"{state.incident_id} (alert {name})")
            return
        else:
            what = f"{runbook} for {plan.subject}"
            why = (
                "the incident is resolved, so it is not started on its own"
                if plan.on_alert == "start"
                else "the policy leaves starting it to a person"
            )
        words = ["astra-ops incident runbook", state.incident_id, runbook]
        words += [f"--param {k}={v}" for k, v in sorted(plan.params.items())]
        command = f"`{' '.join(words)}`"
        self._timeline("runbook_proposed", f"{name} names {what}; {why}: {command}", SYSTEM)
        self._say("proposal", f"the proposal of {runbook}", f"{name}: proposed {command}")

    async def _plan(self, request: RunbookPlanRequest) -> RunbookPlan:
        return await workflow.execute_activity_method(
            IncidentActivities.plan_runbook,
            request,
            start_to_close_timeout=DEFAULT_TIMEOUT,
            retry_policy=DEFAULT_RETRY,
            summary=f"plan {request.runbook}",
        )

    async def _start_child(self, plan: RunbookPlan, started_by: str) -> LinkedRun | None:
        """Start the runbook as this incident's child: it carries the incident's id, and it
        outlives the incident's run (a runbook must not be cut off halfway)."""
        state = self.state
        attributes: list[SearchAttributePair[Any]] = [
            SearchAttributePair(sa.RUNBOOK, plan.runbook),
            SearchAttributePair(sa.SEVERITY, plan.severity),
            SearchAttributePair(sa.SERVICE, plan.subject),
            SearchAttributePair(sa.AWAITING_APPROVAL, False),
            SearchAttributePair(sa.DRY_RUN, False),
            SearchAttributePair(sa.INCIDENT_ID, state.incident_id),
        ]
        try:
            handle = await workflow.start_child_workflow(
                plan.runbook,
                plan.request,
                id=plan.workflow_id,
                result_type=RunbookResult,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                search_attributes=TypedSearchAttributes(attributes),
                static_summary=f"{plan.title} of {plan.subject} for {state.incident_id}",
                static_details=f"started by {started_by}",
            )
        except WorkflowAlreadyStartedError:
            self._timeline(
                "runbook",
                f"{plan.workflow_id} is already running, started outside this incident; "
                "watch it with `astra-ops status`",
                SYSTEM,
            )
            return None
        run = LinkedRun(
            runbook=plan.runbook,
            run_id=plan.workflow_id,
            started_by=started_by,
            started_at=workflow.now(),
        )
        state.runs.append(run)
        self.carry.runbook_starts += 1
        self._children.add(plan.workflow_id)
        self._timeline("runbook", f"started {plan.workflow_id} ({plan.title})", started_by)
        self._say(
            "runbook", f"the start of {plan.workflow_id}", f"runbook {plan.workflow_id} started"
        )
        self._spawn(self._follow(run, handle))
        self._changed()
        return run

    async def _follow(
        self, run: LinkedRun, handle: workflow.ChildWorkflowHandle[Any, RunbookResult]
    ) -> None:
        """Put the runbook's steps and outcome on the timeline when it ends."""
        try:
            result = await handle
            run.outcome, run.summary, run.steps = result.outcome.value, result.summary, result.steps
        except ChildWorkflowError as err:
            run.outcome, run.summary = "failed", failure_message(err.cause or err)
        run.finished_at = workflow.now()
        for step in run.steps:
            if step.state in (StepState.DONE, StepState.FAILED) and step.finished_at is not None:
                self._timeline(
                    "runbook_step",
                    f"{run.run_id} · {step.name}: {step.state.value}"
                    + (f" — {step.detail}" if step.detail else ""),
                    run.runbook,
                    at=step.finished_at,
                )
        self._timeline("runbook_outcome", f"{run.run_id}: {run.outcome} — {run.summary}", SYSTEM)
        self._say("runbook-outcome", f"the outcome of {run.run_id}", f"{run.run_id}: {run.outcome}")
        self._children.discard(run.run_id)
        self._changed()

    # -- postmortem and review ----------------------------------------------------------------

    async def _write_postmortem(self) -> None:
        """Entering the postmortem writes the draft and links it; then the review begins."""
        state = self.state
        try:
            written = await workflow.execute_activity_method(
                IncidentActivities.write_postmortem,
                PostmortemRequest(state=state, resolution=self.carry.resolutions),
                start_to_close_timeout=DEFAULT_TIMEOUT,
                retry_policy=DEFAULT_RETRY,
                summary="write the postmortem draft",
            )
        except ActivityError as err:
            if is_cancelled_exception(err):
                raise
            self._timeline(
                "postmortem", f"the draft could not be written: {failure_message(err)}", SYSTEM
            )
        else:
            state.postmortem = written.path
            self._timeline("postmortem", f"draft written to {written.path}", SYSTEM)
            self._say("postmortem", "the postmortem link", f"postmortem draft: {written.path}")
        self._writing = False
        if state.stage == Stage.POSTMORTEM:
            self._move(
                Stage.REVIEW,
                SYSTEM,
                "add the action items (`astra-ops incident action`); the incident closes when "
                "each is done or dropped",
            )

    def _close_review_if_done(self) -> None:
        items = self.state.items
        if (
            self.state.stage == Stage.REVIEW
            and items
            and all(item.state != "open" for item in items)
        ):
            self._move(Stage.CLOSED, SYSTEM, "every action item is done or dropped")

    # -- actions ------------------------------------------------------------------------------

    # One update per action kind, named as the kind (so the stock `temporal workflow update
    # execute --name severity` works and each shows by name in the history), each with the one
    # validator: a refused action changes nothing and leaves no trace.

    @workflow.update(name=ActionKind.ACKNOWLEDGE.value)
    async def acknowledge(self, action: IncidentAction) -> str:
        return await self._act(ActionKind.ACKNOWLEDGE, action)

    @acknowledge.validator
    def _check_acknowledge(self, action: IncidentAction) -> None:
        self._check(ActionKind.ACKNOWLEDGE, action)

    @workflow.update(name=ActionKind.COMMAND.value)
    async def command(self, action: IncidentAction) -> str:
        return await self._act(ActionKind.COMMAND, action)

    @command.validator
    def _check_command(self, action: IncidentAction) -> None:
        self._check(ActionKind.COMMAND, action)

    @workflow.update(name=ActionKind.SEVERITY.value)
    async def severity(self, action: IncidentAction) -> str:
        return await self._act(ActionKind.SEVERITY, action)

    @severity.validator
    def _check_severity(self, action: IncidentAction) -> None:
        self._check(ActionKind.SEVERITY, action)

    @workflow.update(name=ActionKind.NOTE.value)
    async def note(self, action: IncidentAction) -> str:
        return await self._act(ActionKind.NOTE, action)

    @note.validator
    def _check_note(self, action: IncidentAction) -> None:
        self._check(ActionKind.NOTE, action)

    @workflow.update(name=ActionKind.RUNBOOK.value)
    async def runbook(self, action: IncidentAction) -> str:
        return await self._act(ActionKind.RUNBOOK, action)

    @runbook.validator
    def _check_runbook(self, action: IncidentAction) -> None:
        self._check(ActionKind.RUNBOOK, action)

    @workflow.update(name=ActionKind.CONTAIN.value)
    async def contain(self, action: IncidentAction) -> str:
        return await self._act(ActionKind.CONTAIN, action)

    @contain.validator
    def _check_contain(self, action: IncidentAction) -> None:
        self._check(ActionKind.CONTAIN, action)

    @workflow.update(name=ActionKind.REMEDIATE.value)
    async def remediate(self, action: IncidentAction) -> str:
        return await self._act(ActionKind.REMEDIATE, action)

    @remediate.validator
    def _check_remediate(self, action: IncidentAction) -> None:
        self._check(ActionKind.REMEDIATE, action)

    @workflow.update(name=ActionKind.RESOLVE.value)
    async def resolve(self, action: IncidentAction) -> str:
        return await self._act(ActionKind.RESOLVE, action)

    @resolve.validator
    def _check_resolve(self, action: IncidentAction) -> None:
        self._check(ActionKind.RESOLVE, action)

    @workflow.update(name=ActionKind.REOPEN.value)
    async def reopen(self, action: IncidentAction) -> str:
        return await self._act(ActionKind.REOPEN, action)

    @reopen.validator
    def _check_reopen(self, action: IncidentAction) -> None:
        self._check(ActionKind.REOPEN, action)

    @workflow.update(name=ActionKind.ADD_ITEM.value)
    async def add_item(self, action: IncidentAction) -> str:
        return await self._act(ActionKind.ADD_ITEM, action)

    @add_item.validator
    def _check_add_item(self, action: IncidentAction) -> None:
        self._check(ActionKind.ADD_ITEM, action)

    @workflow.update(name=ActionKind.COMPLETE_ITEM.value)
    async def complete_item(self, action: IncidentAction) -> str:
        return await self._act(ActionKind.COMPLETE_ITEM, action)

    @complete_item.validator
    def _check_complete_item(self, action: IncidentAction) -> None:
        self._check(ActionKind.COMPLETE_ITEM, action)

    @workflow.update(name=ActionKind.DROP_ITEM.value)
    async def drop_item(self, action: IncidentAction) -> str:
        return await self._act(ActionKind.DROP_ITEM, action)

    @drop_item.validator
    def _check_drop_item(self, action: IncidentAction) -> None:
        self._check(ActionKind.DROP_ITEM, action)

    def _check(self, kind: ActionKind, action: IncidentAction) -> None:
        if self.admission is None:
            return  # judged in ``_act``, once the policy is known
        why = refusal(kind, action, self.carry, self.admission, workflow.now())
        if why is not None:
            raise ValueError(why)

    async def _act(self, kind: ActionKind, action: IncidentAction) -> str:
        """Apply a validated action; say what it did."""
        if self.admission is None:
            # It came with the run's first moments, before the policy was read: it waits for
            # it, then meets the same rules. A refusal now fails it without changing anything.
            await workflow.wait_condition(lambda: self.admission is not None)
            assert self.admission is not None
            why = refusal(kind, action, self.carry, self.admission, workflow.now())
            if why is not None:
                raise ApplicationError(why, type="ActionRefused", non_retryable=True)
        if kind == ActionKind.RUNBOOK:
            return await self._start_runbook(action)
        done = self._apply(kind, action)
        self._changed()
        return done

    def _apply(self, kind: ActionKind, action: IncidentAction) -> str:
        state, actor, why = self.state, action.actor, action.text
        if kind in MOVES:
            stage = MOVES[kind][1]
            self._move(stage, actor, why or f"marked {kind.value} by {actor}")
            return f"{state.incident_id} is now in stage {stage.value}"
        if kind == ActionKind.ACKNOWLEDGE:
            return self._acknowledge(actor, why)
        if kind == ActionKind.COMMAND:
            return self._take_command(actor, action.person or actor)
        if kind == ActionKind.SEVERITY:
            assert action.severity is not None
            return self._change_severity(actor, action.severity, why)
        if kind == ActionKind.NOTE:
            self._timeline("note", why, actor)
            return "noted"
        return self._change_item(kind, action)

    def _acknowledge(self, actor: str, text: str) -> str:
        self.state.acknowledged_by = actor
        self.carry.next_page_at = None
        self._timeline("ack", "acknowledged" + (f": {text}" if text else ""), actor)
        self._close_pages("acknowledge")
        if self.state.stage == Stage.DETECT:
            self._move(Stage.TRIAGE, actor, f"acknowledged by {actor}")
        return f"acknowledged by {actor}; escalation stopped"

    def _take_command(self, actor: str, person: str) -> str:
        self.state.commander = person
        self.carry.next_commander_request_at = None
        by = "" if person == actor else f" (nominated by {actor})"
        self._timeline("commander", f"{person} is the incident commander{by}", actor)
        self._say("commander", "the commander message", f"{person} is the incident commander{by}")
        return f"{person} is the incident commander"

    def _change_severity(self, actor: str, severity: Severity, reason: str) -> str:
        state, before = self.state, self.state.severity
        state.severity = severity
        self._timeline("severity", f"{before.value} → {severity.value}: {reason}", actor)
        self._say(
            "severity",
            "the severity change",
            f"{before.value} → {severity.value} by {actor}: {reason}",
        )
        self._tell_public("severity", "We have reassessed the impact of this issue.")
        if severity == Severity.SEV1:
            self._sev1_began()
        else:
            self.carry.sev1_since = None
        if needs_commander(state) and self.carry.next_commander_request_at is None:
            self.carry.next_commander_request_at = workflow.now()
        return f"severity {before.value} → {severity.value}"

    def _change_item(self, kind: ActionKind, action: IncidentAction) -> str:
        items = self.state.items
        if kind == ActionKind.ADD_ITEM:
            assert action.person is not None and action.due is not None
            item = ActionItem(
                id=f"item-{len(items) + 1}", text=action.text, owner=action.person, due=action.due
            )
            items.append(item)
            self._timeline(
                "item",
                f"{item.id} for {item.owner}, due {item.due:%Y-%m-%d %H:%M}Z: {item.text}",
                action.actor,
            )
            return f"added {item.id}"
        [item] = [i for i in items if i.id == action.item]
        item.state = "done" if kind == ActionKind.COMPLETE_ITEM else "dropped"
        item.note = action.text
        self._timeline(
            "item",
            f"{item.id} {item.state}" + (f": {action.text}" if action.text else ""),
            action.actor,
        )
        return f"{item.id} {item.state}"

    async def _start_runbook(self, action: IncidentAction) -> str:
        """A person starts a runbook for the incident: they are its requester, so the runbook's
        four-eyes rule keeps them from approving it themselves."""
        assert action.runbook is not None
        plan = await self._plan(
            RunbookPlanRequest(
                incident_id=self.state.incident_id,
                runbook=action.runbook,
                requester=action.actor,
                reason=action.text or f"for {self.state.incident_id}",
                params=action.params,
            )
        )
        if plan.refused is not None:
            raise ApplicationError(plan.refused, type="RunbookRefused", non_retryable=True)
        run = await self._start_child(plan, action.actor)
        if run is None:
            raise ApplicationError(
                f"{plan.workflow_id} is already running outside this incident",
                type="RunbookRunning",
                non_retryable=True,
            )
        return f"started {run.run_id}"

    def _move(self, stage: Stage, actor: str, why: str) -> None:
        """Enter a stage: on the timeline, in the channel, on the status page, and in what the
        stage sets going (resolution closes the pages; a reopen wants a commander again)."""
        state, before = self.state, self.state.stage
        state.stage = stage
        self._timeline("stage", f"{stage.value} (from {before.value}): {why}", actor)
        said = f"resolved by {actor}: {why}" if stage == Stage.POSTMORTEM else why
        self._say(
            f"stage-{stage.value}", f"the {stage.value} message", f"stage {stage.value}: {said}"
        )
        if stage not in (Stage.REVIEW, Stage.CLOSED):
            self._tell_public(f"stage-{stage.value}")
        if stage == Stage.POSTMORTEM:
            self.carry.resolutions += 1
            state.resolved_at = workflow.now()
            self.carry.next_page_at = None
            self._close_pages("resolve")
        if stage == Stage.TRIAGE and before in RESOLVED:
            state.resolved_at = None
        if needs_commander(state) and self.carry.next_commander_request_at is None:
            self.carry.next_commander_request_at = workflow.now()
        self._changed()

    # -- what people see ------------------------------------------------------------------------

    def _timeline(self, kind: str, text: str, actor: str = "", at: datetime | None = None) -> None:
        state = self.state
        if len(state.timeline) >= MAX_TIMELINE:
            state.timeline_omitted += 1
            return
        state.timeline.append(
            TimelineEntry(at=at or workflow.now(), kind=kind, actor=actor, text=text)
        )

    @workflow.query(name=STATE_QUERY)
    def query_state(self) -> IncidentState:
        return self.state

    def _show(self) -> None:
        """The search attributes (upserted only when they change: each is an event) and the
        UI's current details."""
        state = self.state
        wanted = {
            sa.STEP.name: state.stage.value,
            sa.SEVERITY.name: state.severity.value,
            sa.INCIDENT_ID.name: state.incident_id,
        }
        keys = {
            sa.STEP.name: sa.STEP,
            sa.SEVERITY.name: sa.SEVERITY,
            sa.INCIDENT_ID.name: sa.INCIDENT_ID,
        }
        changed = [keys[k].value_set(v) for k, v in wanted.items() if self._shown.get(k) != v]
        if changed:
            workflow.upsert_search_attributes(changed)
            self._shown = wanted
        open_items = [i for i in state.items if i.state == "open"]
        lines = [
            f"**{state.severity.value} {state.title}** — stage **{state.stage.value}**",
            f"Rotation {state.rotation}; commander {state.commander or 'none'}; "
            f"acknowledged by {state.acknowledged_by or 'nobody'}",
            f"Alerts firing: {state.firing} of {len(state.alerts)}",
        ]
        if self.carry.next_page_at is not None and self.admission is not None:
            level = self.admission.escalation[len(self.carry.pages)]
            lines.append(
                f"Next page: {level.person} ({level.target}) at {self.carry.next_page_at:%H:%M:%S}Z"
                " unless acknowledged"
            )
        lines += [f"- {run.run_id}: {run.outcome or 'running'}" for run in state.runs]
        lines += [f"- {i.id} ({i.owner}, due {i.due:%Y-%m-%d}): {i.text}" for i in open_items]
        if state.postmortem:
            lines.append(f"Postmortem draft: {state.postmortem}")
        workflow.set_current_details("\n".join(lines))
