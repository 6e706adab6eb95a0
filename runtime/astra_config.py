"""The keys astra-ops reads and sets in Astra's ``astra-config`` ConfigMap, and their format.

Runbooks write these keys (through the kubernetes activities) and Astra, or the sandbox's load
generator, obeys them; keeping the names and the value encoding here means both sides agree.
The containment knobs take effect at once; the endpoints only in pods that start after the
change, as environment variables from a ConfigMap do, which is why a repoint is a config change
followed by a rolling restart. Pure functions only: workflow code imports this module.
"""

from __future__ import annotations

from pydantic import BaseModel

INTAKE_PAUSED_KEY = "ASTRA_INTAKE_PAUSED_ERROR_CLASSES"
"""Comma-separated error classes ("TimeoutError") whose work Astra holds back instead of running."""

BUDGET_GUARD_KEY = "ASTRA_LLM_BUDGET_GUARD"
"""JSON of ``BudgetGuard``; empty or absent means no guard."""

DATABASE_URL_KEY = "DATABASE_URL"
"""The PostgreSQL DSN Astra's services connect to (its primary, or a pooler in front of it)."""

REDIS_URL_KEY = "REDIS_URL"
"""The Redis URL Astra's services connect to (its primary)."""


class AstraEndpoints(BaseModel):
    """Where Astra's services find their database and Redis: the endpoints in ``astra-config``."""

    database_url: str
    redis_url: str

    def config_data(self) -> dict[str, str]:
        """The ConfigMap keys that name these endpoints."""
        return {DATABASE_URL_KEY: self.database_url, REDIS_URL_KEY: self.redis_url}


def paused_classes(value: str | None) -> list[str]:
    """The error classes an ``INTAKE_PAUSED_KEY`` value names, sorted and without blanks."""
    return sorted({c.strip() for c in (value or "").split(",") if c.strip()})


def with_paused(value: str | None, error_class: str) -> str:
    """The ``INTAKE_PAUSED_KEY`` value with one more class paused (unchanged if already paused)."""
    return ",".join(sorted({*paused_classes(value), error_class}))


class BudgetGuard(BaseModel):
    """Agents whose LLM spend is held to its normal rate, by routing or by capping."""

    agents: list[str] = []
    route_to: str | None = None
    """A cheaper model the guarded agents' calls go to; None caps them at their normal spend."""

    @classmethod
    def parse(cls, value: str | None) -> BudgetGuard:
        return cls.model_validate_json(value) if value and value.strip() else cls()

    def covers(self, agent_id: str) -> bool:
        return agent_id in self.agents

    def merged(self, agents: list[str], route_to: str | None) -> BudgetGuard:
        """This guard extended to ``agents``; the newest routing choice wins."""
        return BudgetGuard(agents=sorted({*self.agents, *agents}), route_to=route_to)

    def value(self) -> str:
        """The ConfigMap value: canonical JSON, so an unchanged guard is an unchanged key."""
        return self.model_dump_json() if self.agents else ""
