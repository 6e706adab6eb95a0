"""Payload key material: reading ``keyid:base64`` lines and making new keys.

Apart from the codec itself, so the CLI can make and check keys without loading Temporal's
converter (every command would pay for it).
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from runtime.errors import ConfigError


class CodecKeyError(ConfigError):
    """The configured key material is missing or malformed."""


def parse_keys(spec: str) -> list[tuple[str, bytes]]:
    """Parse ``"keyid:base64[,keyid:base64...]"`` (one per line in a key file)."""
    keys = []
    for item in spec.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        key_id, sep, encoded = item.partition(":")
        if not sep or not key_id:
            raise CodecKeyError("codec keys must look like 'keyid:base64key'")
        try:
            keys.append((key_id, base64.b64decode(encoded, validate=True)))
        except ValueError:
            raise CodecKeyError(f"codec key {key_id!r} is not valid base64") from None
    return keys


def new_key_line(key_id: str) -> str:
    """A fresh random key in the key-file format, for `astra-ops dev` and `astra-ops keygen`."""
    return f"{key_id}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"
