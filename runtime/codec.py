"""AES-GCM payload encryption, so workflow inputs and results are ciphertext in history.

Every payload records the id of the key that sealed it; several keys can be loaded at once, the
first one encrypts and all of them decrypt, which is how keys are rotated without breaking the
histories of runs that are still open. Payloads this codec did not seal (a plain JSON signal sent
with the stock ``temporal workflow signal``) pass through untouched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from runtime.keys import CodecKeyError, parse_keys

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
_NONCE_BYTES = 12


class UndecryptablePayload(Exception):
    """A payload claims to be ours but does not open: the wrong key, or altered bytes."""


class AesGcmCodec(PayloadCodec):
    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise CodecKeyError("no payload encryption key is configured")
        for key_id, key in keys:
            if len(key) not in (16, 24, 32):
                raise CodecKeyError(f"codec key {key_id!r} must be 16, 24 or 32 bytes")
        self._active_id = keys[0][0]
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        cipher = self._ciphers[self._active_id]
        out = []
        for payload in payloads:
            nonce = os.urandom(_NONCE_BYTES)
            sealed = cipher.encrypt(nonce, payload.SerializeToString(), None)
            out.append(
                Payload(
                    metadata={"encoding": ENCODING, KEY_ID: self._active_id.encode()},
                    data=nonce + sealed,
                )
            )
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for payload in payloads:
            if payload.metadata.get("encoding") != ENCODING:
                out.append(payload)
                continue
            key_id = payload.metadata.get(KEY_ID, b"").decode()
            cipher = self._ciphers.get(key_id)
            if cipher is None:
                raise CodecKeyError(
                    f"payload was encrypted with key {key_id!r}, which is not loaded; add it to "
                    "ASTRA_OPS_CODEC_KEYS (old keys stay listed until no open run uses them)"
                )
            nonce, sealed = payload.data[:_NONCE_BYTES], payload.data[_NONCE_BYTES:]
            try:
                out.append(Payload.FromString(cipher.decrypt(nonce, sealed, None)))
            except (InvalidTag, ValueError, DecodeError):
                raise UndecryptablePayload(
                    f"a payload sealed with key {key_id!r} does not decrypt: its bytes were "
                    "altered, or another key has that id"
                ) from None
        return out


def load_codec(keys: str | None, key_file: Path | None) -> AesGcmCodec:
    spec = keys or (key_file.read_text() if key_file else "")
    if not spec.strip():
        raise CodecKeyError(
            "no payload encryption key: set ASTRA_OPS_CODEC_KEYS or ASTRA_OPS_CODEC_KEY_FILE "
            "(`astra-ops keygen` prints a new key)"
        )
    return AesGcmCodec(parse_keys(spec))
