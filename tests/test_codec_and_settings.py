"""Payload encryption and settings: what a misconfiguration or a key rotation looks like."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.worker import Worker

from runtime.codec import AesGcmCodec, load_codec
from runtime.keys import CodecKeyError, new_key_line, parse_keys
from runtime.settings import SettingsError, load_settings
from starters.runs import Runs
from tests.helpers import awaiting_approval, handle_of, status


def payload(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=text.encode())


async def test_round_trip_hides_the_plaintext() -> None:
    codec = AesGcmCodec(parse_keys(new_key_line("k1")))
    [sealed] = await codec.encode([payload('{"reason": "db on fire"}')])
    assert sealed.metadata["encryption-key-id"] == b"k1"
    assert b"db on fire" not in sealed.SerializeToString()
    assert await codec.decode([sealed]) == [payload('{"reason": "db on fire"}')]


async def test_rotation_new_key_encrypts_old_key_still_decrypts() -> None:
    old, new = new_key_line("old"), new_key_line("new")
    [sealed_by_old] = await AesGcmCodec(parse_keys(old)).encode([payload("1")])
    rotated = AesGcmCodec(parse_keys(f"{new},{old}"))
    [sealed_by_new] = await rotated.encode([payload("2")])
    assert sealed_by_new.metadata["encryption-key-id"] == b"new"
    assert await rotated.decode([sealed_by_old, sealed_by_new]) == [payload("1"), payload("2")]

    with pytest.raises(CodecKeyError, match="key 'new', which is not loaded"):
        await AesGcmCodec(parse_keys(old)).decode([sealed_by_new])


async def test_payloads_it_did_not_seal_pass_through() -> None:
    codec = AesGcmCodec(parse_keys(new_key_line("k1")))
    assert await codec.decode([payload('{"approver": "bob"}')]) == [payload('{"approver": "bob"}')]


def test_key_material_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CodecKeyError, match="astra-ops keygen"):
        load_codec(None, None)
    with pytest.raises(CodecKeyError, match="keyid:base64key"):
        parse_keys("no-separator")
    with pytest.raises(CodecKeyError, match="not valid base64"):
        parse_keys("k1:???")
    with pytest.raises(CodecKeyError, match="16, 24 or 32 bytes"):
        AesGcmCodec(parse_keys("k1:c2hvcnQ="))
    key_file = tmp_path / "keys"
    key_file.write_text(f"# rotated 2026-11-01\n{new_key_line('b')}\n{new_key_line('a')}\n")
    assert [k for k, _ in parse_keys(key_file.read_text())] == ["b", "a"]
    assert isinstance(load_codec(None, key_file), AesGcmCodec)


def test_bad_settings_name_the_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ASTRA_OPS_TEMPORAL_ADDRESS", "no-port")
    monkeypatch.setenv("ASTRA_OPS_API_PORT", "99999")
    with pytest.raises(SettingsError) as failure:
        load_settings()
    assert "ASTRA_OPS_TEMPORAL_ADDRESS: Value error, expected host:port" in str(failure.value)
    assert "ASTRA_OPS_API_PORT: Input should be less than or equal to 65535" in str(failure.value)

    monkeypatch.delenv("ASTRA_OPS_TEMPORAL_ADDRESS")
    monkeypatch.delenv("ASTRA_OPS_API_PORT")
    monkeypatch.setenv("ASTRA_OPS_SETTINGS_FILE", str(tmp_path / "missing.env"))
    with pytest.raises(SettingsError, match=r"ASTRA_OPS_SETTINGS_FILE names .*does not exist"):
        load_settings()
    env_file = tmp_path / "astra.env"
    env_file.write_text("ASTRA_OPS_TASK_QUEUE=from-file\n")
    monkeypatch.setenv("ASTRA_OPS_SETTINGS_FILE", str(env_file))
    assert load_settings().task_queue == "from-file"


async def test_history_holds_no_plaintext_input(
    runs: Runs, client: Client, worker: Worker, namespace: str
) -> None:
    reason = f"secret-reason-{namespace}"
    started = await runs.start(
        "shard-scaling", {"shards": 12, "namespace": namespace}, requester="alice", reason=reason
    )
    handle = handle_of(client, started.run_id)
    await awaiting_approval(handle, "approve scaling")
    raw = Client(client.service_client, namespace=client.namespace)  # no codec: what is stored
    history = await raw.get_workflow_handle(started.run_id).fetch_history()
    stored = b"".join(event.SerializeToString() for event in history.events)
    assert reason.encode() not in stored
    assert b"binary/encrypted" in stored
    assert (await status(handle)).reason == reason  # readable to a client holding the key
    await handle.cancel()
