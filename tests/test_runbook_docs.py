"""The pages in docs/runbooks/ say what the code says, and the generator refuses to write a page
it cannot make true."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from runtime.access import AccessPolicy, AccessPolicyError, load_policy
from starters.runbook_docs import (
    DOCS,
    POLICY,
    RunbookDocsError,
    drift,
    load_rules,
    main,
    narrative,
    render,
    runbook_steps,
    write,
)
from workflows import high_error_rate, shard_scaling


def policy() -> AccessPolicy:
    return load_policy(POLICY)


def test_the_committed_pages_are_what_the_code_generates() -> None:
    stale = drift(DOCS, render(policy(), load_rules()))
    assert stale == [], f"docs/runbooks/ is out of date ({'; '.join(stale)}): run `make docs`"


def test_check_names_every_page_that_drifted_and_says_to_run_make_docs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pages = render(policy(), load_rules())
    write(tmp_path, pages)
    (tmp_path / "shard-scaling.md").write_text("edited by hand\n")
    (tmp_path / "worker-lost.md").unlink()
    (tmp_path / "retired-runbook.md").write_text("a runbook that is gone\n")

    assert main(["--check"], tmp_path) == 1
    said = capsys.readouterr().err
    for stale in (
        "retired-runbook.md belongs to no runbook",
        "shard-scaling.md differs",
        "worker-lost.md is missing",
    ):
        assert stale in said
    assert "Run `make docs`" in said

    assert main([], tmp_path) == 0
    assert drift(tmp_path, pages) == []
    assert not (tmp_path / "retired-runbook.md").exists()


def test_a_runbook_the_policy_does_not_cover_stops_the_generator() -> None:
    full = policy()
    without = full.model_copy(
        update={"runbooks": {k: v for k, v in full.runbooks.items() if k != "worker-lost"}}
    )
    with pytest.raises(AccessPolicyError, match="no entry for runbook worker-lost"):
        render(without, load_rules())


def test_an_approval_step_nobody_may_approve_stops_the_generator() -> None:
    full = policy()
    access = full.runbooks["shard-scaling"]
    unapproved = access.model_copy(update={"approvals": {}})
    broken = full.model_copy(update={"runbooks": full.runbooks | {"shard-scaling": unapproved}})
    with pytest.raises(AccessPolicyError, match="names no approvers for step 'approve scaling'"):
        render(broken, load_rules())


def test_a_catalogue_step_no_code_runs_stops_the_generator() -> None:
    phantom = replace(
        shard_scaling.SPEC, steps=lambda req: [*shard_scaling.steps(req), "drain the shards"]
    )
    with pytest.raises(RunbookDocsError, match=r"'drain the shards'.*no check/act/verify/approval"):
        runbook_steps(phantom, shard_scaling)


def test_a_step_the_code_runs_but_the_catalogue_omits_stops_the_generator() -> None:
    spec = high_error_rate.SPEC
    omitted = replace(
        spec, steps=lambda req: [s for s in spec.steps_for(req) if s != "pause intake again"]
    )
    with pytest.raises(RunbookDocsError, match="runs step 'pause intake again', which its"):
        runbook_steps(omitted, high_error_rate)


def test_a_docstring_without_its_rollback_stops_the_generator() -> None:
    module = ModuleType("workflows.undocumented", "Shard Scaling: does things.\n\nBecause.")
    with pytest.raises(RunbookDocsError, match="one paragraph starting 'Rollback:'"):
        narrative(shard_scaling.SPEC, module)


def test_each_step_has_the_kind_the_code_runs_it_as() -> None:
    kinds = {s.name: s.kind for s in runbook_steps(shard_scaling.SPEC, shard_scaling)}
    # Named by an f-string over the deployments, and through `_apply`'s prefix.
    assert kinds["check astra-worker health"] == "check"
    assert kinds["restart astra-scheduler"] == "act"
    assert kinds["wait for astra-scheduler"] == "check"
    assert kinds["verify astra-worker runs the new config"] == "verify"
    assert kinds["approve scaling"] == "approval"
    # Through the `Knob` helper, which calls the step runner for the runbook.
    knob = {s.name: s for s in runbook_steps(high_error_rate.SPEC, high_error_rate)}
    assert knob["read paused intake"].kind == "check"
    assert knob["pause intake of the failing class"].kind == "act"
    assert knob["pause intake of the failing class"].activities[0].startswith("`patch_config`:")


def test_a_page_tells_a_person_what_fires_who_decides_and_how_to_start() -> None:
    page = render(policy(), load_rules())["worker-lost.md"]
    assert "astra_worker_heartbeat_age_seconds > 30" in page
    assert "| Owned by | Agent Platform (`agent-platform`)" in page
    assert (
        "| 5 | approve replacing workers of a stuck pool | **approval** |  | 1 person from "
        "Agent Platform, not the requester; without a decision in 30 min" in page
    )
    assert "| 8 | delete the worker's pod | **act** |" in page
    assert "at most 3 times in 1 h on the same target" in page
    assert (
        'astra-ops start worker-lost --param worker_id=astra-worker-7 --reason "<why>" '
        "--dry-run --wait" in page
    )
    assert "astra-ops approve worker-lost/astra-worker-7" in page
    assert "**Rollback**: none." in page
    assert "| `stuck_pool_share` | number | `0.5` | > 0, <= 1 | default 0.5, allowed" in page
