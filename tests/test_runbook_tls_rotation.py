"""TLS Rotation end to end: the production worker, the sandbox cluster's services serving TLS on
loopback, and real handshakes, in a namespace of the test's own.

Every check of what a service serves is a handshake here as in the runbook: after a renewal the
endpoint must serve the Secret's new certificate, chained to the CA, for the same names; and no
PEM private key may appear in the run's history, result, API view or the worker's logs.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError

from activities.certificates import PEM_KEY_MARKER, describe, handshake, read_pem
from activities.tls import PREVIOUS_CRT
from runtime.settings import Settings
from sandbox.faults import cert_expiring, cert_mismatch
from sandbox.kube.tls import TlsEndpoints
from starters.runs import Runs
from tests.conftest_kube import KubeSandbox, eventually, sandbox_ca
from tests.helpers import awaiting_approval, generation, handle_of
from tests.test_runbook_vault_setup import history_texts
from workers.worker import running_worker
from workflows.models import Decision, Outcome, RunbookResult

RENEW = "approve renewing certificates"
ROLL_BACK = "approve rolling back certificates"


@pytest.fixture
def endpoints(kube: KubeSandbox, namespace: str) -> Iterator[TlsEndpoints]:
    with TlsEndpoints(kube.cluster, namespace=namespace) as served:
        yield served


@asynccontextmanager
async def tls_worker(client: Client, settings: Settings) -> AsyncIterator[None]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with running_worker(client, settings, executor):
            yield


def stored(kube: KubeSandbox, namespace: str, service: str, key: str = "tls.crt") -> str:
    secret = kube.cluster.get("secrets", namespace, f"{service}-tls")
    assert secret is not None
    return base64.b64decode(secret["data"][key]).decode()


def served(endpoints: TlsEndpoints, namespace: str, service: str) -> tuple[str, bool]:
    """The fingerprint the service's endpoint serves, and whether it verifies against the CA."""
    seen = handshake(
        endpoints.address(service), f"{service}.{namespace}.svc", 5, sandbox_ca().cert_pem
    )
    assert seen.served is not None, seen.error
    return seen.served.fingerprint, seen.verified


async def rolled_onto(
    endpoints: TlsEndpoints, namespace: str, service: str, fingerprint: str
) -> None:
    """Wait for the fault's restart to reach the endpoint."""
    await eventually(
        lambda: served(endpoints, namespace, service)[0] == fingerprint,
        message=f"{service} serving {fingerprint}",
    )


def assert_renewed(
    kube: KubeSandbox, endpoints: TlsEndpoints, namespace: str, old: dict[str, str]
) -> dict[str, str]:
    """Each service's Secret holds a new certificate, which its endpoint serves, chained to the
    CA, and keeps the one it had before (``old``, by service) as the previous: written once.
    The new fingerprints, by service."""
    new = {}
    for service, before in old.items():
        new[service] = describe(read_pem(stored(kube, namespace, service))).fingerprint
        assert new[service] != before
        assert served(endpoints, namespace, service) == (new[service], True)
        previous = describe(read_pem(stored(kube, namespace, service, PREVIOUS_CRT)))
        assert previous.fingerprint == before, f"{service}'s Secret was written more than once"
    return new


async def run(
    runs: Runs, client: Client, params: dict[str, Any], approve: str | None
) -> RunbookResult:
    started = await runs.start("tls-rotation", params, requester="alice", reason="test")
    handle = handle_of(client, started.run_id)
    if approve is not None:
        await awaiting_approval(handle, approve)
        await runs.decide(started.run_id, Decision(approver="bob", step=approve))
    return await handle.result()


async def test_an_expired_certificate_is_renewed_served_and_rolled_back_with_no_key_in_sight(
    runs: Runs,
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    endpoints: TlsEndpoints,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    ca = sandbox_ca()
    expired = (await cert_expiring(kube.api, ca, namespace, ["gateway"], days_left=-1)).fingerprints
    expiring = (await cert_expiring(kube.api, ca, namespace, ["agent-service"], 2)).fingerprints
    old = {**expired, **expiring}
    for service, fingerprint in old.items():
        await rolled_onto(endpoints, namespace, service, fingerprint)
    assert served(endpoints, namespace, "gateway") == (old["gateway"], False)  # expired
    params = {"namespace": namespace}
    async with tls_worker(client, settings):
        renewed = await run(runs, client, params, RENEW)
        assert renewed.outcome == Outcome.DONE, renewed.summary
        new = assert_renewed(kube, endpoints, namespace, old)
        for service in old:
            assert f"{service} serves {new[service]} (replaced {old[service]}" in renewed.summary
        steps = {s.name: s.detail for s in renewed.steps}
        assert "not needed" in steps["renew goal-service's certificate"]  # not due: untouched

        back = {**params, "services": ["agent-service"], "rollback": True}
        rolled_back = await run(runs, client, back, ROLL_BACK)
        assert rolled_back.outcome == Outcome.DONE, rolled_back.summary
        assert served(endpoints, namespace, "agent-service") == (old["agent-service"], True)
        assert f"agent-service serves {old['agent-service']} again" in rolled_back.summary

    logs = "\n".join(r.getMessage() for r in caplog.records)
    for result in (renewed, rolled_back):
        run_id = f"tls-rotation/{namespace}"
        raw, decoded = await history_texts(client, run_id)
        view = (await runs.view(run_id)).model_dump_json()
        for where, text in {
            "history (stored)": raw,
            "history (decoded)": decoded,
            "result": result.model_dump_json(),
            "API run view": view,
            "worker logs": logs,
        }.items():
            assert PEM_KEY_MARKER not in text, where


async def test_a_service_still_serving_its_old_certificate_after_the_roll_fails_the_run(
    runs: Runs,
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    endpoints: TlsEndpoints,
) -> None:
    fault = await cert_expiring(kube.api, sandbox_ca(), namespace, ["goal-service"], days_left=3)
    await rolled_onto(endpoints, namespace, "goal-service", fault.fingerprints["goal-service"])
    endpoints.pin("goal-service")  # a server that never reloads its certificate
    params = {"namespace": namespace, "verify_timeout_seconds": 1}
    async with tls_worker(client, settings):
        with pytest.raises(WorkflowFailureError) as failure:
            await run(runs, client, params, RENEW)
    message = str(failure.value.cause)
    old = fault.fingerprints["goal-service"]
    assert "failed at step 'verify goal-service serves the certificate in its Secret'" in message
    assert f"goal-service still serves {old}" in message
    assert "rollback=true" in message
    assert served(endpoints, namespace, "goal-service")[0] == old


async def test_a_dry_run_changes_nothing_and_a_healthy_namespace_needs_nothing(
    runs: Runs,
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    endpoints: TlsEndpoints,
) -> None:
    async with tls_worker(client, settings):
        healthy = await run(runs, client, {"namespace": namespace}, None)
        assert healthy.outcome == Outcome.NO_CHANGE, healthy.summary

        expiring = await cert_expiring(
            kube.api, sandbox_ca(), namespace, ["agent-service"], days_left=10
        )
        fingerprint = expiring.fingerprints["agent-service"]
        await rolled_onto(endpoints, namespace, "agent-service", fingerprint)
        mismatch = await cert_mismatch(kube.api, sandbox_ca(), namespace, ["gateway"])
        before = {s: stored(kube, namespace, s) for s in ("agent-service", "gateway")}
        generations = {s: generation(kube, namespace, s) for s in before}
        started = await runs.start(
            "tls-rotation", {"namespace": namespace}, requester="dave", dry_run=True
        )
        result = await handle_of(client, started.run_id).result()

    assert result.outcome == Outcome.DONE and result.summary.startswith("dry-run:"), result
    assert "restart gateway (the endpoint serves another certificate)" in result.summary
    assert {s: stored(kube, namespace, s) for s in before} == before
    assert {s: generation(kube, namespace, s) for s in before} == generations
    assert served(endpoints, namespace, "gateway")[0] != mismatch.fingerprints["gateway"]
