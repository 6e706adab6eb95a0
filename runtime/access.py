"""The one access policy: who exists, which on-call group each person is in, and per runbook who
may start, approve and cancel it, which thresholds a request may set, and how much it may do alone.

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


class AccessPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    groups: dict[str, Group] = {}
    users: list[str] = []
    """People who belong to no group: they may watch, and start what ``anyone`` may."""
    operators: list[str] = []
    """Groups whose members may freeze and unfreeze every mutating step (the kill switch)."""
    runbooks: dict[str, RunbookAccess] = {}

    @model_validator(mode="after")
    def _groups_exist(self) -> Self:
        named = set(self.operators)
        for access in self.runbooks.values():
            named |= access.groups()
        unknown = sorted(named - set(self.groups) - {ANYONE})
        if unknown:
            raise ValueError(f"unknown groups {unknown}; define them under `groups`")
        return self

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

    def is_operator(self, user: str) -> bool:
        return user in self.operator_members()


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
