"""What the front ends show of incidents. Apart from ``starters.incidents`` (which talks to
Temporal), so the CLI can show the API's answers without loading the Temporal client."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from workflows.incident_models import INCIDENT_PREFIX, IncidentState


def incident_id(given: str) -> str:
    """The workflow id of an incident, given as people copy it: with or without ``incident/``."""
    return given if given.startswith(INCIDENT_PREFIX) else INCIDENT_PREFIX + given


class OpenedIncident(BaseModel):
    incident_id: str
    existing: bool
    """An earlier request with the same Idempotency-Key opened it."""


class AlertsDelivered(BaseModel):
    """What the alert intake did with a notification."""

    incident_id: str
    status: Literal["firing", "resolved"]
    delivered: bool
    """False for a ``resolved`` notification of a group whose incident is not open."""
    message: str


class IncidentSummary(BaseModel):
    incident_id: str
    title: str
    severity: str | None
    stage: str | None
    state: str
    """running, completed, ... (the workflow's)"""
    opened_by: str
    opened_at: datetime | None
    closed_at: datetime | None = None


class IncidentView(IncidentSummary):
    incident: IncidentState | None = None
    """What the incident says of itself; None while no worker answers."""
    unanswered: str | None = None
    """Why ``incident`` is missing."""
