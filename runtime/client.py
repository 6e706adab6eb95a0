"""The one Temporal client factory: every process connects and converts payloads the same way.

The Temporal SDK is imported when a client or converter is made, not when this module is: the
CLI reaches for ``TemporalUnavailable`` on every command, and only dev mode talks to Temporal.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.settings import Settings

if TYPE_CHECKING:
    from temporalio.client import Client
    from temporalio.converter import DataConverter
    from temporalio.service import TLSConfig

    from runtime.telemetry import Telemetry


class TemporalUnavailable(Exception):
    """Temporal could not be reached; the message says where we looked and what to check."""


def data_converter(settings: Settings) -> DataConverter:
    """:func:`plain_data_converter`, sealed by the AES-GCM codec.

    Histories written without the codec still decode: the converter reads either form.
    """
    from runtime.codec import load_codec

    codec = load_codec(
        settings.codec_keys.get_secret_value() if settings.codec_keys else None,
        settings.codec_key_file or dev_key_file(settings),
    )
    return dataclasses.replace(plain_data_converter(), payload_codec=codec)


def plain_data_converter() -> DataConverter:
    """pydantic v2 models on the wire; failures with their message and stack trace encoded.

    Failure messages and stack traces are payloads, so the codec seals them too: an error quotes
    whatever it was handed (a URL, a row), and the stock failure converter would store that in
    plaintext. Without a codec this is what stored histories are recorded and replayed with
    (tests/histories): the codec only wraps payloads and has no part in determinism.
    """
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.converter import DefaultFailureConverterWithEncodedAttributes

    return dataclasses.replace(
        pydantic_data_converter,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def dev_key_file(settings: Settings) -> Path | None:
    """The key `astra-ops dev` generated, so CLI commands beside it need no key setting."""
    path = settings.state_dir / "codec.keys"
    return path if path.is_file() else None


def dev_stack_marker(settings: Settings) -> Path:
    """Written by `astra-ops dev` while it runs: the CLI beside it is in dev mode, and
    :func:`dev_stack` reads from it where the stack's API is and each person's dev token."""
    return settings.state_dir / "dev-mode"


@dataclass(frozen=True)
class DevStack:
    """Where the running `astra-ops dev` serves its API, and the dev token of each person.

    The CLI beside the stack goes through this API as `--as NAME`'s token: one connection-free
    HTTP request costs a command far less than loading Temporal's client, and the API applies
    the same checks it applies to everyone."""

    api_url: str
    tokens: dict[str, str]
    """user -> token"""

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({"api_url": self.api_url, "tokens": self.tokens}, indent=2))
        path.chmod(0o600)


def dev_stack(settings: Settings) -> DevStack | None:
    """The running dev stack's marker, or None when there is none or it names no API."""
    try:
        data = json.loads(dev_stack_marker(settings).read_text())
        return DevStack(api_url=str(data["api_url"]), tokens=dict(data["tokens"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tls(settings: Settings) -> TLSConfig | bool:
    from temporalio.service import TLSConfig

    if not settings.temporal_tls:
        return False

    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path is not None else None

    return TLSConfig(
        server_root_ca_cert=read(settings.temporal_tls_ca),
        client_cert=read(settings.temporal_tls_cert),
        client_private_key=read(settings.temporal_tls_key),
    )


async def connect(
    settings: Settings,
    *,
    converter: DataConverter | None = None,
    telemetry: Telemetry | None = None,
) -> Client:
    """A client of the configured Temporal; with ``telemetry`` (the worker's, the API's: see
    runtime/telemetry.py), on its runtime and traced by its interceptors, which a worker made
    from this client inherits."""
    from temporalio.client import Client

    api_key = settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None
    try:
        return await Client.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=converter or data_converter(settings),
            tls=_tls(settings) if api_key is None else (_tls(settings) or True),
            api_key=api_key,
            runtime=telemetry.runtime if telemetry else None,
            interceptors=telemetry.interceptors if telemetry else (),
        )
    except RuntimeError as err:
        # The core's message nests the transport error; its last clause is the useful part.
        why = str(err).rsplit("message: ", 1)[-1].split('"')[1 if '"' in str(err) else 0]
        raise TemporalUnavailable(
            f"Temporal is not reachable at {settings.temporal_address} "
            f"(namespace {settings.temporal_namespace}): {why}. "
            "Is `astra-ops dev` running, or ASTRA_OPS_TEMPORAL_ADDRESS set?"
        ) from None
