"""Schemathesis against the API's own OpenAPI: whatever a client sends, the answer is never a
5xx, conforms to the schema, and every refusal is JSON that says why.

The app runs in-process (ASGI) on this test's event loop, wired to a real dev server of its own:
generated requests start runs that nobody will finish, which must not meet other tests' runs.
Hypothesis drives the generation on a thread and hands each request to the loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import hypothesis
import hypothesis.strategies as st
import schemathesis
from fastapi import FastAPI
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from runtime.settings import Settings
from starters.api import ALERTS_PATH, create_app
from tests.conftest import OwnTemporal
from tests.test_api import ALERT_SENDERS, ALERTMANAGER, TOKENS, asgi
from workers.worker import running_worker
from workflows.catalogue import RUNBOOKS

EXAMPLES_PER_OPERATION = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


async def test_no_request_gets_a_server_error_and_every_refusal_says_why(
    own_temporal: OwnTemporal, settings: Settings
) -> None:
    ours = settings.model_copy(
        update={
            "temporal_address": own_temporal.address,
            "api_tokens": SecretStr(TOKENS),
            **ALERT_SENDERS,
        }
    )
    app = create_app(ours)
    schema = schemathesis.openapi.from_dict(app.openapi())
    starts = schema["/v1/runbooks/{name}/runs"]["POST"]
    loop = asyncio.get_running_loop()

    # A worker answers queries and updates (the kill switch among them) as in production.
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with running_worker(own_temporal.env.client, ours, executor):
            await fuzz(app, schema, starts, loop)


async def fuzz(app: FastAPI, schema: Any, starts: Any, loop: asyncio.AbstractEventLoop) -> None:
    async with asgi(app) as api:

        async def send(case: Case[Any], user: str | None) -> None:
            request = case.as_transport_kwargs(base_url="http://api")
            headers = dict(request["headers"])
            if user is not None:  # else whatever was generated, mostly refused as unknown
                headers["Authorization"] = f"Bearer t-{user}"
                if case.path == ALERTS_PATH:  # Alertmanager, not a person, posts alerts
                    headers.update(ALERTMANAGER)
            body = request.get("data")
            response = await api.request(
                request["method"],
                request["url"],
                params=request.get("params"),
                headers=headers,
                json=request.get("json"),
                content=body.encode() if isinstance(body, str) else body,
            )
            case.validate_response(response, checks=CHECKS)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["code"] and error["message"], response.text

        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            # Random runbook names are all refused alike; these reach each runbook's validation.
            strategy = st.one_of(
                schema.as_strategy(generation_mode=mode),
                *(
                    starts.as_strategy(generation_mode=mode, path_parameters={"name": name})
                    for name in RUNBOOKS
                ),
            )

            @hypothesis.settings(
                max_examples=EXAMPLES_PER_OPERATION * len(list(schema.get_all_operations())),
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            @hypothesis.given(case=strategy, user=st.sampled_from(["alice", "dave", None]))
            def exercise(case: Case[Any], user: str | None) -> None:
                future = asyncio.run_coroutine_threadsafe(send(case, user), loop)
                future.result(timeout=30)

            await asyncio.to_thread(exercise)
