"""The custom search attributes every astra-ops run carries (DESIGN.md, Temporal conventions).

They are how people find runs: ``AstraAwaitingApproval = true`` lists every run that waits for a
person, in the UI and the CLI. The same keys are registered by the dev server and by
``astra-ops setup`` on a real cluster.
"""

from collections.abc import Iterable, Sequence
from typing import Any

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode

from runtime.errors import ConfigError

RUNBOOK = SearchAttributeKey.for_keyword("AstraRunbook")
STEP = SearchAttributeKey.for_keyword("AstraStep")
SEVERITY = SearchAttributeKey.for_keyword("AstraSeverity")
INCIDENT_ID = SearchAttributeKey.for_keyword("AstraIncidentId")
SERVICE = SearchAttributeKey.for_keyword("AstraService")
AWAITING_APPROVAL = SearchAttributeKey.for_bool("AstraAwaitingApproval")
IDEMPOTENCY_KEY = SearchAttributeKey.for_keyword("AstraIdempotencyKey")
"""sha256 of a start's Idempotency-Key, so a retried request finds the run it started."""

OUTCOME = SearchAttributeKey.for_keyword("AstraOutcome")
"""How a finished run ended (done, no_change, rejected, ...), so listings need no result."""
DRY_RUN = SearchAttributeKey.for_bool("AstraDryRun")

ALL = (
    RUNBOOK,
    STEP,
    SEVERITY,
    INCIDENT_ID,
    SERVICE,
    AWAITING_APPROVAL,
    IDEMPOTENCY_KEY,
    OUTCOME,
    DRY_RUN,
)
_TYPE_NAMES = {"KEYWORD": "Keyword", "BOOL": "Bool"}
"""How the Temporal CLI and tcld spell the index types astra-ops uses."""


def dev_server_flags() -> list[str]:
    """``--search-attribute`` flags that register every key on ``temporal server start-dev``."""
    flags = []
    for key in ALL:
        flags += ["--search-attribute", f"{key.name}={_TYPE_NAMES[key.indexed_value_type.name]}"]
    return flags


class SearchAttributesNotRegistered(ConfigError):
    """The namespace lacks keys astra-ops needs, or has them with another type, and this client
    may not fix that (Temporal Cloud lets no client add search attributes)."""


def tcld_command(namespace: str, keys: Iterable[SearchAttributeKey[Any]]) -> str:
    """The ``tcld`` command that creates ``keys`` on a Temporal Cloud namespace."""
    flags = " ".join(f"--sa {key.name}={_TYPE_NAMES[key.indexed_value_type.name]}" for key in keys)
    return f"tcld namespace search-attributes add --namespace {namespace} {flags}"


async def register_search_attributes(client: Client, namespace: str) -> None:
    """Add the keys a real cluster does not have yet (adding an existing key is an error).

    A key there with another type is not changed (Temporal cannot retype one; its runs would
    fail to set it), and where the server refuses to list or add keys, as Temporal Cloud does,
    the error says how to create them with ``tcld``.
    """
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
    except RPCError as err:
        raise _refused(err, namespace, ALL, "list") from None
    mistyped = sorted(
        key.name
        for key in ALL
        if existing.custom_attributes.get(key.name, key.indexed_value_type.value)
        != key.indexed_value_type.value
    )
    if mistyped:
        raise SearchAttributesNotRegistered(
            f"namespace {namespace} has the search attributes {', '.join(mistyped)} with another "
            "type than astra-ops sets: remove them (`temporal operator search-attribute remove`) "
            "and run `astra-ops setup` again"
        )
    missing = [key for key in ALL if key.name not in existing.custom_attributes]
    if missing:
        try:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(
                    namespace=namespace,
                    search_attributes={
                        key.name: IndexedValueType.ValueType(key.indexed_value_type.value)
                        for key in missing
                    },
                )
            )
        except RPCError as err:
            raise _refused(err, namespace, missing, "add") from None


def _refused(
    err: RPCError, namespace: str, keys: Sequence[SearchAttributeKey[Any]], verb: str
) -> Exception:
    """What to tell when the server would not ``verb`` search attributes for us."""
    if err.status not in (RPCStatusCode.PERMISSION_DENIED, RPCStatusCode.UNIMPLEMENTED):
        return err
    return SearchAttributesNotRegistered(
        f"Temporal refused to {verb} the search attributes of namespace {namespace} "
        f"({err.message}). On Temporal Cloud create them once with `"
        f"{tcld_command(namespace, keys)}`; on a self-hosted cluster, give this client's "
        "identity the admin role; then run `astra-ops setup` again"
    )
