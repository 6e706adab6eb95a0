"""The one access policy: who exists, which on-call group each person is in, and per runbook who
may start, approve and cancel it, which thresholds a request may set, and how much it may do alone;
and for incidents, which rotation owns which components, who is paged in what order, who may act,
and who else is told (the operations wiki's rotations, escalation matrix and stakeholders).

``deploy/access-policy.yaml`` is the only place these rules are written. The API and the CLI read
it to refuse early with a clear message; runs read it through an activity (so what they were told
is in history) and enforce it again, because a run can be started or signalled without the API.
A request may make a run stricter than the policy's defaults, never looser.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runtime.errors import ConfigError

ANYONE = "anyone"
"""A pseudo-group: every person the policy knows."""


class AccessPolicyError(ConfigError):
    """The policy file is missing or malformed, or lacks an entry a runbook needs."""


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = ""
    scope: str = ""
    members: list[str] = []


class ApprovalPolicy(BaseModel):
    """Who may approve a step, how many distinct people must, and what happens on silence."""

    model_config = ConfigDict(extra="forbid")

    groups: list[str] = Field(min_length=1)
    required: int = Field(default=1, ge=1, le=10)
    on_timeout: Literal["abort", "escalate"] = "abort"
    escalate_to: list[str] = []


class Limit(BaseModel):
    """A threshold a request may tighten within bounds; the default is the policy's.

    A numeric limit allows ``[min, max]``, where a bound left out is the default itself: a policy
    that writes only ``min`` lets a request go lower (stricter) but never higher. A list limit
    allows any non-empty subset of ``allowed`` (the default list when left out).
    """

    model_config = ConfigDict(extra="forbid")

    default: float | list[str]
    min: float | None = None
    max: float | None = None
    allowed: list[str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if isinstance(self.default, list):
            if self.min is not None or self.max is not None:
                raise ValueError("a list limit takes `allowed`, not min/max")
            if not set(self.default) <= set(self.choices()):
                raise ValueError("the default must be a subset of `allowed`")
        else:
            if self.allowed is not None:
                raise ValueError("a numeric limit takes min/max, not `allowed`")
            low, high = self.bounds()
            if not (math.isfinite(low) and math.isfinite(high) and low <= self.default <= high):
                raise ValueError("needs finite min <= default <= max")
        return self

    def bounds(self) -> tuple[float, float]:
        assert not isinstance(self.default, list)
        low = self.default if self.min is None else self.min
        high = self.default if self.max is None else self.max
        return low, high

    def choices(self) -> list[str]:
        assert isinstance(self.default, list)
        return self.allowed if self.allowed is not None else self.default

    def violation(self, name: str, value: Any) -> str | None:
        """Why ``value`` is outside this limit, in one line naming the parameter and the bound."""
        if isinstance(self.default, list):
            extra = sorted(set(value or []) - set(self.choices()))
            if not value or extra:
                return (
                    f"{name}: {', '.join(extra) or 'an empty list'} is not allowed by the access "
                    f"policy (choose from {', '.join(self.choices())})"
                )
            return None
        low, high = self.bounds()
        if not isinstance(value, int | float) or not low <= value <= high:
            return (
                f"{name}={value} is outside the access policy's bounds [{low:g}, {high:g}] "
                f"(default {self.default:g}; a request may only make a run stricter)"
            )
        return None


class AutomaticLimit(BaseModel):
    """How often a runbook may take a step on its own before a person must approve it."""

    model_config = ConfigDict(extra="forbid")

    max: int = Field(ge=0, le=10_000)
    per_seconds: float = Field(gt=0, le=30 * 86_400)


class RunbookAccess(BaseModel):
    """One runbook's rules. Groups may be ``anyone``."""

    model_config = ConfigDict(extra="forbid")

    start: list[str] = Field(min_length=1)
    on_alert: Literal["start", "propose"] = "propose"
    """What an incident does when one of its alerts names this runbook: start it on its own
    (with the incident as requester; its approvals still apply), or propose it on the timeline
    for a person to start."""
    on_schedule: Literal["start", "refuse"] = "refuse"
    """Whether a scheduled scan (``tls-scan``, a Temporal Schedule's workflow) may start it on
    its own, with the scan as requester; its approvals still apply."""
    open_incidents: Literal["block", "ask"] = "block"
    """What an upgrade does while a SEV1 or SEV2 incident is open on the rotation that owns its
    service: refuse to go on, or ask its approvers (step ``approve upgrading during an open
    incident``)."""
    dry_run: list[str] = []
    """Who may start dry runs besides those who may start real ones."""
    cancel: list[str] = []
    """Who may cancel a run besides the person who started it."""
    approvals: dict[str, ApprovalPolicy] = {}
    limits: dict[str, Limit] = {}
    automatic: dict[str, AutomaticLimit] = {}

    def groups(self) -> set[str]:
        named = set(self.start) | set(self.dry_run) | set(self.cancel)
        for rule in self.approvals.values():
            named |= set(rule.groups) | set(rule.escalate_to)
        return named

    def approval(self, runbook: str, step: str) -> ApprovalPolicy:
        try:
            return self.approvals[step]
        except KeyError:
            raise AccessPolicyError(
                f"the access policy names no approvers for step '{step}' of {runbook}; "
                "add it under runbooks.{runbook}.approvals"
            ) from None

    def violations(self, values: dict[str, Any]) -> list[str]:
        return [
            why
            for name, limit in self.limits.items()
            if (why := limit.violation(name, values.get(name))) is not None
        ]

    def defaults(self) -> dict[str, Any]:
        return {name: limit.default for name, limit in self.limits.items()}

    def may_start(
        self, runbook: str, user: str, dry_run: bool, members: Callable[[list[str]], list[str]]
    ) -> str | None:
        """Why ``user`` may not start this runbook, or None."""
        groups = self.start + (self.dry_run if dry_run else [])
        if user in members(groups):
            return None
        kind = "dry runs of " if dry_run else ""
        return (
            f"{user} may not start {kind}{runbook}; the access policy allows "
            f"{', '.join(groups)}" + ("" if dry_run else " (a --dry-run may be allowed)")
        )

    def may_cancel(
        self, runbook: str, user: str, requester: str, members: Callable[[list[str]], list[str]]
    ) -> str | None:
        """Why ``user`` may not cancel a run of this runbook started by ``requester``, or None."""
        if user == requester or user in members(self.cancel):
            return None
        return (
            f"{user} may not cancel this {runbook} run; the requester ({requester}) and "
            f"{', '.join(self.cancel) or 'nobody else'} may"
        )


WEEK_SECONDS = 7 * 86_400


class Escalation(BaseModel):
    """Who is paged, in order, while nobody acknowledges (the wiki's escalation matrix)."""

    model_config = ConfigDict(extra="forbid")

    primary: str
    secondary: str
    manager: str

    def levels(self) -> list[tuple[str, str]]:
        """(target, person), in the order they are paged."""
        return [("primary", self.primary), ("secondary", self.secondary), ("manager", self.manager)]


class Rotation(BaseModel):
    """An on-call rotation: the components it owns and how it is paged."""

    model_config = ConfigDict(extra="forbid")

    components: list[str] = Field(min_length=1)
    """Astra components in lower case with hyphens (``state-manager``, ``llm-routing``)."""
    deployments: list[str] = []
    """The Deployments that run those components: a release names a Deployment."""
    escalation: Escalation
    ack_timeout_seconds: float = Field(default=300, gt=0, le=WEEK_SECONDS)
    """Without an acknowledgement this long after a page, the next level is paged."""


class IncidentPolicy(BaseModel):
    """Who opens and works incidents, who is paged and told, and when."""

    model_config = ConfigDict(extra="forbid")

    open: list[str] = Field(min_length=1)
    """Groups who may open an incident by hand (may be ``anyone``)."""
    alert_sender: str = Field(default="alertmanager", min_length=1)
    """The identity the alert intake opens incidents and sends alerts as."""
    respond: list[str] = []
    """Groups who may act on every incident; the incident's own rotation, its escalation chain
    and the operators always may."""
    rotations: dict[str, Rotation] = Field(min_length=1)
    """By access-policy group: the group is the rotation."""
    default_rotation: str
    """Owns incidents whose components and alerts name no rotation."""
    commander_request_interval_seconds: float = Field(default=600, gt=0, le=WEEK_SECONDS)
    """SEV1/SEV2: how often the rotation is asked again until someone takes command."""
    sustained_sev1_seconds: float = Field(default=3_600, gt=0, le=WEEK_SECONDS)
    """A SEV1 this long is "sustained": the product owner is told (wiki: stakeholders)."""
    product_owner: str | None = None
    security: list[str] = []
    """Told when an incident is tagged ``auth`` or ``data-exposure``."""
    item_reminder_seconds: float = Field(default=86_400, gt=0, le=30 * 86_400)
    """An open action item's owner is reminded this long before it is due."""
    continue_as_new_after_events: int = Field(default=10_000, ge=50, le=50_000)
    """An incident's run carries its state into a fresh one past this many history events."""

    @model_validator(mode="after")
    def _rotations_consistent(self) -> Self:
        if self.default_rotation not in self.rotations:
            raise ValueError(
                f"default_rotation {self.default_rotation!r} is not one of the rotations "
                f"({', '.join(self.rotations)})"
            )
        owner: dict[str, str] = {}
        for name, rotation in self.rotations.items():
            for component in rotation.components:
                if component != component.lower() or " " in component:
                    raise ValueError(
                        f"rotations.{name}: component {component!r} must be lower case with "
                        "hyphens (as incidents and alerts name it)"
                    )
                if component in owner:
                    raise ValueError(
                        f"component {component!r} is in both rotations {owner[component]} and "
                        f"{name}; give each component one owner"
                    )
                owner[component] = name
        return self

    def rotation_of_deployment(self, deployment: str) -> str:
        """The rotation whose components the Deployment runs; else the default."""
        for name, rotation in self.rotations.items():
            if deployment in rotation.deployments:
                return name
        return self.default_rotation

    def rotation_for(self, components: list[str], hint: str | None = None) -> str:
        """The rotation owning the first component it knows; else ``hint`` (an alert's
        ``rotation`` label) when it is a rotation; else the default."""
        for component in components:
            key = component.strip().lower().replace(" ", "-")
            for name, rotation in self.rotations.items():
                if key in rotation.components:
                    return name
        if hint is not None and hint in self.rotations:
            return hint
        return self.default_rotation


class AccessPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    groups: dict[str, Group] = {}
    users: list[str] = []
    """People who belong to no group: they may watch, and start what ``anyone`` may."""
    operators: list[str] = []
    """Groups whose members may freeze and unfreeze every mutating step (the kill switch)."""
    runbooks: dict[str, RunbookAccess] = {}
    incidents: IncidentPolicy | None = None
    """None: no incident may open (the intake and ``incident open`` say so)."""

    @model_validator(mode="after")
    def _groups_exist(self) -> Self:
        named = set(self.operators)
        for access in self.runbooks.values():
            named |= access.groups()
        if self.incidents is not None:
            named |= {*self.incidents.open, *self.incidents.respond, *self.incidents.rotations}
        unknown = sorted(named - set(self.groups) - {ANYONE})
        if unknown:
            raise ValueError(f"unknown groups {unknown}; define them under `groups`")
        if self.incidents is not None:
            self._incident_people_known(self.incidents)
        return self

    def _incident_people_known(self, incidents: IncidentPolicy) -> None:
        for name, rotation in incidents.rotations.items():
            members = self.members([name])
            for target, person in rotation.escalation.levels():
                if target != "manager" and person not in members:
                    raise ValueError(
                        f"incidents.rotations.{name}.escalation.{target}: {person} is not a "
                        f"member of {name}; add them to groups.{name}.members"
                    )
                if not self.known(person):
                    raise ValueError(
                        f"incidents.rotations.{name}.escalation.{target}: {person} is not in "
                        "the access policy; add them to a group"
                    )
        for field, people in (
            ("product_owner", [incidents.product_owner] if incidents.product_owner else []),
            ("security", incidents.security),
        ):
            unknown = [p for p in people if not self.known(p)]
            if unknown:
                raise ValueError(
                    f"incidents.{field}: {', '.join(unknown)} not in the access policy; add them "
                    "to `users` or a group"
                )

    def known(self, user: str) -> bool:
        return user in self.everyone()

    def everyone(self) -> list[str]:
        return sorted({*self.users, *(m for g in self.groups.values() for m in g.members)})

    def groups_of(self, user: str) -> list[str]:
        return sorted(name for name, g in self.groups.items() if user in g.members)

    def members(self, groups: list[str]) -> list[str]:
        if ANYONE in groups:
            return self.everyone()
        return sorted({m for name in groups for m in self.groups.get(name, Group()).members})

    def runbook(self, name: str) -> RunbookAccess:
        try:
            return self.runbooks[name]
        except KeyError:
            raise AccessPolicyError(
                f"the access policy has no entry for runbook {name}; nobody may start it until "
                f"runbooks.{name} says who may"
            ) from None

    def operator_members(self) -> list[str]:
        return self.members(self.operators)

    def incident_policy(self) -> IncidentPolicy:
        if self.incidents is None:
            raise AccessPolicyError(
                "the access policy has no `incidents` section: nobody may open an incident until "
                "it names the rotations, their escalation and who may open and act"
            )
        return self.incidents

    def incident_responders(self, rotation: str) -> list[str]:
        """Who may act on an incident of ``rotation``: its group, its escalation chain, the
        operators and the groups the policy lets respond to every incident."""
        incidents = self.incident_policy()
        chain = [person for _, person in incidents.rotations[rotation].escalation.levels()]
        groups = [rotation, *incidents.respond, *self.operators]
        return sorted({*self.members(groups), *chain})

    def is_operator(self, user: str) -> bool:
        return user in self.operator_members()


class PolicyFile:
    """The access policy as its file says now, parsed again only when the file changed: the
    activities read it on every admission and notice, so an edit applies to the next run
    without a restart, and parsing was half of an admission's time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._read: tuple[tuple[int, int], AccessPolicy] | None = None

    def read(self) -> AccessPolicy:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return load_policy(self.path)  # says the file does not exist, and what to set
        version = (stat.st_mtime_ns, stat.st_size)
        if self._read is None or self._read[0] != version:
            self._read = (version, load_policy(self.path))
        return self._read[1]


def load_policy(path: Path) -> AccessPolicy:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise AccessPolicyError(
            f"access policy {path} does not exist; set ASTRA_OPS_ACCESS_POLICY"
        ) from None
    except yaml.YAMLError as err:
        raise AccessPolicyError(f"access policy {path} is not valid YAML: {err}") from None
    try:
        return AccessPolicy.model_validate(raw or {})
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'top level'}: {e['msg']}" for e in err.errors()
        )
        raise AccessPolicyError(f"access policy {path} is malformed: {problems}") from None
