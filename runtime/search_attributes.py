"""The custom search attributes every astra-ops run carries (DESIGN.md, Temporal conventions).

They are how people find runs: ``AstraAwaitingApproval = true`` lists every run that waits for a
person, in the UI and the CLI. The same keys are registered by the dev server and by
``astra-ops setup`` on a real cluster.
"""

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.common import SearchAttributeKey

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


def dev_server_flags() -> list[str]:
    """``--search-attribute`` flags that register every key on ``temporal server start-dev``."""
    kinds = {"KEYWORD": "Keyword", "BOOL": "Bool"}
    flags = []
    for key in ALL:
        flags += ["--search-attribute", f"{key.name}={kinds[key.indexed_value_type.name]}"]
    return flags


async def register_search_attributes(client: Client, namespace: str) -> None:
    """Add the keys a real cluster does not have yet (adding an existing key is an error)."""
    existing = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    missing = {
        key.name: IndexedValueType.ValueType(key.indexed_value_type.value)
        for key in ALL
        if key.name not in existing.custom_attributes
    }
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )
