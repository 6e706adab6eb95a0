"""The postmortem draft: an incident's history as the Markdown page people finish after it.

Everything in it comes from the incident's state as the workflow kept it (its timeline, alerts,
runbooks and action items), so the draft says what happened in the order it happened, with who
did what; the causes and the lessons are left for people to write.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from workflows.incident_models import IncidentState, LinkedRun, TimelineEntry


def _when(at: datetime | None) -> str:
    return f"{at:%Y-%m-%d %H:%M:%S}Z" if at is not None else "—"


def _line(text: str) -> str:
    """One Markdown list line: a person's text may hold newlines."""
    return " ".join(text.split())


def _duration(span: timedelta) -> str:
    minutes, seconds = divmod(int(span.total_seconds()), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min {seconds} s" if hours else f"{minutes} min {seconds} s"


def impact_window(state: IncidentState) -> tuple[datetime, datetime | None]:
    """From the first alert's start (or the opening) to the resolution (or the last alert's end);
    the end is None while neither happened."""
    starts = [a.starts_at for a in state.alerts]
    start = min([state.opened_at, *starts])
    ends = [a.ends_at for a in state.alerts if a.status == "resolved" and a.ends_at is not None]
    end = state.resolved_at or (max(ends) if ends and state.firing == 0 else None)
    return start, end


def _entry(entry: TimelineEntry) -> str:
    who = f" · {entry.actor}" if entry.actor else ""
    return f"- {_when(entry.at)} · {entry.kind}{who} — {_line(entry.text)}"


def _run(run: LinkedRun) -> list[str]:
    lines = [
        f"### {run.runbook}: `{run.run_id}`",
        "",
        f"- Started by {run.started_by} at {_when(run.started_at)}; "
        f"finished {_when(run.finished_at)}",
        f"- Outcome: **{run.outcome or 'still running'}**"
        + (f" — {_line(run.summary)}" if run.summary else ""),
    ]
    approvals = [s for s in run.steps if s.name.startswith("approve ") and s.detail]
    if approvals:
        lines.append("- Approvals:")
        lines += [f"  - {s.name}: {s.state.value} — {_line(s.detail)}" for s in approvals]
    if run.steps:
        lines.append("- Steps:")
        lines += [
            f"  - {s.name}: {s.state.value}" + (f" — {_line(s.detail)}" if s.detail else "")
            for s in run.steps
        ]
    return [*lines, ""]


def render(state: IncidentState) -> str:
    """The draft. Deterministic for a state, so a retried write writes the same page."""
    start, end = impact_window(state)
    severities = [e for e in state.timeline if e.kind == "severity"]
    lines = [
        f"# Postmortem: {_line(state.title)}",
        "",
        f"Draft written by astra-ops from the history of `{state.incident_id}`. Everything below "
        "the line comes from the incident's record; finish the causes and the lessons.",
        "",
        "## Summary",
        "",
        f"- Severity: **{state.severity.value}** ({state.severity.meaning})",
        f"- Rotation: {state.rotation}; components: {', '.join(state.components) or '—'}",
        f"- Opened by {state.opened_by} at {_when(state.opened_at)}; "
        f"commander: {state.commander or 'none'}; "
        f"acknowledged by: {state.acknowledged_by or 'nobody'}",
        f"- Resolved at {_when(state.resolved_at)}",
        f"- User-visible: {'yes' if state.user_visible else 'no'}"
        + (f"; tags: {', '.join(state.tags)}" if state.tags else ""),
        "",
        "## Severity changes",
        "",
        *([_entry(e) for e in severities] or [f"- None: {state.severity.value} throughout"]),
        "",
        "## Impact window",
        "",
        f"- From {_when(start)} to {_when(end) if end else 'not ended'}"
        + (f" ({_duration(end - start)})" if end else ""),
        "",
        "---",
        "",
        "## Timeline",
        "",
        *[_entry(e) for e in sorted(state.timeline, key=lambda e: e.at)],
    ]
    if state.timeline_omitted:
        lines.append(f"- … and {state.timeline_omitted} later entries the incident did not keep")
    lines += ["", "## Alerts", ""]
    for alert in state.alerts:
        name = alert.labels.get("alertname", alert.fingerprint)
        summary = alert.annotations.get("summary", "")
        labels = ", ".join(f"{k}={v}" for k, v in sorted(alert.labels.items()) if k != "alertname")
        lines.append(
            f"- **{name}** ({alert.status}) from {_when(alert.starts_at)} to "
            f"{_when(alert.ends_at) if alert.status == 'resolved' else 'still firing'}"
            + (f": {_line(summary)}" if summary else "")
            + (f" [{labels}]" if labels else "")
        )
    if not state.alerts:
        lines.append("- None: opened by hand")
    lines += ["", "## Runbooks", ""]
    for run in state.runs:
        lines += _run(run)
    if not state.runs:
        lines += ["- None ran for this incident", ""]
    lines += ["## Action items", ""]
    lines += [
        f"- [{'x' if item.state == 'done' else ' '}] {item.id}: {_line(item.text)} — "
        f"{item.owner}, due {_when(item.due)} ({item.state}"
        + (f": {_line(item.note)}" if item.note else "")
        + ")"
        for item in state.items
    ] or ["- None yet"]
    lines += [
        "",
        "## Causes",
        "",
        "<!-- What made this happen, and what let it reach users. -->",
        "",
        "## Lessons",
        "",
        "<!-- What went well, what did not, and what we change. -->",
        "",
    ]
    return "\n".join(lines)
