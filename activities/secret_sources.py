"""Where `vault-setup` reads the secrets it loads: a file, a directory, or environment variables.

The request names the source (a path, a prefix); the worker's settings bound what it may name: a
file or directory must lie under ``ASTRA_OPS_VAULT_SOURCE_ROOT`` once every link is resolved,
and a prefix must start with ``ASTRA_OPS_VAULT_SOURCE_ENV_PREFIX``. A request can so choose
among the secrets the operators put there, never read the worker's own files or settings.

Errors name the source, the line or the key, never a value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from runtime.errors import ConfigError

SourceKind = Literal["file", "directory", "env"]
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
MAX_VALUE_BYTES = 64 * 1024


SOURCE_PATTERN = r"^(file|directory|env):[^\x00-\x1f]{1,512}$"
"""A source as a request names it: ``file:NAME``, ``directory:NAME`` or ``env:PREFIX``."""


class SecretSource(BaseModel):
    """A source of secrets, by name only: the values are read by the activity that loads them."""

    kind: SourceKind
    name: str = Field(min_length=1, max_length=512)

    @classmethod
    def parse(cls, text: str) -> SecretSource:
        """``file:NAME`` (KEY=value lines), ``directory:NAME`` (one file per key, named after
        it, as Kubernetes mounts a Secret) or ``env:PREFIX`` (variables, the prefix removed);
        NAME is relative to ASTRA_OPS_VAULT_SOURCE_ROOT."""
        if not re.fullmatch(SOURCE_PATTERN, text):
            raise SourceError(
                f"{text[:64]!r} is not a source: file:NAME, directory:NAME or env:PREFIX"
            )
        kind, _, name = text.partition(":")
        return cls(kind=kind, name=name)

    def describe(self) -> str:
        return f"{self.kind} {self.name}"


class SourceError(ConfigError):
    """The source is not allowed, missing, or not key/value pairs."""


def _key(key: str, where: str) -> str:
    if not KEY.fullmatch(key):
        raise SourceError(
            f"{where}: {key[:64]!r} is not a key name (letters, digits, '_', '.', '-'; at most 128)"
        )
    return key


def _value(value: str, where: str) -> str:
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise SourceError(f"{where}: the value is over {MAX_VALUE_BYTES} bytes")
    return value


def _under(root: Path | None, name: str) -> Path:
    if root is None:
        raise SourceError(
            "ASTRA_OPS_VAULT_SOURCE_ROOT is not set, so this worker reads no secret files: set it "
            "to the folder that holds them"
        )
    base = root.resolve()
    target = (base / name).resolve()
    if Path(name).is_absolute() or not target.is_relative_to(base):
        raise SourceError(
            f"{name} is outside ASTRA_OPS_VAULT_SOURCE_ROOT ({base}); name a file or directory "
            "under it, relative to it"
        )
    return target


def _file(path: Path, name: str) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError as e:
        raise SourceError(f"cannot read {name}: {e.strerror}") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        where = f"{name} line {number}"
        if not sep:
            raise SourceError(f"{where} is not KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[_key(key.strip(), where)] = _value(value, where)
    return values


def _directory(path: Path, root: Path, name: str) -> dict[str, str]:
    if not path.is_dir():
        raise SourceError(f"{name} is not a directory under ASTRA_OPS_VAULT_SOURCE_ROOT")
    values: dict[str, str] = {}
    for entry in sorted(path.iterdir()):
        # Kubernetes' Secret volumes keep their bookkeeping in dot-entries (..data).
        if entry.name.startswith(".") or not entry.is_file():
            continue
        where = f"{name}/{entry.name}"
        if not entry.resolve().is_relative_to(root.resolve()):
            raise SourceError(f"{where} links outside ASTRA_OPS_VAULT_SOURCE_ROOT")
        try:
            value = entry.read_text().removesuffix("\n")
        except (OSError, UnicodeDecodeError):
            raise SourceError(f"cannot read {where} as text") from None
        values[_key(entry.name, where)] = _value(value, where)
    return values


def _environment(prefix: str, allowed: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    if allowed is None:
        raise SourceError(
            "ASTRA_OPS_VAULT_SOURCE_ENV_PREFIX is not set, so this worker reads no environment "
            "variables as secrets: set it to the prefix they share"
        )
    if not prefix.startswith(allowed):
        raise SourceError(
            f"the prefix {prefix} does not start with ASTRA_OPS_VAULT_SOURCE_ENV_PREFIX "
            f"({allowed}); name variables under it"
        )
    return {
        _key(name.removeprefix(prefix), f"variable {name}"): _value(value, f"variable {name}")
        for name, value in sorted(environ.items())
        if name.startswith(prefix) and len(name) > len(prefix)
    }


def read_source(
    source: SecretSource,
    root: Path | None,
    env_prefix: str | None,
    environ: Mapping[str, str],
) -> dict[str, str]:
    """The key/value pairs of ``source``; an empty source is an error (loading nothing is
    never what the operator meant)."""
    if source.kind == "env":
        values = _environment(source.name, env_prefix, environ)
    else:
        path = _under(root, source.name)
        assert root is not None
        values = (
            _file(path, source.name)
            if source.kind == "file"
            else _directory(path, root, source.name)
        )
    if not values:
        raise SourceError(f"{source.describe()} holds no secrets")
    return values
