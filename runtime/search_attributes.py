"""The custom search attributes every astra-ops run carries (DESIGN.md, Temporal conventions).

They are how people find runs: ``AstraAwaitingApproval = true`` lists every run that waits for a
person, in the UI and the CLI. The same keys are registered by the dev server and by
``astra-ops setup`` on a real cluster.
"""

from temporalio.common import SearchAttributeKey

RUNBOOK = SearchAttributeKey.for_keyword("AstraRunbook")
STEP = SearchAttributeKey.for_keyword("AstraStep")
SEVERITY = SearchAttributeKey.for_keyword("AstraSeverity")
INCIDENT_ID = SearchAttributeKey.for_keyword("AstraIncidentId")
SERVICE = SearchAttributeKey.for_keyword("AstraService")
AWAITING_APPROVAL = SearchAttributeKey.for_bool("AstraAwaitingApproval")

ALL = (RUNBOOK, STEP, SEVERITY, INCIDENT_ID, SERVICE, AWAITING_APPROVAL)


def dev_server_flags() -> list[str]:
    """``--search-attribute`` flags that register every key on ``temporal server start-dev``."""
    kinds = {"KEYWORD": "Keyword", "BOOL": "Bool"}
    flags = []
    for key in ALL:
        flags += ["--search-attribute", f"{key.name}={kinds[key.indexed_value_type.name]}"]
    return flags
