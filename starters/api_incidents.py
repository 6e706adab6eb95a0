"""The CLI's way to incidents outside dev mode: through the HTTP API, as the token's owner.

Apart from ``starters.api_client`` so that commands about runs do not load the incident models.
"""

from __future__ import annotations

from starters.api_client import ApiClient
from starters.incident_views import IncidentSummary, IncidentView, OpenedIncident
from workflows.incident_models import ActionKind, ActionRequest, IncidentRequest, Severity


class ApiIncidents(ApiClient):
    """``starters.incidents.Incidents`` through the API."""

    async def open(
        self, request: IncidentRequest, *, opened_by: str = "", idempotency_key: str | None = None
    ) -> OpenedIncident:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        answer = await self._call(
            "POST", "/v1/incidents", json=request.model_dump(mode="json"), headers=headers
        )
        return OpenedIncident.model_validate(answer)

    async def list_incidents(
        self, *, open_only: bool = False, severity: Severity | None = None, limit: int = 50
    ) -> list[IncidentSummary]:
        params = {"open": str(open_only).lower()}
        if severity is not None:
            params["severity"] = severity.value
        answer = await self._call("GET", "/v1/incidents", params=params)
        return [IncidentSummary.model_validate(i) for i in answer][:limit]

    async def show(self, incident_id: str) -> IncidentView:
        return IncidentView.model_validate(await self._call("GET", f"/v1/incidents/{incident_id}"))

    async def act(
        self, incident_id: str, kind: ActionKind, request: ActionRequest, *, actor: str = ""
    ) -> str:
        """The API acts as the token's owner: ``actor`` is not sent."""
        answer = await self._call(
            "POST",
            f"/v1/incidents/{incident_id}/actions/{kind.value}",
            json=request.model_dump(mode="json"),
        )
        return str(answer["message"])
