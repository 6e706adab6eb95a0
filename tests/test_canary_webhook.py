"""A failing chat webhook's URL is a credential: it must not surface anywhere a person or a file
can read it, though the run that used it failed because of it.

The webhook URL carries a canary token; the run notifies through it (the approval request, then
"tell Agent Platform", which fails the run after its retries), and then every place that keeps or
shows the run is searched for the canary: the dev server's SQLite file, the stock CLI's
`temporal workflow show`, the API's answers and the process's logs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import SecretStr

from runtime.settings import Settings
from starters.api import create_app
from tests.conftest import TEMPORAL, OwnTemporal
from tests.conftest_kube import eventually
from tests.conftest_sandbox import RunningAstra
from tests.test_api import TOKENS, asgi, auth
from tests.test_runbook_llm_cost_spike import BASELINE, WINDOW, spike
from workers.worker import running_worker

CANARY = f"CANARY-{uuid.uuid4().hex}"


@pytest.fixture
def broken_chat() -> Iterator[tuple[str, list[str]]]:
    """A webhook receiver that answers 500 to every post, and the paths it was called on."""
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            paths.append(self.path)
            self.send_response(500)
            self.end_headers()
            self.wfile.write(f"no hook at {self.path}".encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/services/T000/B000/{CANARY}", paths
    finally:
        server.shutdown()
        server.server_close()


async def test_failing_webhook_url_is_nowhere_in_plaintext(
    own_temporal: OwnTemporal,
    astra_settings: Settings,
    astra: RunningAstra,
    broken_chat: tuple[str, list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    env, address = own_temporal.env, own_temporal.address
    webhook, posted = broken_chat
    settings = astra_settings.model_copy(
        update={
            "temporal_address": address,
            "chat_webhook_url": SecretStr(webhook),
            "api_tokens": SecretStr(TOKENS),
        }
    )
    params = {
        "window_seconds": WINDOW,
        "baseline_seconds": BASELINE,
        "route_to": "gpt-4o-mini",
        "verify_timeout_seconds": 20,
    }
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with (
            running_worker(env.client, settings, executor),
            asgi(create_app(settings)) as api,
        ):
            # Once the worker and the API are up: the spike is in the last few seconds only,
            # which their start on a loaded machine could outlast.
            await spike(astra)
            started = await api.post(
                "/v1/runbooks/llm-cost-spike/runs",
                json={"params": params, "reason": "cost alert"},
                headers=auth("erin"),
            )
            assert started.status_code == 201, started.text
            run_id = started.json()["run_id"]

            async def pending() -> bool:
                approvals = (await api.get("/v1/approvals", headers=auth("carol"))).json()
                return any(a["run_id"] == run_id for a in approvals)

            await eventually(pending, timeout=20, interval=0.1, message="approval of the guard")
            decided = await api.post(
                f"/v1/runs/{run_id}/decisions",
                json={"decision": "approve", "step": "approve the budget guard"},
                headers=auth("carol"),
            )
            assert decided.status_code == 200, decided.text

            async def failed() -> bool:
                view = await api.get(f"/v1/runs/{run_id}", headers=auth("dave"))
                return bool(view.json()["state"] == "failed")

            # "tell Agent Platform" fails after the step runner's five attempts (~15 s).
            await eventually(failed, timeout=60, interval=0.5, message="the run to fail")
            answers = [
                await api.get(f"/v1/runs/{run_id}", headers=auth("dave")),
                await api.get("/v1/runs", headers=auth("dave")),
            ]

    # The webhook was really called with the canary URL, and the failure says so without it.
    assert posted and all(CANARY in path for path in posted)
    failure = answers[0].json()["failure"]
    assert "tell Agent Platform" in failure
    assert f"the chat webhook at {webhook.split('/services/')[0]}/*** answered 500" in failure
    for answer in answers:
        assert CANARY not in answer.text

    stored = b"".join(p.read_bytes() for p in own_temporal.files.iterdir() if p.is_file())
    assert run_id.encode() in stored  # the file does hold this run
    assert CANARY.encode() not in stored

    show = await asyncio.create_subprocess_exec(
        str(TEMPORAL), "workflow", "show", "--workflow-id", run_id, "--address", address,
        "--output", "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await show.communicate()
    assert show.returncode == 0, err.decode()
    assert b"EVENT_TYPE_ACTIVITY_TASK_FAILED" in out and b"Encoded failure" in out
    assert CANARY.encode() not in out

    assert any("chat notification failed" in r.getMessage() for r in caplog.records)
    assert any(r.name == "httpx" for r in caplog.records)  # it logs every request's URL
    assert CANARY not in caplog.text
    assert not [r for r in caplog.records if CANARY in r.getMessage()]
