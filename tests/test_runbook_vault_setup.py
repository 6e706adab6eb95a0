"""Vault Setup end to end: the production worker, a real OpenBao, the sandbox cluster.

Each test loads a source holding a canary value; none of it, nor the platform's new token, may
appear in the run's history (raw, and decoded with the codec), its result, the API's view of
the run, or the worker's log records.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowFailureError
from temporalio.testing import ActivityEnvironment

from activities.kubernetes import KubernetesActivities
from activities.vault import ISSUED_BY, IssueCredential, VaultActivities
from runtime.settings import Settings
from sandbox.servers.openbao import OpenBaoServer
from starters.runs import Runs
from tests.conftest_kube import KubeSandbox
from tests.helpers import awaiting_approval, handle_of
from workers.worker import running_worker, vault_config
from workflows.models import Decision, Outcome, RunbookResult, StepState


@asynccontextmanager
async def vault_worker(client: Client, settings: Settings) -> AsyncIterator[None]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with running_worker(client, settings, executor):
            yield


def settings_for(settings: Settings, server: OpenBaoServer, root: Path, **more: Any) -> Settings:
    return settings.model_copy(
        update={
            "vault_addr": server.address,
            "vault_token_file": server.token_file,
            "vault_source_root": root,
            **more,
        }
    )


def plant(root: Path, canary: str) -> None:
    """A directory source, as Kubernetes mounts a Secret: one file per key."""
    folder = root / "astra"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "OPENAI_API_KEY").write_text(canary + "\n")
    (folder / "DB_PASSWORD").write_text(f"pw-{canary}\n")
    (folder / "..data").mkdir(exist_ok=True)  # a mounted Secret's bookkeeping: not a key


def platform_secret(kube: KubeSandbox, namespace: str) -> dict[str, str]:
    secret = kube.cluster.get("secrets", namespace, "astra-vault")
    assert secret is not None
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def root_client(server: OpenBaoServer) -> hvac.Client:
    return hvac.Client(url=server.address, token=server.root_token())


def params(namespace: str, path: str, **more: Any) -> dict[str, Any]:
    return {
        "namespace": namespace,
        "path": path,
        "policy": path,
        "source": "directory:astra",
        **more,
    }


async def setup(runs: Runs, client: Client, p: dict[str, Any]) -> RunbookResult:
    """Start a run as alice, approve it as bob when it asks, and return its result."""
    started = await runs.start("vault-setup", p, requester="alice", reason="test")
    handle = handle_of(client, started.run_id)
    await awaiting_approval(handle, "approve the Vault setup")
    await runs.decide(started.run_id, Decision(approver="bob", step="approve the Vault setup"))
    return await handle.result()


def payloads(message: Message) -> Iterator[Payload]:
    """Every payload anywhere in a history event."""
    for _, value in message.ListFields():
        if isinstance(value, Message):
            items: list[Any] = [value]
        elif isinstance(value, str | bytes | int | float):
            continue
        elif callable(getattr(value, "values", None)):  # a map field
            items = list(value.values())
        else:  # a repeated field
            items = list(value)
        for item in items:
            if isinstance(item, Payload):
                yield item
            elif isinstance(item, Message):
                yield from payloads(item)


async def history_texts(client: Client, run_id: str) -> tuple[str, str]:
    """The run's history as stored (encrypted payloads) and with every payload decoded."""
    history = await client.get_workflow_handle(run_id).fetch_history()
    codec = client.data_converter.payload_codec
    assert codec is not None
    found = [p for event in history.events for p in payloads(event)]
    decoded = await codec.decode(found)
    return history.to_json(), "\n".join(p.data.decode(errors="replace") for p in decoded)


async def leaks(
    client: Client, runs: Runs, run_id: str, result: RunbookResult, logs: str, secrets: list[str]
) -> dict[str, list[str]]:
    stored, decoded = await history_texts(client, run_id)
    places = {
        "history (stored)": stored,
        "history (decoded)": decoded,
        "result": result.model_dump_json(),
        "API run view": (await runs.view(run_id)).model_dump_json(),
        "worker logs": logs,
    }
    return {where: [s[:6] for s in secrets if s in text] for where, text in places.items()}


async def test_first_setup_loads_the_secrets_and_gives_the_platform_a_least_privilege_token(
    runs: Runs,
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    openbao: OpenBaoServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    canary = f"canary-{uuid.uuid4().hex}"
    plant(tmp_path, canary)
    path = f"astra-{uuid.uuid4().hex[:8]}"
    before = platform_secret(kube, namespace)
    async with vault_worker(client, settings_for(settings, openbao, tmp_path)):
        result = await setup(runs, client, params(namespace, path))

    assert result.outcome == Outcome.DONE, result.summary
    written = stored(root_client(openbao), path)
    assert written["data"] == {"OPENAI_API_KEY": canary, "DB_PASSWORD": f"pw-{canary}"}
    assert written["metadata"]["version"] == 1
    after = platform_secret(kube, namespace)
    assert after["ASTRA_VAULT_ADDR"] == openbao.address
    assert after["ASTRA_VAULT_PATH"] == f"secret/{path}"
    token = after["ASTRA_VAULT_TOKEN"]
    assert token != before["ASTRA_VAULT_TOKEN"]
    platform = hvac.Client(url=openbao.address, token=token)
    assert stored(platform, path)["data"]["OPENAI_API_KEY"] == canary
    with pytest.raises(hvac.exceptions.Forbidden):
        stored(platform, "other")
    steps = {s.name: s for s in result.steps}
    assert (
        "wrote DB_PASSWORD, OPENAI_API_KEY to secret/" in steps["write the changed secrets"].detail
    )
    assert steps["restart gateway"].state == StepState.DONE
    assert "denied" in steps["verify the credential reads its path and nothing else"].detail
    logs = "\n".join(r.getMessage() for r in caplog.records)
    secrets = [canary, token, openbao.root_token()]
    hits = await leaks(client, runs, f"vault-setup/{namespace}", result, logs, secrets)
    assert hits == {where: [] for where in hits}


async def test_a_rerun_changes_nothing_and_a_new_path_replaces_and_revokes_the_token(
    runs: Runs,
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    openbao: OpenBaoServer,
    tmp_path: Path,
) -> None:
    plant(tmp_path, f"canary-{uuid.uuid4().hex}")
    path = f"astra-{uuid.uuid4().hex[:8]}"
    async with vault_worker(client, settings_for(settings, openbao, tmp_path)):
        first = await setup(runs, client, params(namespace, path))
        assert first.outcome == Outcome.DONE, first.summary
        old = platform_secret(kube, namespace)

        started = await runs.start("vault-setup", params(namespace, path), requester="alice")
        again = await handle_of(client, started.run_id).result()
        assert again.outcome == Outcome.NO_CHANGE, again.summary
        assert platform_secret(kube, namespace) == old

        moved = await setup(runs, client, params(namespace, f"{path}-b"))
    assert moved.outcome == Outcome.DONE, moved.summary
    new = platform_secret(kube, namespace)
    assert new["ASTRA_VAULT_PATH"] == f"secret/{path}-b"
    assert new["ASTRA_VAULT_ADDR"] == old["ASTRA_VAULT_ADDR"]
    root = root_client(openbao)
    with pytest.raises(hvac.exceptions.Forbidden):
        root.auth.token.lookup(old["ASTRA_VAULT_TOKEN"])  # revoked
    assert sorted(root.auth.token.lookup(new["ASTRA_VAULT_TOKEN"])["data"]["policies"]) == [
        f"{path}-b",
        "default",
    ]
    steps = {s.name: s for s in moved.steps}
    assert steps["revoke the replaced credential"].detail.startswith("revoked the replaced token")


async def test_a_concurrent_writer_is_not_overwritten(
    runs: Runs,
    client: Client,
    settings: Settings,
    namespace: str,
    openbao: OpenBaoServer,
    tmp_path: Path,
) -> None:
    plant(tmp_path, f"canary-{uuid.uuid4().hex}")
    path = f"astra-{uuid.uuid4().hex[:8]}"
    kv = root_client(openbao).secrets.kv.v2
    async with vault_worker(client, settings_for(settings, openbao, tmp_path)):
        started = await runs.start("vault-setup", params(namespace, path), requester="alice")
        handle = handle_of(client, started.run_id)
        await awaiting_approval(handle, "approve the Vault setup")
        # Someone else writes the path between the run's comparison and its write.
        kv.create_or_update_secret(path=path, mount_point="secret", secret={"DB_PASSWORD": "x"})
        await runs.decide(started.run_id, Decision(approver="bob"))
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    assert "someone else wrote it since" in str(failed.value.cause)
    written = stored(root_client(openbao), path)
    assert written["data"] == {"DB_PASSWORD": "x"}
    assert written["metadata"]["version"] == 1


async def test_a_sealed_vault_stops_the_run_unless_unseal_keys_are_set_and_approved(
    runs: Runs,
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    sealed_openbao: tuple[OpenBaoServer, Path],
    tmp_path: Path,
) -> None:
    server, keys = sealed_openbao
    plant(tmp_path, f"canary-{uuid.uuid4().hex}")
    p = params(namespace, "astra")
    async with vault_worker(client, settings_for(settings, server, tmp_path)):
        started = await runs.start("vault-setup", p, requester="alice")
        with pytest.raises(WorkflowFailureError) as failed:
            await handle_of(client, started.run_id).result()
    assert "is sealed; unseal it" in str(failed.value.cause)

    unsealing = settings_for(settings, server, tmp_path, vault_unseal_keys_file=keys)
    async with vault_worker(client, unsealing):
        started = await runs.start("vault-setup", p, requester="alice")
        handle = handle_of(client, started.run_id)
        await awaiting_approval(handle, "approve unsealing Vault")
        await runs.decide(started.run_id, Decision(approver="bob"))
        await awaiting_approval(handle, "approve the Vault setup")
        await runs.decide(started.run_id, Decision(approver="bob"))
        result = await handle.result()
    assert result.outcome == Outcome.DONE, result.summary
    steps = {s.name: s for s in result.steps}
    assert steps["unseal Vault"].detail == f"unsealed Vault at {server.address}"
    assert steps["mount KV-v2"].detail == "mounted KV-v2 at secret/"  # none on a new Vault
    assert platform_secret(kube, namespace)["ASTRA_VAULT_PATH"] == "secret/astra"


def live_token_meta(root: hvac.Client) -> dict[str, dict[str, str]]:
    """Each live token's metadata, by its accessor."""
    tokens = root.auth.token
    found = (tokens.lookup_accessor(a)["data"] for a in tokens.list_accessors()["data"]["keys"])
    return {t["accessor"]: t.get("meta") or {} for t in found}


def live_tokens(root: hvac.Client, **meta: str) -> list[str]:
    """The accessors of the live tokens whose metadata has all of ``meta``."""
    return [a for a, has in live_token_meta(root).items() if meta.items() <= has.items()]


def stored(vault: hvac.Client, path: str) -> dict[str, Any]:
    """The latest version of ``path`` in the ``secret`` KV-v2 mount, read as ``vault``: its
    ``data`` and ``metadata``."""
    version: dict[str, Any] = vault.secrets.kv.v2.read_secret_version(
        path=path, mount_point="secret", raise_on_deleted_version=False
    )["data"]
    return version


def unspent_secret_ids(root: hvac.Client, role: str) -> list[str]:
    try:
        listed = root.auth.approle.list_secret_id_accessors(role)
    except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest):  # none, or no role
        return []
    return list(listed["data"]["keys"])


@pytest.mark.slow
async def test_an_approle_login_gives_the_platform_its_token_and_no_secret_id_outlives_the_run(
    runs: Runs,
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    openbao: OpenBaoServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    canary = f"canary-{uuid.uuid4().hex}"
    plant(tmp_path, canary)
    path = f"astra-{uuid.uuid4().hex[:8]}"
    root = root_client(openbao)
    # The platform holds a periodic token for the path (issued as the default settings do).
    periodic = VaultActivities(
        vault_config(settings_for(settings, openbao, tmp_path)), KubernetesActivities(kube.api)
    )
    periodic.issue_credential(
        IssueCredential(namespace=namespace, mount="secret", path=path, policy=path)
    )
    old = platform_secret(kube, namespace)["ASTRA_VAULT_TOKEN"]

    approle = settings_for(settings, openbao, tmp_path, vault_credential="approle")
    async with vault_worker(client, approle):
        # The same input, but the settings now ask for an AppRole: the token is replaced.
        switched = await setup(runs, client, params(namespace, path))
        assert switched.outcome == Outcome.DONE, switched.summary
        first = platform_secret(kube, namespace)["ASTRA_VAULT_TOKEN"]
        moved = await setup(runs, client, params(namespace, f"{path}-b"))
    assert moved.outcome == Outcome.DONE, moved.summary
    token = platform_secret(kube, namespace)["ASTRA_VAULT_TOKEN"]
    for replaced in (old, first):
        with pytest.raises(hvac.exceptions.Forbidden):
            root.auth.token.lookup(replaced)  # revoked
    found = root.auth.token.lookup(token)["data"]
    policy = f"{path}-b"  # params() names the policy (and so the role) like the path
    assert found["meta"]["role_name"] == policy
    assert found["meta"]["path"] == f"secret/{path}-b"
    assert sorted(found["policies"]) == sorted(["default", policy])
    assert found["period"] > 0 and found["orphan"]
    role = root.auth.approle.read_role(policy)["data"]
    assert role["token_policies"] == [policy] and role["secret_id_num_uses"] == 1
    for name in (path, policy):
        assert unspent_secret_ids(root, name) == []  # each was spent by its login
    steps = {s.name: s for s in moved.steps}
    verified = steps["verify the credential reads its path and nothing else"].detail
    assert verified.startswith("reads its path; denied read secret/"), verified
    assert steps["revoke the replaced credential"].detail.startswith("revoked the replaced token")
    logs = "\n".join(r.getMessage() for r in caplog.records)
    secrets = [canary, first, token]
    hits = await leaks(client, runs, f"vault-setup/{namespace}", moved, logs, secrets)
    assert hits == {where: [] for where in hits}


class DyingKubernetes(KubernetesActivities):
    """The worker dies (once) between making the platform's credential and writing it."""

    died = False

    def put_secret_data(self, *args: Any, **kwargs: Any) -> None:
        if not self.died:
            self.died = True
            raise RuntimeError("worker lost")
        super().put_secret_data(*args, **kwargs)


@pytest.mark.parametrize("credential", ["token", "approle"])
def test_a_retry_after_the_worker_died_before_writing_the_secret_leaves_one_live_credential(
    credential: str,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    openbao: OpenBaoServer,
    tmp_path: Path,
) -> None:
    path = f"astra-{uuid.uuid4().hex[:8]}"
    config = vault_config(settings_for(settings, openbao, tmp_path, vault_credential=credential))
    vault = VaultActivities(config, DyingKubernetes(kube.api))
    step = f"vault-setup/{namespace}/update astra-vault/{uuid.uuid4().hex}"
    req = IssueCredential(namespace=namespace, mount="secret", path=path, policy=path, token=step)
    root = root_client(openbao)
    first, retry = ActivityEnvironment(), ActivityEnvironment()
    retry.info = dataclasses.replace(retry.info, attempt=2)
    with pytest.raises(RuntimeError, match="worker lost"):
        first.run(vault.issue_credential, req)  # its credential is made, its result is lost
    (orphan,) = live_tokens(root, issued_by=ISSUED_BY, step=step)
    if credential == "approle":  # and an attempt that died between issuing and spending one
        root.auth.approle.generate_secret_id(path, metadata={"issued_by": ISSUED_BY, "step": step})
        assert len(unspent_secret_ids(root, path)) == 1

    retried = retry.run(vault.issue_credential, req)  # the same step token

    assert "left by an earlier attempt of this step" in retried.detail, retried.detail
    held = root.auth.token.lookup(platform_secret(kube, namespace)["ASTRA_VAULT_TOKEN"])["data"]
    assert live_tokens(root, issued_by=ISSUED_BY, step=step) == [held["accessor"]]
    assert held["accessor"] != orphan
    assert unspent_secret_ids(root, path) == []
    assert retry.run(vault.issue_credential, req).changed is False  # a third finds it done
