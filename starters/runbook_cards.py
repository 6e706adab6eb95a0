"""A runbook as people read it before they start it: steps, approvals, and parameters with
their type, default, bounds and what the policy allows.

Read from the catalogue, the request model's JSON schema and the access policy, so the CLI's
`runbooks`, the API's `/v1/runbooks` and the generated `docs/runbooks/` say the same thing in the
same words.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from runtime.access import ANYONE, AccessPolicy, RunbookAccess
from starters.run_views import InvalidInput, Parameter, RunbookCard, UnknownRunbook
from workflows.catalogue import RUNBOOKS
from workflows.models import RunbookRequest
from workflows.runbook import RunbookSpec

CALLER_FIELDS = {"requester", "reason", "dry_run", "authorization"}
"""Fields every start has, set by the command itself (`--reason`, `--dry-run`, who you are)."""

_BOUNDS = (
    ("exclusiveMinimum", ">"),
    ("minimum", ">="),
    ("exclusiveMaximum", "<"),
    ("maximum", "<="),
)


def _number(value: float) -> str:
    """``2592000``, not ``2.592e+06``; ``0.05``, not ``0.05000000000000000277``."""
    return f"{value:.15g}"


def _built_default(spec: RunbookSpec[Any], name: str) -> Any:
    """A default made by a factory (a list of steps), as JSON, leaving out what each item
    leaves at its own default; None when the parameter has none."""
    field = spec.request.model_fields[name]
    if field.default_factory is None:
        return None
    value = field.get_default(call_default_factory=True)
    return TypeAdapter(field.annotation).dump_python(value, mode="json", exclude_defaults=True)


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
                default=prop["default"] if "default" in prop else _built_default(spec, name),
                bounds=[f"{sign} {_number(prop[key])}" for key, sign in _BOUNDS if key in prop],
                policy=policy,
                description=prop.get("description", ""),
            )
        )
    return found


def approval_lines(access: RunbookAccess | None) -> list[str]:
    if access is None:
        return ["(not in the access policy: nobody may start it)"]
    return [
        f"{step}: {rule.required} of {', '.join(rule.groups)}, on silence {rule.on_timeout}"
        + (f" to {', '.join(rule.escalate_to)}" if rule.escalate_to else "")
        for step, rule in access.approvals.items()
    ]


def dry_runners(access: RunbookAccess | None) -> list[str]:
    groups = list(dict.fromkeys((access.start + access.dry_run) if access else []))
    return [ANYONE] if ANYONE in groups else groups


def runbook_request(
    spec: RunbookSpec[Any],
    access: RunbookAccess | None,
    params: dict[str, Any],
    *,
    requester: str,
    reason: str = "",
    dry_run: bool = False,
) -> RunbookRequest:
    """The request a start with these ``--param``s makes: the policy's defaults under them, the
    model's validation and the policy's bounds over them."""
    reserved = CALLER_FIELDS & params.keys()
    if reserved:
        raise InvalidInput(f"{', '.join(sorted(reserved))} cannot be passed as parameters")
    retired = spec.request.retired & params.keys()
    if retired:
        raise InvalidInput(
            f"{', '.join(sorted(retired))}: no longer a parameter of {spec.name}; leave it out "
            f"(`astra-ops runbooks {spec.name}` lists its parameters)"
        )
    try:
        request: RunbookRequest = spec.request.model_validate(
            {
                **(access.defaults() if access else {}),
                **params,
                "requester": requester,
                "reason": reason,
                "dry_run": dry_run,
            }
        )
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in err.errors()
        )
        raise InvalidInput(f"bad parameters for {spec.name}: {problems}") from None
    violations = access.violations(request.model_dump()) if access else []
    if violations:
        raise InvalidInput(f"bad parameters for {spec.name}: {'; '.join(violations)}")
    return request


def runbook_card(
    spec: RunbookSpec[Any], access: RunbookAccess | None, request: RunbookRequest | None = None
) -> RunbookCard:
    """Everything people ask of a runbook before they start it, from the catalogue and policy;
    its steps are those of ``request`` (default: every parameter at its default)."""
    return RunbookCard(
        name=spec.name,
        title=spec.title,
        trigger=spec.trigger,
        rotation=spec.rotation,
        severity=spec.severity,
        steps=spec.steps_for(request),
        started_by=list(access.start) if access else [],
        dry_runs_by=dry_runners(access),
        cancelled_by=list(access.cancel) if access else [],
        approvals=approval_lines(access),
        parameters=runbook_parameters(spec, access),
    )


def runbook_spec(name: str) -> RunbookSpec[Any]:
    try:
        return RUNBOOKS[name].spec
    except KeyError:
        raise UnknownRunbook(
            f"no runbook named {name!r}; known: {', '.join(sorted(RUNBOOKS))}"
        ) from None


def runbook_cards(
    policy: AccessPolicy, name: str | None = None, params: dict[str, Any] | None = None
) -> list[RunbookCard]:
    """Every runbook's card, or the one named; with ``params``, the steps a start with them
    would take."""
    if name is None:
        return [runbook_card(w.spec, policy.runbooks.get(w.spec.name)) for w in RUNBOOKS.values()]
    spec, access = runbook_spec(name), policy.runbooks.get(name)
    request = runbook_request(spec, access, params, requester="you") if params else None
    return [runbook_card(spec, access, request)]
