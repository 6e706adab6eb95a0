"""The HTTP API: the same operations as the CLI for people and tools that speak HTTP.

It also serves the codec endpoints the Temporal UI calls to show readable payloads, so history
stays encrypted while the people allowed to read it can.
"""

import asyncio
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from pydantic import BaseModel
from temporalio.api.common.v1 import Payloads

from runtime.access import AccessPolicy, load_policy
from runtime.client import TemporalUnavailable, connect, data_converter
from runtime.settings import Settings
from starters.runs import RunError, Runs, RunSummary, RunView, StartedRun
from workflows.catalogue import RUNBOOKS
from workflows.models import Decision, PendingApproval

RETRY_AFTER_SECONDS = 5
# The Temporal UI's codec endpoint is the API's URL plus this path (it appends /decode, /encode).
CODEC_PATH = "/codec"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


STATUS_OF = {"invalid": 422, "not_found": 404, "forbidden": 403, "conflict": 409}


class StartBody(BaseModel):
    params: dict[str, Any] = {}
    reason: str = ""
    dry_run: bool = False


class DecisionBody(BaseModel):
    decision: Literal["approve", "reject"]
    step: str | None = None
    comment: str = ""


class ApprovalView(BaseModel):
    run_id: str
    approval: PendingApproval


class Message(BaseModel):
    message: str


def create_app(settings: Settings) -> FastAPI:
    policy: AccessPolicy = load_policy(settings.access_policy)
    tokens = settings.token_identities
    codec = data_converter(settings).payload_codec
    assert codec is not None
    connection: dict[str, Runs] = {}
    lock = asyncio.Lock()

    async def runs() -> Runs:
        """Connect on first use, so the API starts (and says it is not ready) without Temporal."""
        async with lock:
            if "runs" not in connection:
                client = await connect(settings)
                connection["runs"] = Runs(client, settings.task_queue, policy)
            return connection["runs"]

    def identity(authorization: Annotated[str | None, Header()] = None) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token>")
        user = tokens.get(token.strip())
        if user is None:
            raise ApiError(401, "unauthenticated", "unknown bearer token")
        if not policy.known(user):
            raise ApiError(403, "forbidden", f"{user} is not in the access policy")
        return user

    def codec_identity(authorization: Annotated[str | None, Header()] = None) -> str:
        # Dev mode serves the UI on loopback without tokens; anywhere else the codec decrypts
        # history for whoever calls it, so it needs the same bearer token as the rest.
        return "dev" if settings.dev_mode else identity(authorization)

    User = Annotated[str, Depends(identity)]

    app = FastAPI(
        title="astra-ops",
        description="Operations runbooks for the Astra agent platform.",
        version="0.1.0",
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=[origin.strip() for origin in settings.ui_origins.split(",")],
        allow_methods=["POST", "OPTIONS"],
        allow_headers=["content-type", "x-namespace", "authorization"],
        allow_credentials=True,
    )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(
            {"error": {"code": err.code, "message": err.message}}, status_code=err.status
        )

    @app.exception_handler(RunError)
    async def _run_error(_: Request, err: RunError) -> JSONResponse:
        return JSONResponse(
            {"error": {"code": err.kind, "message": err.message}},
            status_code=STATUS_OF[err.kind],
        )

    @app.exception_handler(TemporalUnavailable)
    async def _unavailable(_: Request, err: TemporalUnavailable) -> JSONResponse:
        connection.clear()
        return JSONResponse(
            {"error": {"code": "unavailable", "message": str(err)}},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        return JSONResponse({"error": {"code": "invalid", "message": problems}}, status_code=422)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up (it may still be unable to reach Temporal)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> dict[str, str]:
        """Temporal answers; a load balancer should send traffic only when this is 200."""
        client = (await runs()).client
        try:
            await asyncio.wait_for(client.service_client.check_health(), timeout=5)
        except Exception as err:
            raise TemporalUnavailable(f"Temporal health check failed: {err}") from None
        return {"status": "ready"}

    @app.get("/v1/runbooks", tags=["runbooks"])
    async def list_runbooks(_: User) -> list[dict[str, Any]]:
        return [w.spec.describe() for w in RUNBOOKS.values()]

    @app.post("/v1/runbooks/{name}/runs", status_code=201, tags=["runs"])
    async def start_run(
        name: str,
        body: StartBody,
        user: User,
        response: Response,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> StartedRun:
        """Start a run; an open run of the same runbook and subject is returned instead (200)."""
        started = await (await runs()).start(
            name,
            body.params,
            requester=user,
            reason=body.reason,
            dry_run=body.dry_run,
            idempotency_key=idempotency_key,
        )
        if started.existing:
            response.status_code = 200
        return started

    @app.get("/v1/runs", tags=["runs"])
    async def list_runs(_: User, awaiting_approval: bool = False) -> list[RunSummary]:
        return await (await runs()).list_runs(awaiting_approval=awaiting_approval)

    @app.get("/v1/approvals", tags=["approvals"])
    async def approvals(_: User) -> list[ApprovalView]:
        return [
            ApprovalView(run_id=run_id, approval=p)
            for run_id, p in await (await runs()).approvals()
        ]

    @app.post("/v1/runs/{run_id:path}/decisions", tags=["approvals"])
    async def decide(run_id: str, body: DecisionBody, user: User) -> Message:
        said = await (await runs()).decide(
            run_id,
            Decision(approver=user, step=body.step, comment=body.comment, decision=body.decision),
        )
        return Message(message=said)

    @app.post("/v1/runs/{run_id:path}/cancel", status_code=202, tags=["runs"])
    async def cancel(run_id: str, user: User) -> Message:
        await (await runs()).cancel(run_id, user)
        return Message(message=f"cancellation of {run_id} requested")

    @app.get("/v1/runs/{run_id:path}", tags=["runs"])
    async def get_run(run_id: str, _: User) -> RunView:
        return await (await runs()).view(run_id)

    async def transcode(request: Request, decode: bool) -> JSONResponse:
        try:
            payloads = json_format.Parse(await request.body(), Payloads())
        except json_format.ParseError as err:
            raise ApiError(422, "invalid", f'expected {{"payloads": [...]}}: {err}') from None
        coded = await (codec.decode if decode else codec.encode)(list(payloads.payloads))
        return JSONResponse(json_format.MessageToDict(Payloads(payloads=coded)))

    @app.post(f"{CODEC_PATH}/encode", tags=["codec"])
    async def encode(request: Request, _: Annotated[str, Depends(codec_identity)]) -> JSONResponse:
        return await transcode(request, decode=False)

    @app.post(f"{CODEC_PATH}/decode", tags=["codec"])
    async def decode(request: Request, _: Annotated[str, Depends(codec_identity)]) -> JSONResponse:
        return await transcode(request, decode=True)

    return app


def serve(settings: Settings) -> None:
    """Run until SIGTERM; uvicorn finishes in-flight requests before it exits."""
    uvicorn.run(
        create_app(settings), host=settings.api_host, port=settings.api_port, log_level="info"
    )
