"""The CLI's way to the runs outside dev mode: through the HTTP API, as the token's owner.

Outside dev mode only the API can prove who someone is (it authenticates the token and signs), so
the CLI does not talk to Temporal itself there. This client speaks the API and turns its answers
back into the same models and errors ``starters.runs.Runs`` gives, so every command prints the
same way on either path.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlencode
from urllib.request import Request, urlopen

from runtime.client import TemporalUnavailable
from starters.run_views import (
    DecisionRefused,
    InvalidInput,
    NotAllowed,
    RunbookCard,
    RunError,
    RunSummary,
    RunView,
    StartedRun,
    UnknownRun,
)
from workflows.models import Decision, FreezeNotice, PendingApproval, SteerAction


@dataclass(frozen=True)
class _Answer:
    status_code: int
    raw: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.raw)


ERRORS: dict[int, type[RunError]] = {
    401: NotAllowed,
    403: NotAllowed,
    404: UnknownRun,
    409: DecisionRefused,
    422: InvalidInput,
}


class ApiClient:
    """One person's requests to the API: their token, the API's errors as ``RunError``s."""

    def __init__(self, url: str, token: str, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._timeout = timeout

    async def aclose(self) -> None:
        """Nothing to release: every request is its own connection."""

    def _send(
        self,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str],
        params: Mapping[str, str | list[str]],
    ) -> tuple[int, bytes]:
        """One blocking request. The standard library's client, not httpx: each command is a
        new process, and httpx's import alone cost a fifth of a command's time."""
        query = f"?{urlencode(params, doseq=True)}" if params else ""
        request = Request(
            f"{self.url}{quote(path, safe='/:')}{query}",
            data=None if body is None else jsonlib.dumps(body).encode(),
            method=method,
            headers={
                "Authorization": f"Bearer {self._token}",
                "Content-Type": "application/json",
                **headers,
            },
        )
        try:
            with urlopen(request, timeout=self._timeout) as response:
                return int(response.status), bytes(response.read())
        except HTTPError as err:
            return err.code, err.read()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        params: Mapping[str, str | list[str]] | None = None,
    ) -> Any:
        try:
            status, raw = await asyncio.to_thread(
                self._send, method, path, json, headers or {}, params or {}
            )
        except (URLError, OSError) as err:
            raise TemporalUnavailable(
                f"the astra-ops API at {self.url} did not answer ({type(err).__name__}); is it "
                "running, and is ASTRA_OPS_API_URL right?"
            ) from None
        response = _Answer(status, raw)
        if response.status_code < 400:
            return response.json()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"the API answered {response.status_code}"
        if response.status_code == 503:
            raise TemporalUnavailable(message)
        raise ERRORS.get(response.status_code, RunError)(message)


class ApiRuns(ApiClient):
    async def runbooks(self) -> list[RunbookCard]:
        return [RunbookCard.model_validate(c) for c in await self._call("GET", "/v1/runbooks")]

    async def runbook(self, name: str, params: dict[str, str] | None = None) -> RunbookCard:
        query = {"param": [f"{k}={v}" for k, v in (params or {}).items()]}
        answer = await self._call("GET", f"/v1/runbooks/{name}", params=query)
        return RunbookCard.model_validate(answer)

    async def start(
        self,
        runbook: str,
        params: dict[str, Any],
        *,
        requester: str = "",
        reason: str = "",
        dry_run: bool = False,
        idempotency_key: str | None = None,
    ) -> StartedRun:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"params": params, "reason": reason, "dry_run": dry_run}
        answer = await self._call(
            "POST", f"/v1/runbooks/{runbook}/runs", json=body, headers=headers
        )
        return StartedRun.model_validate(answer)

    async def view(self, run_id: str) -> RunView:
        return RunView.model_validate(await self._call("GET", f"/v1/runs/{run_id}"))

    async def list_runs(
        self, *, awaiting_approval: bool = False, limit: int = 50
    ) -> list[RunSummary]:
        answer = await self._call(
            "GET", "/v1/runs", params={"awaiting_approval": str(awaiting_approval).lower()}
        )
        return [RunSummary.model_validate(r) for r in answer][:limit]

    async def approvals(self) -> list[tuple[str, PendingApproval]]:
        answer = await self._call("GET", "/v1/approvals")
        return [(a["run_id"], PendingApproval.model_validate(a["approval"])) for a in answer]

    def _decision(self, decision: Decision) -> dict[str, Any]:
        return {"decision": decision.decision, "step": decision.step, "comment": decision.comment}

    async def decide(self, run_id: str, decision: Decision) -> str:
        answer = await self._call(
            "POST", f"/v1/runs/{run_id}/decisions", json=self._decision(decision)
        )
        return str(answer["message"])

    async def signed_signal(self, run_id: str, decision: Decision) -> dict[str, Any]:
        answer: dict[str, Any] = await self._call(
            "POST", f"/v1/runs/{run_id}/decisions/signal", json=self._decision(decision)
        )
        return answer

    async def cancel(self, run_id: str, user: str = "", reason: str = "") -> str:
        answer = await self._call("POST", f"/v1/runs/{run_id}/cancel", json={"reason": reason})
        return str(answer["message"])

    async def steer(self, run_id: str, user: str, action: SteerAction, reason: str = "") -> str:
        answer = await self._call(
            "POST", f"/v1/runs/{run_id}/steer", json={"action": action.value, "reason": reason}
        )
        return str(answer["message"])

    async def frozen(self) -> FreezeNotice | None:
        answer = await self._call("GET", "/v1/freeze")
        if not answer["frozen"]:
            return None
        return FreezeNotice(actor=answer["by"] or "", reason=answer["reason"])

    async def freeze(self, user: str, reason: str) -> str:
        return str((await self._call("POST", "/v1/freeze", json={"reason": reason}))["message"])

    async def unfreeze(self, user: str, reason: str = "") -> str:
        answer = await self._call("POST", "/v1/unfreeze", json={"reason": reason})
        return str(answer["message"])
