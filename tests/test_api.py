"""The HTTP API, in-process over ASGI, against the real dev server and the sandbox cluster."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import Worker

from runtime.settings import Settings
from starters.api import create_app
from tests.conftest_kube import KubeSandbox
from tests.helpers import awaiting_approval, handle_of, shard_count

TOKENS = "t-alice:alice,t-bob:bob,t-carol:carol,t-erin:erin,t-dave:dave,t-mallory:mallory"
ALERT_SENDERS = {
    "alertmanager_tokens": SecretStr("am-token:alertmanager"),
    "alertmanager_basic_auth": SecretStr("alertmanager:am-password"),
}
"""Who may post alerts: Alertmanager, by bearer token or basic auth."""
ALERTMANAGER = {"Authorization": "Bearer am-token"}


def asgi(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer t-{user}"}


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_tokens": SecretStr(TOKENS)})


@pytest.fixture
async def api(api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(api_settings)
    async with asgi(app) as http:
        yield http


async def start_scaling(api: httpx.AsyncClient, namespace: str, **extra: object) -> httpx.Response:
    body = {"params": {"shards": 12, "namespace": namespace}, "reason": "rebalance", **extra}
    return await api.post("/v1/runbooks/shard-scaling/runs", json=body, headers=auth("alice"))


async def test_start_approve_and_watch_a_run(
    api: httpx.AsyncClient, client: Client, worker: Worker, kube: KubeSandbox, namespace: str
) -> None:
    started = await start_scaling(api, namespace)
    assert started.status_code == 201, started.text
    run_id = started.json()["run_id"]
    await awaiting_approval(handle_of(client, run_id), "approve scaling")

    pending = (await api.get("/v1/approvals", headers=auth("bob"))).json()
    mine = [p for p in pending if p["run_id"] == run_id]
    assert mine and mine[0]["approval"]["step"] == "approve scaling"
    assert mine[0]["approval"]["members"] == ["bob"]

    decided = await api.post(
        f"/v1/runs/{run_id}/decisions",
        json={"decision": "approve", "comment": "go"},
        headers=auth("bob"),
    )
    assert decided.status_code == 200, decided.text
    assert "approved by bob" in decided.json()["message"]
    await handle_of(client, run_id).result()

    view = (await api.get(f"/v1/runs/{run_id}", headers=auth("dave"))).json()
    assert view["state"] == "completed"
    assert view["result"]["outcome"] == "done"
    assert shard_count(kube, namespace) == "12"


async def test_idempotency_key_returns_the_same_run(
    api: httpx.AsyncClient, client: Client, worker: Worker, namespace: str
) -> None:
    headers = {**auth("alice"), "Idempotency-Key": f"key-{namespace}"}
    body = {"params": {"shards": 12, "namespace": namespace}}
    first = await api.post("/v1/runbooks/shard-scaling/runs", json=body, headers=headers)
    again = await api.post("/v1/runbooks/shard-scaling/runs", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["run_id"] == again.json()["run_id"]

    # The key is bound to the user and the body (IETF Idempotency-Key draft): reused for
    # another request, it is refused and nothing starts.
    other_body = {"params": {"shards": 13, "namespace": namespace}}
    for reused in (
        await api.post("/v1/runbooks/shard-scaling/runs", json=other_body, headers=headers),
        await api.post(
            "/v1/runbooks/shard-scaling/runs",
            json=body,
            headers={**auth("bob"), "Idempotency-Key": f"key-{namespace}"},
        ),
    ):
        assert reused.status_code == 422, reused.text
        assert "Idempotency-Key was used for another request" in reused.json()["error"]["message"]
    # Without the key, another request for the open run's subject says whose run it is.
    conflict = await api.post(
        "/v1/runbooks/shard-scaling/runs", json=other_body, headers=auth("bob")
    )
    assert conflict.status_code == 409, conflict.text
    error = conflict.json()["error"]
    assert error["run"]["run_id"] == first.json()["run_id"]
    assert error["run"]["requester"] == "alice" and error["run"]["params"]["shards"] == 12

    # Still the same run once it has closed: the key names the request, not the open run.
    handle = handle_of(client, first.json()["run_id"])
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    later = await api.post("/v1/runbooks/shard-scaling/runs", json=body, headers=headers)
    assert later.json()["existing"] is True


async def test_errors_have_the_right_status_and_a_json_body(
    api: httpx.AsyncClient, client: Client, worker: Worker, namespace: str
) -> None:
    async def error(response: httpx.Response, status: int, needle: str) -> None:
        assert response.status_code == status, response.text
        assert needle in response.json()["error"]["message"]

    await error(await api.get("/v1/approvals"), 401, "Bearer")
    await error(await api.get("/v1/approvals", headers={"Authorization": "Bearer nope"}), 401,
                "unknown bearer token")  # fmt: skip
    await error(await api.get("/v1/approvals", headers=auth("mallory")), 403, "access policy")
    await error(await api.post("/v1/runbooks/nope/runs", json={}, headers=auth("alice")), 404,
                "no runbook named 'nope'")  # fmt: skip
    await error(await api.get("/v1/runs/shard-scaling/never", headers=auth("alice")), 404,
                "no run 'shard-scaling/never'")  # fmt: skip
    bad = await api.post(
        "/v1/runbooks/shard-scaling/runs",
        json={"params": {"shards": -1, "namespace": namespace}},
        headers=auth("alice"),
    )
    await error(bad, 422, "shards: Input should be greater than or equal to 1")
    unknown = await api.post(
        "/v1/runbooks/shard-scaling/runs",
        json={"params": {"shards": 4, "namespace": namespace, "shard": 3}},
        headers=auth("alice"),
    )
    await error(unknown, 422, "shard: Extra inputs are not permitted")
    malformed = await api.post(
        "/v1/runbooks/shard-scaling/runs",
        content=b"{",
        headers={**auth("alice"), "content-type": "application/json"},
    )
    await error(malformed, 422, "JSON")

    run_id = (await start_scaling(api, namespace)).json()["run_id"]
    await awaiting_approval(handle_of(client, run_id), "approve scaling")
    decisions = f"/v1/runs/{run_id}/decisions"
    approve = {"decision": "approve"}
    await error(await api.post(decisions, json=approve, headers=auth("alice")), 403,
                "requester cannot approve")  # fmt: skip
    await error(await api.post(decisions, json=approve, headers=auth("carol")), 403,
                "not in the group(s) allowed")  # fmt: skip
    await error(await api.post(decisions, json={"decision": "maybe"}, headers=auth("bob")), 422,
                "decision")  # fmt: skip
    await error(await api.post(decisions, json={**approve, "step": "other"}, headers=auth("bob")),
                409, "not awaiting approval")  # fmt: skip
    assert (await api.post(decisions, json=approve, headers=auth("bob"))).status_code == 200
    await handle_of(client, run_id).result()
    await error(await api.post(decisions, json=approve, headers=auth("bob")), 409, "completed")


async def test_unreachable_temporal_is_503_with_retry_after(api_settings: Settings) -> None:
    dead = api_settings.model_copy(update={"temporal_address": "127.0.0.1:1"})
    app = create_app(dead)
    async with asgi(app) as api:
        assert (await api.get("/healthz")).status_code == 200
        for response in (
            await api.get("/readyz"),
            await api.get("/v1/approvals", headers=auth("bob")),
        ):
            assert response.status_code == 503
            assert response.headers["retry-after"] == "5"
            assert "Temporal is not reachable at 127.0.0.1:1" in response.json()["error"]["message"]


async def test_ready_when_temporal_answers(api: httpx.AsyncClient) -> None:
    assert (await api.get("/readyz")).json() == {"status": "ready"}


async def test_catalogue_lists_each_runbook_with_its_steps_and_parameters(
    api: httpx.AsyncClient,
) -> None:
    catalogue = {r["name"]: r for r in (await api.get("/v1/runbooks", headers=auth("dave"))).json()}
    scaling = catalogue["shard-scaling"]
    assert scaling["rotation"] == "kernel-sre"
    assert "approve scaling" in scaling["steps"]
    assert scaling["started_by"] == ["kernel-sre"]
    shards = next(p for p in scaling["parameters"] if p["name"] == "shards")
    assert shards["bounds"] == [">= 1", "<= 4096"] and shards["required"]
    one = await api.get("/v1/runbooks/shard-scaling", headers=auth("dave"))
    assert one.json() == scaling
    custom = await api.get(
        "/v1/runbooks/shard-scaling",
        params={"param": ["shards=3", "scheduler=sched-b"]},
        headers=auth("dave"),
    )
    assert "restart sched-b" in custom.json()["steps"]
    bad = await api.get(
        "/v1/runbooks/shard-scaling", params={"param": "shards"}, headers=auth("dave")
    )
    assert bad.status_code == 422 and bad.json()["error"]["message"] == "param takes key=value"
    unknown = await api.get("/v1/runbooks/nope", headers=auth("dave"))
    assert unknown.status_code == 404
    assert "no runbook named 'nope'" in unknown.json()["error"]["message"]


async def test_codec_endpoints_round_trip_for_the_ui(api_settings: Settings) -> None:
    plain = {"metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
             "data": base64.b64encode(json.dumps({"shards": 12}).encode()).decode()}  # fmt: skip
    secured = create_app(api_settings)
    async with asgi(secured) as api:
        assert (await api.post("/codec/encode", json={"payloads": [plain]})).status_code == 401
        encoded = await api.post("/codec/encode", json={"payloads": [plain]}, headers=auth("dave"))
        sealed = encoded.json()["payloads"][0]
        assert base64.b64decode(sealed["metadata"]["encoding"]) == b"binary/encrypted"
        assert b"shards" not in base64.b64decode(sealed["data"])
        decoded = await api.post("/codec/decode", json={"payloads": [sealed]}, headers=auth("dave"))
        assert decoded.json()["payloads"][0] == plain

    dev = create_app(api_settings.model_copy(update={"dev_mode": True}))
    async with asgi(dev) as api:
        preflight = await api.options(
            "/codec/decode",
            headers={
                "Origin": "http://localhost:8233",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-namespace",
            },
        )
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:8233"
        other = await api.options(
            "/codec/decode",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers
        assert (await api.post("/codec/decode", json={"payloads": [plain]})).status_code == 200
