"""A runbook's parameters as people read them: type, default, bounds, what the policy allows.

Read from the request model's JSON schema and the access policy, so the CLI's `runbooks`
listing and the generated `docs/runbooks/` say the same thing in the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.access import RunbookAccess
from workflows.runbook import RunbookSpec

CALLER_FIELDS = {"requester", "reason", "dry_run", "authorization"}
"""Fields every start has, set by the command itself (`--reason`, `--dry-run`, who you are)."""

_BOUNDS = (
    ("exclusiveMinimum", ">"),
    ("minimum", ">="),
    ("exclusiveMaximum", "<"),
    ("maximum", "<="),
)


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    required: bool
    default: Any
    bounds: list[str]
    """The model's own bounds, e.g. ``["> 0", "<= 1"]``."""
    policy: str | None
    """What the access policy allows, e.g. ``default 0.5, allowed [0.05, 0.5]``."""
    description: str


def _number(value: float) -> str:
    """``2592000``, not ``2.592e+06``; ``0.05``, not ``0.05000000000000000277``."""
    return f"{value:.15g}"


def runbook_parameters(spec: RunbookSpec[Any], access: RunbookAccess | None) -> list[Parameter]:
    """Every parameter a start may set with ``--param``, in the model's order."""
    schema = spec.request.model_json_schema()
    required = set(schema.get("required", []))
    found = []
    for name, prop in schema["properties"].items():
        if name in CALLER_FIELDS:
            continue
        kinds = [p.get("type", "?") for p in prop.get("anyOf", [prop])]
        limit = access.limits.get(name) if access else None
        policy = None
        if limit is not None:
            if isinstance(limit.default, list):
                policy = f"default {limit.default}, from {limit.choices()}"
            else:
                low, high = limit.bounds()
                policy = (
                    f"default {_number(limit.default)}, allowed [{_number(low)}, {_number(high)}]"
                )
        found.append(
            Parameter(
                name=name,
                type="|".join(k for k in kinds if k != "null") or "?",
                required=name in required,
                default=prop.get("default"),
                bounds=[f"{sign} {_number(prop[key])}" for key, sign in _BOUNDS if key in prop],
                policy=policy,
                description=prop.get("description", ""),
            )
        )
    return found


def parameters(spec: RunbookSpec[Any], access: RunbookAccess | None) -> list[str]:
    """One line per parameter: name, type, default, bounds, and what the access policy allows."""
    lines = []
    for p in runbook_parameters(spec, access):
        text = f"{p.name}: {p.type}"
        text += ", required" if p.required else f", default {p.default}"
        if p.bounds:
            text += f", {' and '.join(p.bounds)}"
        if p.policy is not None:
            text += f"; policy: {p.policy}"
        lines.append(text)
    return lines
