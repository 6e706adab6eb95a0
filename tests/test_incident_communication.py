"""What an incident tells whom: the channel, the status page only when user-visible, the pager,
the product owner for a sustained SEV1 and security for auth or data exposure; and receivers that
are down or refuse, which delay or fail a message but never an action."""

from __future__ import annotations

import time
from collections import Counter

import psycopg
from pydantic import SecretStr

from tests.conftest_incident import Desk, incident_worker, kinds, state
from tests.conftest_kube import eventually
from workflows.incident_models import ActionKind, Severity, Stage


async def ledger(desk: Desk, incident: str) -> dict[str, list[tuple[str, bool]]]:
    """Channel -> (event key, delivered) of every message the incident sent."""
    async with await psycopg.AsyncConnection.connect(desk.settings.state_dsn) as conn:
        rows = await (
            await conn.execute(
                "SELECT channel, event_key, delivered_at IS NOT NULL FROM astra_ops_deliveries"
                " WHERE incident_id = %s ORDER BY channel, event_key",
                (incident,),
            )
        ).fetchall()
    found: dict[str, list[tuple[str, bool]]] = {}
    for channel, key, delivered in rows:
        found.setdefault(channel, []).append((key, delivered))
    return found


async def settled(desk: Desk, incident: str, expected: dict[str, int]) -> None:
    """Wait until the incident sent ``expected`` messages per channel and each was delivered."""

    async def delivered() -> bool:
        sent = await ledger(desk, incident)
        counts = {channel: len(rows) for channel, rows in sent.items()}
        return counts == expected and all(ok for rows in sent.values() for _, ok in rows)

    await eventually(delivered, timeout=60, interval=0.2, message=f"{expected} delivered")


async def test_receivers_down_for_a_while_delay_messages_but_lose_and_repeat_none(
    desk: Desk,
) -> None:
    for receiver in (desk.chat, desk.status_page, desk.pager):
        receiver.fail_for(4)
    async with incident_worker(desk):
        started = time.monotonic()
        handle = await desk.open(
            "Goals are not accepted", Severity.SEV2, components=["scheduler"], user_visible=True
        )
        await desk.act(handle, ActionKind.ACKNOWLEDGE, "alice")
        await desk.act(handle, ActionKind.COMMAND, "alice")
        await desk.act(handle, ActionKind.CONTAIN, "alice", text="gateway shedding load")
        acted_within = time.monotonic() - started
        during = await state(handle)
        # opened, commander request, triage, commander, contain; the same three stages
        # publicly; the page and its acknowledgement.
        await settled(desk, handle.id, {"chat": 5, "status page": 3, "pager": 2})
        # Each receiver takes the messages in order: its first one retries through the outage
        # and is noted late; the rest wait behind it and go through on their first attempt.
        delivered = await desk.until(
            handle, lambda s: kinds(s).count("delivery_late") == 3, "each receiver's late one"
        )
        sent = await ledger(desk, handle.id)

    # The actions did not wait for the receivers.
    assert acted_within < 4 and during.stage == Stage.CONTAIN
    assert all(delivered for rows in sent.values() for _, delivered in rows)
    took = {
        "chat": len(desk.chat.accepted),
        "status page": len(desk.status_page.accepted),
        "pager": len(desk.pager.accepted),
    }
    assert took == {channel: len(rows) for channel, rows in sent.items()}
    assert len(set(desk.chat_texts())) == len(desk.chat_texts())
    assert Counter(desk.pages()) == {
        ("trigger", f"{handle.id}/primary"): 1,
        ("acknowledge", f"{handle.id}/primary"): 1,
    }
    # One incident on the status page: created once, then updated.
    assert [r.method for r in desk.status_page.accepted][:1] == ["POST"]
    assert {r.method for r in desk.status_page.accepted[1:]} <= {"PATCH"}
    late = [e.text for e in delivered.timeline if e.kind == "delivery_late"]
    assert any("the opening message reached the chat late" in t for t in late)
    assert any("the page to alice (primary) reached the pager late" in t for t in late)
    assert any("the status page update reached the status page late" in t for t in late)
    # In the order the incident wrote them: the public status ends where the incident is.
    statuses = [r.body["incident"]["status"] for r in desk.status_page.accepted]
    assert statuses[0] == "investigating" and statuses[-1] == "identified", statuses


async def test_a_rejected_message_shows_on_the_timeline_and_the_incident_goes_on(
    desk: Desk,
) -> None:
    desk.chat.fail_next(1, status=400)
    async with incident_worker(desk):
        handle = await desk.open(components=["workers"])
        failed = await desk.until(
            handle, lambda s: "delivery_failed" in kinds(s), "the failure recorded"
        )
        await desk.act(handle, ActionKind.ACKNOWLEDGE, "carol")
        after = await state(handle)

    [entry] = [e for e in failed.timeline if e.kind == "delivery_failed"]
    assert entry.text.startswith("the opening message was not delivered to the chat: ")
    assert "rejected the message with 400" in entry.text
    assert "/services/" not in entry.text  # the webhook's path is a credential
    assert after.acknowledged_by == "carol"


async def test_the_status_page_hears_only_of_user_visible_incidents(desk: Desk) -> None:
    async with incident_worker(desk):
        internal = await desk.open("Canary node flapping", components=["scheduler"])
        await desk.act(internal, ActionKind.ACKNOWLEDGE, "alice")
        await desk.act(internal, ActionKind.CONTAIN, "alice", text="cordoned")
        public = await desk.open(
            "Tasks are delayed", Severity.SEV2, components=["scheduler"], user_visible=True
        )
        await desk.act(public, ActionKind.ACKNOWLEDGE, "alice")
        await desk.act(public, ActionKind.CONTAIN, "alice", text="failed over")
        await settled(desk, internal.id, {"chat": 3, "pager": 2})
        await settled(desk, public.id, {"chat": 4, "status page": 3, "pager": 2})
        sent = {h.id: await ledger(desk, h.id) for h in (internal, public)}

    assert "status page" not in sent[internal.id]
    assert len(sent[public.id]["status page"]) == 3  # opened, triage, contain
    first, *rest = desk.status_page.accepted
    assert first.body["incident"]["status"] == "investigating"
    assert first.body["incident"]["components"] == {"cmpsched": "partial_outage"}
    assert rest[-1].body["incident"]["status"] == "identified"


async def test_a_sustained_sev1_tells_the_product_owner_and_a_tag_tells_security(
    desk: Desk,
) -> None:
    desk.policy(sustained_sev1_seconds=1)
    async with incident_worker(desk):
        handle = await desk.open(
            "Postgres primary unreachable", Severity.SEV1, tags=["data-exposure"]
        )
        told = await desk.until(
            handle,
            lambda s: sum(e.kind == "stakeholder" for e in s.timeline) == 2,
            "both stakeholders told",
        )
        minor = await desk.open("Non-prod worker pool stuck", Severity.SEV3)
        await desk.act(minor, ActionKind.NOTE, "alice", text="no stakeholder for this one")
        quiet = await state(minor)

    assert [e.text for e in told.timeline if e.kind == "stakeholder"] == [
        "told heidi (security): the incident is tagged data-exposure",
        "told grace (product owner): SEV1 for more than 1 s (a sustained SEV1)",
    ]
    texts = desk.chat_texts()
    assert any("@heidi (security)" in t for t in texts)
    assert sum("@grace (product owner)" in t for t in texts) == 1
    assert "stakeholder" not in kinds(quiet)


async def test_a_page_that_reaches_nobody_is_on_the_timeline(desk: Desk) -> None:
    unset = {"status_page_id": None, "status_page_api_key": None}
    desk.settings = desk.settings.model_copy(
        update={"pagerduty_routing_keys": SecretStr("agent-platform:Ragent"), **unset}
    )
    async with incident_worker(desk):
        handle = await desk.open(components=["scheduler"], user_visible=True)
        skipped = await desk.until(
            handle, lambda s: kinds(s).count("delivery_skipped") == 2, "both noted"
        )

    assert sorted(e.text for e in skipped.timeline if e.kind == "delivery_skipped") == [
        "the page to alice (primary) went nowhere: no PagerDuty routing key for kernel-sre: add "
        "'kernel-sre:<integration key>' to ASTRA_OPS_PAGERDUTY_ROUTING_KEYS",
        "the status page update went nowhere: no status page: set ASTRA_OPS_STATUS_PAGE_ID and "
        "ASTRA_OPS_STATUS_PAGE_API_KEY to update one",
    ]
    assert desk.pages() == [] and desk.status_page.requests == []
