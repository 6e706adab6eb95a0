"""`astra-ops incident ...` as people type it: through the API with their token, and in dev mode
straight to Temporal; against the stand-in incident workflow (tests/incident_stub.py)."""

from __future__ import annotations

import json
import re

from temporalio.client import Client
from temporalio.worker import Worker

from runtime.settings import Settings
from tests.incident_stub import DevIncidentStub, Received
from tests.test_cli import Cli, api_url, cli
from workers.worker import workflow_runner

__all__ = ["api_url", "cli"]  # the CLI fixtures, shared with test_cli


async def received(client: Client, incident_id: str) -> Received:
    answer: Received = await client.get_workflow_handle(incident_id).query(
        "received", result_type=Received
    )
    return answer


async def test_open_steer_and_show_an_incident(
    cli: Cli, client: Client, incident_stub: Worker
) -> None:
    opened = await cli(
        "incident", "open", "--severity", "sev2", "--title", "task failures at 9%",
        "-c", "tasks", "--tag", "auth", "--reason", "dashboards red", "--json", user="alice",
    )  # fmt: skip
    assert opened.exit_code == 0, opened.output
    incident = json.loads(opened.stdout)["incident_id"]
    bare = incident.removeprefix("incident/")

    for args, user, said in [
        (("ack", bare), "bob", "acknowledge by bob"),
        (("command", bare, "--person", "alice"), "bob", "command by bob"),
        (("severity", bare, "SEV1", "--reason", "every pool"), "alice", "severity by alice"),
        (("note", bare, "replica lag back to 0"), "carol", "note by carol"),
        (("runbook", bare, "high-error-rate", "-p", "threshold=0.05"), "alice", "runbook by"),
        (("contain", bare, "--note", "intake paused"), "alice", "contain by alice"),
        (("action", "add", bare, "alert on lag", "--owner", "bob", "--due", "2026-12-01"),
         "alice", "add_item by alice"),
        (("action", "complete", bare, "item-1"), "bob", "complete_item by bob"),
        (("action", "drop", bare, "item-2", "--reason", "superseded"), "bob", "drop_item by bob"),
        (("remediate", bare), "alice", "remediate by alice"),
    ]:  # fmt: skip
        done = await cli("incident", *args, user=user)
        assert done.exit_code == 0, (args, done.output)
        assert said in done.stdout, (args, done.stdout)

    got = await received(client, incident)
    assert (got.opened.opened_by, got.opened.components, got.opened.tags) == (
        "alice",
        ["tasks"],
        ["auth"],
    )
    sent = {a.kind.value: a.action for a in got.actions}
    assert sent["command"].person == "alice" and sent["runbook"].params == {"threshold": "0.05"}
    assert sent["add_item"].due is not None and sent["add_item"].due.isoformat() == (
        "2026-12-01T00:00:00+00:00"
    )

    shown = await cli("incident", "show", bare)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[:2] == [f"{incident}  SEV1  remediate", "task failures at 9%"]
    for line in ("commander: alice", "acknowledged by: bob", "components: tasks", "timeline:"):
        assert line in lines, (line, shown.stdout)
    timeline = shown.stdout.split("timeline:")[1]
    for entry in (
        r"opened\s+alice\s+task failures at 9%",
        r"severity\s+alice\s+every pool",
        r"note\s+carol\s+replica lag back to 0",
    ):
        assert re.search(entry, timeline), (entry, timeline)

    listed = await cli("incident", "list", "--open", "--json")
    assert incident in [i["incident_id"] for i in json.loads(listed.stdout)]
    table = await cli("incident", "list", "--severity", "SEV1")
    assert table.exit_code == 0 and "incident " in table.stdout

    # Dave is in no rotation: the incident refuses him; the refusal is one line, exit 1.
    refused = await cli("incident", "resolve", bare, user="dave")
    assert refused.exit_code == 1 and "dave may not resolve" in refused.stderr
    assert (await cli("incident", "resolve", bare, user="alice")).exit_code == 0
    await client.get_workflow_handle(incident).result()
    late = await cli("incident", "note", bare, "too late", user="alice")
    assert late.exit_code == 1 and f"incident {incident} is completed" in late.stderr


async def test_every_incident_error_is_one_clear_line_and_non_zero(
    cli: Cli, client: Client, incident_stub: Worker
) -> None:
    opened = await cli(
        "incident", "open", "--severity", "SEV3", "--title", "one pool stuck", "--json",
        user="carol",
    )  # fmt: skip
    incident = json.loads(opened.stdout)["incident_id"]
    cases = [
        (("open", "--severity", "SEV9", "--title", "x"), "alice", 2, "severity: Input should be"),
        (("open", "--severity", "SEV2", "--title", ""), "alice", 2, "title: String should have"),
        (("open", "--severity", "SEV2", "--title", "x", "--as", "bob"), "alice", 2,
         "--as works only"),
        (("open", "--severity", "SEV2", "--title", "x"), "mallory", 1, "not in the access policy"),
        (("severity", incident, "SEV9", "--reason", "x"), "alice", 2, "severity: Input should be"),
        (("ack", incident), "carol", 0, ""),
        (("ack", incident), "erin", 1, "already acknowledged by carol"),
        (("show", "nope"), "dave", 1, "no incident 'incident/nope'"),
        (("note", "nope", "x"), "alice", 1, "no incident 'incident/nope'"),
        (("list", "--severity", "SEV7"), "dave", 2, "--severity takes SEV1, SEV2 or SEV3"),
        (("action", "add", incident, "x", "--owner", "bob", "--due", "soon"), "alice", 2,
         "Invalid value for '--due'"),
    ]  # fmt: skip
    for args, user, code, message in cases:
        result = await cli("incident", *args, user=user)
        assert result.exit_code == code, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        if code == 1:
            assert result.stderr.count("\n") == 1, result.stderr


async def test_dev_mode_talks_to_temporal_and_trusts_as(
    cli: Cli, client: Client, settings: Settings
) -> None:
    dev = Cli({**cli.env, "ASTRA_OPS_DEV_MODE": "true"})
    async with Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[DevIncidentStub],
        workflow_runner=workflow_runner(),
    ):
        opened = await dev(
            "incident", "open", "--severity", "SEV2", "--title", "redis replica lost",
            "--as", "alice", "--json", user="",
        )  # fmt: skip
        assert opened.exit_code == 0, opened.output
        incident = json.loads(opened.stdout)["incident_id"]
        acked = await dev("incident", "ack", incident, "--as", "bob", user="")
        assert acked.exit_code == 0, acked.output
        nobody = await dev("incident", "ack", incident, user="")
        assert nobody.exit_code == 1 and "who are you?" in nobody.stderr
        got = await received(client, incident)
        assert got.opened.authorization is None  # dev mode signs nothing
        assert [(a.kind.value, a.action.actor) for a in got.actions] == [("acknowledge", "bob")]
        shown = await dev("incident", "show", incident, user="")
        assert "acknowledged by: bob" in shown.stdout, shown.output
