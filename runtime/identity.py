"""Proven identities: the API vouches for who started or decided, and runs check its signature.

Outside dev mode a name in a payload proves nothing: anyone who can reach Temporal can send
``{"approver": "bob"}``. So the API, after it authenticated the caller, signs a short statement
(what kind of act, on which run, by whom, about what, until when) with an Ed25519 key. Runs verify
the signature with public keys that reach them through an activity (so the keys are in history and
replay does not depend on today's key files). A statement binds the workflow id and the Temporal
run id, so it cannot be replayed to another run, and it expires, so a leaked one goes stale.

This module is imported by workflow code: verification is pure computation, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, Field

from runtime.errors import ConfigError

Act = Literal[
    "start",
    "decision",
    "cancel",
    "freeze",
    "unfreeze",
    # Promote, abort, pause or resume a release run (and switch back a blue/green one); the
    # statement's ``decision`` names which.
    "steer",
    # The incident's: opening one, the alert intake's notifications, and each person's action
    # (``incident.<ActionKind>``; tests/test_incident_policy.py keeps the two lists in step).
    "incident.open",
    "incident.alerts",
    "incident.acknowledge",
    "incident.command",
    "incident.severity",
    "incident.note",
    "incident.runbook",
    "incident.contain",
    "incident.remediate",
    "incident.resolve",
    "incident.reopen",
    "incident.add_item",
    "incident.complete_item",
    "incident.drop_item",
]

# How long a signed statement stays valid: long enough for `--print-signal` to be pasted into the
# stock CLI, short enough that a leaked one is soon useless.
STATEMENT_TTL = timedelta(minutes=10)


class IdentityKeyError(ConfigError):
    """A signing or trusted key is missing or malformed."""


class Statement(BaseModel):
    """What the API vouches for. Every field is covered by the signature."""

    act: Act
    actor: str = Field(max_length=128)
    workflow_id: str = Field(max_length=1000)
    run_id: str = Field(default="", max_length=64)
    step: str | None = Field(default=None, max_length=200)
    decision: str | None = Field(default=None, max_length=16)
    digest: str = Field(default="", max_length=64)
    """sha256 of what the act carries beyond these fields (a start's request, a comment)."""
    expires_at: datetime

    def canonical(self) -> bytes:
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
        ).encode()


class Signed(BaseModel):
    statement: Statement
    key_id: str = Field(max_length=64)
    signature: str = Field(max_length=128)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def statement(
    act: Act,
    actor: str,
    workflow_id: str,
    payload: str = "",
    *,
    run_id: str = "",
    step: str | None = None,
    decision: str | None = None,
) -> Statement:
    """A statement about an act happening now, valid for ``STATEMENT_TTL``."""
    return Statement(
        act=act,
        actor=actor,
        workflow_id=workflow_id,
        run_id=run_id,
        step=step,
        decision=decision,
        digest=digest(payload),
        expires_at=datetime.now(UTC) + STATEMENT_TTL,
    )


class Signer:
    """The API's private key; the first line of the key file is the active key."""

    def __init__(self, key_id: str, key: Ed25519PrivateKey) -> None:
        self.key_id = key_id
        self._key = key

    def sign(self, statement: Statement) -> Signed:
        signature = self._key.sign(statement.canonical())
        return Signed(
            statement=statement,
            key_id=self.key_id,
            signature=base64.b64encode(signature).decode(),
        )

    def public_line(self) -> str:
        raw = self._key.public_key().public_bytes_raw()
        return f"{self.key_id}:{base64.b64encode(raw).decode()}"


def new_signing_key_line(key_id: str) -> str:
    """A fresh private key in the key-file format (``id:base64 raw 32 bytes``)."""
    raw = Ed25519PrivateKey.generate().private_bytes_raw()
    return f"{key_id}:{base64.b64encode(raw).decode()}"


def _parse_lines(spec: str, what: str) -> list[tuple[str, bytes]]:
    keys = []
    lines = [line for line in spec.splitlines() if not line.strip().startswith("#")]
    for item in ",".join(lines).split(","):
        item = item.strip()
        if not item:
            continue
        key_id, sep, encoded = item.partition(":")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except ValueError:
            raw = b""
        if not sep or not key_id or len(raw) != 32:
            raise IdentityKeyError(
                f"{what} must look like 'keyid:base64 of 32 bytes' "
                "(`astra-ops keygen --signing` prints a pair)"
            )
        keys.append((key_id, raw))
    return keys


def load_signer(spec: str) -> Signer:
    keys = _parse_lines(spec, "signing keys")
    if not keys:
        raise IdentityKeyError("no signing key: set ASTRA_OPS_SIGNING_KEY_FILE")
    key_id, raw = keys[0]
    return Signer(key_id, Ed25519PrivateKey.from_private_bytes(raw))


def load_signer_file(path: Path) -> Signer:
    try:
        return load_signer(path.read_text())
    except OSError as err:
        raise IdentityKeyError(f"cannot read signing key file {path}: {err.strerror}") from None


def parse_trusted_keys(spec: str) -> dict[str, str]:
    """``id:base64`` public keys -> {id: base64}, validated, as they travel into history."""
    return {
        key_id: base64.b64encode(raw).decode() for key_id, raw in _parse_lines(spec, "trusted keys")
    }


def verify(signed: Signed, trusted: dict[str, str], now: datetime) -> str | None:
    """Why this signed statement must not be believed, or None if it is genuine and current."""
    encoded = trusted.get(signed.key_id)
    if encoded is None:
        return f"signed with key {signed.key_id!r}, which this run does not trust"
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(encoded))
        key.verify(base64.b64decode(signed.signature), signed.statement.canonical())
    except (InvalidSignature, ValueError):
        return "the signature does not match the statement (tampered or forged)"
    if signed.statement.expires_at <= now:
        return f"the signed statement expired at {signed.statement.expires_at:%Y-%m-%d %H:%M:%S}Z"
    return None
