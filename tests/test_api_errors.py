"""Requests that used to answer 500 now say what was wrong, as JSON, with the right status; the
codec endpoints answer only who may read history."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from temporalio.client import (
    Client,
    WorkflowQueryFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.service import RPCError, RPCStatusCode

from runtime.client import TemporalUnavailable
from runtime.codec import KEY_ID
from runtime.settings import Settings
from starters import runs as runs_module
from starters.api import create_app
from starters.run_views import DecisionRefused, InvalidInput, UnknownRun
from starters.runs import Runs, send_update, temporal_error
from tests.test_api import api, api_settings, auth
from workflows.models import CancelRequest

__all__ = ["api", "api_settings"]  # the API fixtures, shared with test_api

PLAIN = {
    "metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
    "data": base64.b64encode(b'{"shards": 12}').decode(),
}


def refused(response: httpx.Response, status: int, needle: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] and needle in error["message"], response.text


async def test_a_quote_or_backslash_cannot_reach_a_list_filter(
    api: httpx.AsyncClient, client: Client
) -> None:
    tag = uuid.uuid4().hex[:8]
    # Subjects are Kubernetes names: a quote never gets as far as a workflow id or a filter.
    sneaky = f"x' OR WorkflowId != 'y-{tag}"
    body = {"params": {"shards": 12, "namespace": sneaky}, "dry_run": True}
    refused(
        await api.post("/v1/runbooks/shard-scaling/runs", json=body, headers=auth("alice")),
        422,
        "namespace: must be a DNS-1123 label",
    )
    # An Idempotency-Key is free text; it is looked up by its hash, never quoted into a query.
    body = {"params": {"shards": 12, "namespace": f"astra-{tag}"}, "dry_run": True}
    headers = {**auth("alice"), "Idempotency-Key": f"key' OR WorkflowId != 'y\\-{tag}"}
    first = await api.post("/v1/runbooks/shard-scaling/runs", json=body, headers=headers)
    assert first.status_code == 201, first.text
    run_id = first.json()["run_id"]
    try:
        again = await api.post("/v1/runbooks/shard-scaling/runs", json=body, headers=headers)
        assert again.status_code == 200 and again.json() == {**first.json(), "existing": True}
        other = {**headers, "Idempotency-Key": f"another-{tag}"}
        elsewhere = {**body, "params": {"shards": 12, "namespace": f"elsewhere-{tag}"}}
        fresh = await api.post("/v1/runbooks/shard-scaling/runs", json=elsewhere, headers=other)
        assert fresh.status_code == 201, fresh.text
    finally:
        await client.get_workflow_handle(run_id).terminate("test over")


async def test_too_long_ids_are_refused_not_failed(api: httpx.AsyncClient) -> None:
    long_subject = "n" * 1200
    started = await api.post(
        "/v1/runbooks/shard-scaling/runs",
        json={"params": {"shards": 12, "namespace": long_subject}},
        headers=auth("alice"),
    )
    refused(started, 422, "")
    too_long = await api.get(f"/v1/runs/shard-scaling/{long_subject}", headers=auth("alice"))
    refused(too_long, 404, "no run")


@pytest.mark.parametrize(
    ("err", "said", "needle"),
    [
        (WorkflowQueryFailedError("no handler for status"), DecisionRefused, "could not answer"),
        (WorkflowUpdateRPCTimeoutOrCancelledError(), TemporalUnavailable, "did not answer in time"),
        (RPCError("workflow not found", RPCStatusCode.NOT_FOUND, b""), UnknownRun, "no run 'r/1'"),
        (RPCError("id too long", RPCStatusCode.INVALID_ARGUMENT, b""), InvalidInput, "too long"),
        (RPCError("busy", RPCStatusCode.RESOURCE_EXHAUSTED, b""), TemporalUnavailable, "busy"),
        (RPCError("closed", RPCStatusCode.FAILED_PRECONDITION, b""), DecisionRefused, "closed"),
    ],
)
def test_temporal_errors_mean_something_to_the_caller(
    err: Exception, said: type[Exception], needle: str
) -> None:
    mapped = temporal_error(err, "r/1")
    assert isinstance(mapped, said) and needle in str(mapped)


WFT_FAILED = RPCError(
    "Unable to perform workflow execution update due to unexpected workflow task failure.",
    RPCStatusCode.FAILED_PRECONDITION,
    b"",
)


CANCEL = CancelRequest(actor="alice", reason="done")


class UpdateTakenAfter:
    """A run whose server turns ``failures`` updates away as not ready, as when the workflow
    task carrying an update failed because a signal arrived meanwhile (UnhandledCommand)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.ids: list[str] = []

    async def execute_update(self, name: str, arg: Any, *, id: str, **_: Any) -> str:
        self.ids.append(id)
        if len(self.ids) <= self.failures:
            raise WFT_FAILED
        return f"{name} done"


async def test_an_update_the_server_was_not_ready_for_is_sent_again_under_one_id() -> None:
    run: Any = UpdateTakenAfter(failures=3)
    said = await send_update(run, "cancel", CANCEL, "run r/1")
    assert said == "cancel done"
    assert len(run.ids) == 4 and len(set(run.ids)) == 1


async def test_a_run_never_ready_is_a_refusal_saying_try_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runs_module, "UPDATE_TIMEOUT", timedelta(seconds=0.3))
    run: Any = UpdateTakenAfter(failures=10_000)
    with pytest.raises(DecisionRefused, match=r"not ready to take requests yet.*try again"):
        await send_update(run, "cancel", CANCEL, "run r/1")
    assert len(set(run.ids)) == 1


async def test_codec_errors_are_refusals_with_a_reason(api: httpx.AsyncClient) -> None:
    decode = "/codec/decode"
    sealed = await api.post("/codec/encode", json={"payloads": [PLAIN]}, headers=auth("dave"))
    payload = sealed.json()["payloads"][0]
    data = bytearray(base64.b64decode(payload["data"]))
    data[-1] ^= 1
    tampered = {**payload, "data": base64.b64encode(bytes(data)).decode()}
    unknown_key = {
        **payload,
        "metadata": {**payload["metadata"], KEY_ID: base64.b64encode(b"retired").decode()},
    }
    cases = [
        (b"{", 422, "expected"),
        (b'{"payloads": [{"data": "not base64!"}]}', 422, "expected"),
        (b'{"payloads": "nope"}', 422, "expected"),
        ("{}".encode("utf-16"), 400, "not UTF-8"),
        (json.dumps({"payloads": [tampered]}).encode(), 422, "does not decrypt"),
        (json.dumps({"payloads": [unknown_key]}).encode(), 422, "key 'retired'"),
        (json.dumps({"payloads": [{**payload, "data": ""}]}).encode(), 422, "does not decrypt"),
    ]
    for body, status, needle in cases:
        answer = await api.post(
            decode, content=body, headers={**auth("dave"), "content-type": "application/json"}
        )
        refused(answer, status, needle)


def codec_client(app: FastAPI, host: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080")


async def test_dev_codec_answers_only_this_machine(api_settings: Settings) -> None:
    dev = create_app(api_settings.model_copy(update={"dev_mode": True}))
    body = {"payloads": [PLAIN]}
    async with codec_client(dev, "127.0.0.1") as local, codec_client(dev, "192.0.2.7") as remote:
        assert (await local.post("/codec/decode", json=body)).status_code == 200
        ui = {"Origin": "http://localhost:8233"}
        assert (await local.post("/codec/decode", json=body, headers=ui)).status_code == 200
        refused(await remote.post("/codec/decode", json=body), 403, "this machine only")
        for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example"):
            answer = await local.post("/codec/encode", json=body, headers={"Origin": origin})
            refused(answer, 403, "pages served from this machine only")
    async with codec_client(dev, "::1") as local6:
        assert (await local6.post("/codec/decode", json=body)).status_code == 200


async def test_codec_outside_dev_mode_needs_a_token_even_on_loopback(
    api_settings: Settings,
) -> None:
    async with codec_client(create_app(api_settings), "127.0.0.1") as local:
        refused(await local.post("/codec/decode", json={"payloads": [PLAIN]}), 401, "Bearer")
        answer = await local.post("/codec/decode", json={"payloads": [PLAIN]}, headers=auth("dave"))
        assert answer.status_code == 200


async def test_an_unexpected_error_is_a_json_500_whose_detail_is_logged_redacted(
    api_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: Runs, **_: object) -> None:
        raise RuntimeError("redis://:hunter2@cache:6379 refused the connection")

    monkeypatch.setattr(Runs, "list_runs", broken)
    transport = httpx.ASGITransport(app=create_app(api_settings), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as api:
        refused(await api.get("/v1/runs", headers=auth("dave")), 500, "RuntimeError")
    assert "hunter2" not in caplog.text
    assert "redis://***@cache:6379 refused the connection" in caplog.text


async def test_a_body_over_the_limit_is_refused_before_anything_reads_it(
    api_settings: Settings,
) -> None:
    """The alert webhook parses its body before it checks the sender, so the cap is what keeps
    an unauthenticated caller from making the API hold and parse any size: declared or chunked."""
    app = create_app(api_settings.model_copy(update={"api_max_body_bytes": 2048}))
    alerts = {"version": "4", "status": "firing", "alerts": [{"labels": {"x": "y" * 4096}}]}
    big = json.dumps(alerts).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 512):
            yield big[start : start + 512]

    ui = {"Origin": "http://127.0.0.1:8233", "content-type": "application/json"}
    async with codec_client(app, "127.0.0.1") as http:
        declared = await http.post("/v1/alerts/alertmanager", content=big, headers=ui)
        refused(declared, 413, "larger than this API accepts (2048 bytes)")
        assert declared.headers["access-control-allow-origin"] == ui["Origin"]
        streamed = await http.post("/v1/alerts/alertmanager", content=chunked(), headers=ui)
        refused(streamed, 413, "API_MAX_BODY_BYTES")
        small = {"payloads": [PLAIN]}
        assert (
            await http.post("/codec/decode", json=small, headers=auth("dave"))
        ).status_code == 200
        refused(await http.post("/v1/alerts/alertmanager", json={}), 401, "")
