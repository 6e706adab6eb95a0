"""The HTTP API: the same operations as the CLI for people and tools that speak HTTP.

It also serves the codec endpoints the Temporal UI calls to show readable payloads, so history
stays encrypted while the people allowed to read it can.
"""

import asyncio
import base64
import binascii
import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import uvicorn
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from temporalio.api.common.v1 import Payloads

from runtime.access import AccessPolicy, load_policy
from runtime.client import TemporalUnavailable, connect, data_converter
from runtime.codec import UndecryptablePayload
from runtime.identity import Signer, load_signer_file
from runtime.keys import CodecKeyError
from runtime.logs import configure_logging
from runtime.redact import redact, redact_logs
from runtime.settings import AlertSenders, Settings, SettingsError
from runtime.telemetry import process_telemetry
from starters.alert_repeats import RecentAlerts
from starters.body_limit import BodyLimit, too_large_message
from starters.incident_views import AlertsDelivered, IncidentSummary, IncidentView, OpenedIncident
from starters.incidents import Incidents
from starters.run_views import (
    OpenRunConflict,
    RunbookCard,
    RunError,
    RunSummary,
    RunView,
    StartedRun,
)
from starters.runbook_cards import runbook_cards
from starters.runs import TEMPORAL_ERRORS, Runs, temporal_error
from starters.system_gauges import serving_gauges
from workflows.incident_models import (
    ActionKind,
    ActionRequest,
    AlertNotification,
    IncidentRequest,
    Severity,
    incident_id_for_group,
)
from workflows.models import (
    MAX_COMMENT,
    MAX_STEP,
    ApprovalSignal,
    Decision,
    PendingApproval,
    SteerAction,
)

RETRY_AFTER_SECONDS = 5
# The Temporal UI's codec endpoint is the API's URL plus this path (it appends /decode, /encode).
CODEC_PATH = "/codec"
# Where Alertmanager posts (deploy/alertmanager/alertmanager.yml's webhook URL).
ALERTS_PATH = "/v1/alerts/alertmanager"

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


STATUS_OF = {"invalid": 422, "not_found": 404, "forbidden": 403, "conflict": 409}


class ErrorDetail(BaseModel):
    code: str
    message: str
    run: dict[str, Any] | None = None
    """On a conflict with an open run: its id, requester and parameters."""


class ErrorBody(BaseModel):
    """Every refusal and failure: a code to branch on and one line that says why."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 422, 500, 503)
}


class PayloadJson(BaseModel):
    """A Temporal payload as the UI sends it: base64 metadata values and data."""

    metadata: dict[str, str] = {}
    data: str = ""


class PayloadsJson(BaseModel):
    payloads: list[PayloadJson]


# The codec endpoints parse the body with protobuf's JSON rules, not FastAPI's, so they document
# it by hand: the UI (and Schemathesis) see what to send.
CODEC_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PayloadsJson.model_json_schema()}},
    }
}


def error_response(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    run: dict[str, Any] | None = None,
) -> JSONResponse:
    return JSONResponse(
        ErrorBody(error=ErrorDetail(code=code, message=message, run=run)).model_dump(
            exclude_none=True
        ),
        status_code=status,
        headers=headers,
    )


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine."""
    if not host:
        return False
    host = host.strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StartBody(BaseModel):
    params: dict[str, Any] = {}
    reason: str = Field(default="", max_length=2000)
    dry_run: bool = False


class DecisionBody(BaseModel):
    decision: Literal["approve", "reject"]
    step: str | None = Field(default=None, max_length=MAX_STEP)
    comment: str = Field(default="", max_length=MAX_COMMENT)


class ReasonBody(BaseModel):
    reason: str = Field(default="", max_length=MAX_COMMENT)


class SteerBody(BaseModel):
    action: SteerAction
    reason: str = Field(default="", max_length=MAX_COMMENT)


class SignalView(BaseModel):
    """A signed decision for the stock CLI: `temporal workflow signal --name <signal> --input`."""

    workflow_id: str
    signal: Literal["approve", "reject"]
    input: ApprovalSignal


class FreezeView(BaseModel):
    frozen: bool
    by: str | None = None
    reason: str = ""


class ApprovalView(BaseModel):
    run_id: str
    approval: PendingApproval


class Message(BaseModel):
    message: str


ALERT_CHALLENGE = {
    "WWW-Authenticate": 'Bearer realm="astra-ops alerts", Basic realm="astra-ops alerts"'
}


def alert_sender(senders: AlertSenders, authorization: str | None) -> str:
    """Who posts an alert, by what Alertmanager's ``http_config`` sends: a bearer token, or
    basic auth. Every comparison takes the same time, whatever matched."""
    if not senders:
        raise ApiError(
            401,
            "unauthenticated",
            "this API takes no alerts: set ASTRA_OPS_ALERTMANAGER_TOKENS or "
            "ASTRA_OPS_ALERTMANAGER_BASIC_AUTH, and the same credentials in Alertmanager's "
            "http_config",
            ALERT_CHALLENGE,
        )
    scheme, _, credentials = (authorization or "").partition(" ")
    given = credentials.strip().encode()
    sender = None
    if scheme.lower() == "bearer":
        for token, name in senders.tokens.items():
            if hmac.compare_digest(token.encode(), given):
                sender = name
    elif scheme.lower() == "basic":
        try:
            name, _, password = base64.b64decode(given, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            name, password = "", ""
        expected = senders.passwords.get(name)
        # Compared even for an unknown name, so the time taken does not tell names apart.
        matches = hmac.compare_digest((expected or "\0").encode(), password.encode())
        if matches and expected is not None:
            sender = name
    else:
        raise ApiError(
            401,
            "unauthenticated",
            "send Authorization: Bearer <token> or Basic <credentials>, as Alertmanager's "
            "http_config sets them",
            ALERT_CHALLENGE,
        )
    if sender is None:
        raise ApiError(401, "unauthenticated", "unknown alert sender credentials", ALERT_CHALLENGE)
    return sender


def signer_of(settings: Settings) -> Signer | None:
    """The API's signing key; outside dev mode it must have one, or nobody could prove anything."""
    if settings.signing_key_file is not None:
        return load_signer_file(settings.signing_key_file)
    if settings.dev_mode:
        return None
    raise SettingsError(
        "outside dev mode the API signs what people do: set ASTRA_OPS_SIGNING_KEY_FILE "
        "(`astra-ops keygen --signing` prints a key pair)"
    )


def create_app(settings: Settings) -> FastAPI:
    policy: AccessPolicy = load_policy(settings.access_policy)
    signer = signer_of(settings)
    tokens = settings.token_identities
    senders = settings.alert_senders
    codec = data_converter(settings).payload_codec
    assert codec is not None
    telemetry = process_telemetry(settings.api_metrics_address, service="astra-ops-api")
    connection: dict[str, Runs] = {}
    lock = asyncio.Lock()
    recent_alerts = RecentAlerts()

    async def runs() -> Runs:
        """Connect on first use, so the API starts (and says it is not ready) without Temporal."""
        async with lock:
            if "runs" not in connection:
                client = await connect(settings, telemetry=telemetry)
                connection["runs"] = Runs(client, settings.task_queue, policy, signer)
            return connection["runs"]

    async def incidents() -> Incidents:
        return Incidents(await runs())

    # Dependencies that do no I/O are coroutines: FastAPI runs a plain function in a thread,
    # a hop per request that an alert storm pays thousands of times.
    async def identity(authorization: Annotated[str | None, Header()] = None) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token>")
        user = tokens.get(token.strip())
        if user is None:
            raise ApiError(401, "unauthenticated", "unknown bearer token")
        if not policy.known(user):
            raise ApiError(403, "forbidden", f"{user} is not in the access policy")
        return user

    async def codec_identity(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> str:
        """The codec decrypts history for whoever calls it. Outside dev mode that takes the same
        bearer token as the rest; dev mode has no tokens, so it answers this machine only: a
        loopback client, and (from a browser) a page served from loopback, so that no other
        site open in the same browser can have history decrypted."""
        if not settings.dev_mode:
            return await identity(authorization)
        client = request.client.host if request.client else None
        if not is_loopback(client):
            raise ApiError(
                403,
                "forbidden",
                f"in dev mode the codec answers this machine only, not {client}; "
                "run the API with ASTRA_OPS_API_TOKENS outside dev mode to serve others",
            )
        origin = request.headers.get("origin")
        if origin is not None and not is_loopback(urlsplit(origin).hostname):
            raise ApiError(
                403,
                "forbidden",
                f"in dev mode the codec answers pages served from this machine only, not "
                f"{origin}; open the Temporal UI on localhost",
            )
        return "dev"

    User = Annotated[str, Depends(identity)]

    async def sender(authorization: Annotated[str | None, Header()] = None) -> str:
        return alert_sender(senders, authorization)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        """Serve the system gauges while the API runs; send buffered spans when it stops."""
        try:
            async with serving_gauges(telemetry, runs, settings.metrics_refresh_seconds):
                yield
        finally:
            telemetry.close()

    redact_logs()  # errors it logs may quote Temporal's or a client's URLs
    app = FastAPI(
        title="astra-ops",
        description="Operations runbooks for the Astra agent platform.",
        version="0.1.0",
        responses=ERROR_RESPONSES,
        lifespan=lifespan,
    )
    # Added before CORS, which then wraps it: the UI's codec calls see a 413 as a 413.
    limit = settings.api_max_body_bytes
    app.add_middleware(
        BodyLimit, limit=limit, answer=error_response(413, "too_large", too_large_message(limit))
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
        return error_response(err.status, err.code, err.message, headers=err.headers)

    def _said(err: RunError | TemporalUnavailable) -> JSONResponse:
        if isinstance(err, RunError):
            run = err.details if isinstance(err, OpenRunConflict) else None
            return error_response(STATUS_OF[err.kind], err.kind, err.message, run=run)
        connection.clear()
        return error_response(
            503, "unavailable", str(err), headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
        )

    @app.exception_handler(RunError)
    async def _run_error(_: Request, err: RunError) -> JSONResponse:
        return _said(err)

    @app.exception_handler(TemporalUnavailable)
    async def _unavailable(_: Request, err: TemporalUnavailable) -> JSONResponse:
        return _said(err)

    async def _temporal(request: Request, err: Exception) -> JSONResponse:
        """A Temporal error a handler did not map itself: mapped here the same way."""
        said = temporal_error(err, request.path_params.get("run_id"))
        if isinstance(said, RunError | TemporalUnavailable):
            return _said(said)
        return await _unexpected(request, err)

    for kind in TEMPORAL_ERRORS:
        app.add_exception_handler(kind, _temporal)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        return error_response(422, "invalid", problems)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            err.status_code, "invalid"
        )
        return error_response(err.status_code, code, str(err.detail), headers=err.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        # A bug: the detail goes to the log (redacted), the caller gets no internals.
        log.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return error_response(
            500, "internal", f"astra-ops could not answer ({type(err).__name__}); see its log"
        )

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
    async def list_runbooks(_: User) -> list[RunbookCard]:
        """Every runbook: trigger, owner, steps, who may start and approve, parameters."""
        return runbook_cards(policy)

    @app.get("/v1/runbooks/{name}", tags=["runbooks"])
    async def show_runbook(
        name: str,
        _: User,
        param: Annotated[
            list[str],
            Query(description="k=v, repeatable: the card shows the steps of a start with these."),
        ] = [],  # noqa: B006
    ) -> RunbookCard:
        pairs = [p.partition("=") for p in param]
        if any(not key or not sep for key, sep, _ in pairs):
            raise ApiError(422, "invalid", "param takes key=value")
        return runbook_cards(policy, name, {key: value for key, _, value in pairs})[0]

    @app.post(
        "/v1/runbooks/{name}/runs",
        status_code=201,
        tags=["runs"],
        responses={200: {"model": StartedRun, "description": "The open run, returned instead"}},
    )
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

    @app.post("/v1/runs/{run_id:path}/decisions/signal", tags=["approvals"])
    async def signed_signal(run_id: str, body: DecisionBody, user: User) -> SignalView:
        """A decision signed for the stock `temporal workflow signal`, not sent."""
        signal = await (await runs()).signed_signal(
            run_id,
            Decision(approver=user, step=body.step, comment=body.comment, decision=body.decision),
        )
        return SignalView.model_validate(signal)

    @app.post("/v1/runs/{run_id:path}/decisions", tags=["approvals"])
    async def decide(run_id: str, body: DecisionBody, user: User) -> Message:
        said = await (await runs()).decide(
            run_id,
            Decision(approver=user, step=body.step, comment=body.comment, decision=body.decision),
        )
        return Message(message=said)

    @app.post("/v1/runs/{run_id:path}/cancel", status_code=202, tags=["runs"])
    async def cancel(run_id: str, user: User, body: ReasonBody | None = None) -> Message:
        """Ask the run to stop: it records who and why, undoes what it changed, then ends."""
        said = await (await runs()).cancel(run_id, user, body.reason if body else "")
        return Message(message=said)

    @app.post("/v1/runs/{run_id:path}/steer", tags=["runs"])
    async def steer(run_id: str, body: SteerBody, user: User) -> Message:
        """Promote, abort, pause or resume a release run; switch a blue/green one back."""
        return Message(message=await (await runs()).steer(run_id, user, body.action, body.reason))

    @app.get("/v1/freeze", tags=["kill switch"])
    async def freeze_state(_: User) -> FreezeView:
        notice = await (await runs()).frozen()
        if notice is None:
            return FreezeView(frozen=False)
        return FreezeView(frozen=True, by=notice.actor, reason=notice.reason)

    @app.post("/v1/freeze", tags=["kill switch"])
    async def freeze(body: ReasonBody, user: User) -> Message:
        """Hold every mutating step of every run, and refuse new starts but dry runs."""
        return Message(message=await (await runs()).freeze(user, body.reason))

    @app.post("/v1/unfreeze", tags=["kill switch"])
    async def unfreeze(body: ReasonBody, user: User) -> Message:
        return Message(message=await (await runs()).unfreeze(user, body.reason))

    @app.get("/v1/runs/{run_id:path}", tags=["runs"])
    async def get_run(run_id: str, _: User) -> RunView:
        return await (await runs()).view(run_id)

    @app.post(ALERTS_PATH, status_code=202, tags=["alerts"])
    async def alertmanager(
        notification: AlertNotification, by: Annotated[str, Depends(sender)]
    ) -> AlertsDelivered:
        """Alertmanager's webhook (payload version 4). One alert group is one incident: the
        first notification opens it, later ones (more alerts, `resolved`) reach it; repeats and
        retries change nothing (an exact repeat within a minute is answered without troubling
        Temporal). Authenticated by the bearer token or basic auth of Alertmanager's
        `http_config`."""
        if recent_alerts.is_repeat(notification):
            return AlertsDelivered(
                incident_id=incident_id_for_group(notification.group_key),
                status=notification.status,
                delivered=True,
                message="a repeat: the incident has these alerts already",
            )
        delivered = await (await incidents()).open_from_alerts(
            notification, by, known_open=recent_alerts.knows_group(notification)
        )
        if delivered.delivered:
            recent_alerts.delivered(notification)
        return delivered

    @app.post(
        "/v1/incidents",
        status_code=201,
        tags=["incidents"],
        responses={200: {"model": OpenedIncident, "description": "Opened earlier with this key"}},
    )
    async def open_incident(
        body: IncidentRequest,
        user: User,
        response: Response,
        idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
    ) -> OpenedIncident:
        """Open an incident by hand; a retry with the same Idempotency-Key returns it (200)."""
        opened = await (await incidents()).open(
            body, opened_by=user, idempotency_key=idempotency_key
        )
        if opened.existing:
            response.status_code = 200
        return opened

    @app.get("/v1/incidents", tags=["incidents"])
    async def list_incidents(
        _: User,
        open_only: Annotated[bool, Query(alias="open", description="Only open ones.")] = False,
        severity: Severity | None = None,
    ) -> list[IncidentSummary]:
        """Incidents, newest first."""
        return await (await incidents()).list_incidents(open_only=open_only, severity=severity)

    @app.post("/v1/incidents/{incident_id:path}/actions/{kind}", tags=["incidents"])
    async def act(
        incident_id: str, kind: ActionKind, user: User, body: ActionRequest | None = None
    ) -> Message:
        """Acknowledge, take command, change severity, note, start a runbook, mark contained or
        remediated, resolve, reopen, add, complete or drop an action item. The incident
        validates it; a refused action changes nothing."""
        said = await (await incidents()).act(incident_id, kind, body or ActionRequest(), actor=user)
        return Message(message=said)

    @app.get("/v1/incidents/{incident_id:path}", tags=["incidents"])
    async def show_incident(incident_id: str, _: User) -> IncidentView:
        """The incident: severity, stage, commander, alerts, runbooks, action items, timeline."""
        return await (await incidents()).show(incident_id)

    async def transcode(request: Request, decode: bool) -> JSONResponse:
        try:
            text = (await request.body()).decode()
        except UnicodeDecodeError:
            raise ApiError(400, "invalid", "the body is not UTF-8; send JSON") from None
        try:
            payloads = json_format.Parse(text, Payloads())
        except json_format.ParseError as err:
            raise ApiError(422, "invalid", f'expected {{"payloads": [...]}}: {err}') from None
        try:
            coded = await (codec.decode if decode else codec.encode)(list(payloads.payloads))
        except (CodecKeyError, UndecryptablePayload) as err:
            raise ApiError(422, "undecryptable", redact(str(err))) from None
        return JSONResponse(json_format.MessageToDict(Payloads(payloads=coded)))

    @app.post(f"{CODEC_PATH}/encode", tags=["codec"], openapi_extra=CODEC_BODY)
    async def encode(request: Request, _: Annotated[str, Depends(codec_identity)]) -> JSONResponse:
        return await transcode(request, decode=False)

    @app.post(f"{CODEC_PATH}/decode", tags=["codec"], openapi_extra=CODEC_BODY)
    async def decode(request: Request, _: Annotated[str, Depends(codec_identity)]) -> JSONResponse:
        return await transcode(request, decode=True)

    return app


def serve(settings: Settings) -> None:
    """Run until SIGTERM; uvicorn finishes in-flight requests before it exits. Its log lines
    go through this process's logging (ASTRA_OPS_LOG_FORMAT), not uvicorn's own."""
    configure_logging(settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        http="httptools",
        log_level="info",
        log_config=None,
    )
