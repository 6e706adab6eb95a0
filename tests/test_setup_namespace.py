"""`astra-ops setup` on a namespace it cannot simply fill: keys there with another type, and a
server that lets no client add keys (Temporal Cloud), where it says how to create them.

Running setup twice on a fresh namespace and databases is tests/test_cli.py's
``test_setup_migrates_both_databases_and_registers_search_attributes_and_schedules_once``.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any, cast

import pytest
from google.protobuf.duration_pb2 import Duration
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
    ListSearchAttributesResponse,
)
from temporalio.api.workflowservice.v1 import RegisterNamespaceRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from runtime import search_attributes as sa


async def fresh_namespace(client: Client) -> str:
    namespace = f"setup-{uuid.uuid4().hex[:8]}"
    await client.workflow_service.register_namespace(
        RegisterNamespaceRequest(
            namespace=namespace, workflow_execution_retention_period=Duration(seconds=86400)
        )
    )
    return namespace


async def test_a_key_there_with_another_type_is_named_and_left_alone(client: Client) -> None:
    namespace = await fresh_namespace(client)
    text = IndexedValueType.INDEXED_VALUE_TYPE_TEXT
    await client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(namespace=namespace, search_attributes={sa.RUNBOOK.name: text})
    )
    with pytest.raises(sa.SearchAttributesNotRegistered, match=f"{sa.RUNBOOK.name} with another"):
        await sa.register_search_attributes(client, namespace)
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    assert dict(listed.custom_attributes) == {sa.RUNBOOK.name: text}  # nothing added or changed


class RefusingOperator:
    """A server's operator service that lists what it has and refuses to add more, as Temporal
    Cloud answers a namespace's own credentials."""

    def __init__(self, has: dict[str, int]) -> None:
        self.has = has

    async def list_search_attributes(self, _: ListSearchAttributesRequest) -> Any:
        return ListSearchAttributesResponse(
            custom_attributes={k: IndexedValueType.ValueType(v) for k, v in self.has.items()}
        )

    async def add_search_attributes(self, _: AddSearchAttributesRequest) -> Any:
        raise RPCError("Request unauthorized.", RPCStatusCode.PERMISSION_DENIED, b"")


async def test_where_no_client_may_add_keys_setup_prints_the_tcld_command() -> None:
    there = {sa.RUNBOOK.name: sa.RUNBOOK.indexed_value_type.value}
    cloud = cast(Client, SimpleNamespace(operator_service=RefusingOperator(there)))
    with pytest.raises(sa.SearchAttributesNotRegistered) as refused:
        await sa.register_search_attributes(cloud, "astra-ops.a1b2c")
    message = str(refused.value)
    command = message.split("`")[1]
    assert command.startswith("tcld namespace search-attributes add --namespace astra-ops.a1b2c ")
    # Only what is missing, each with the type as the Temporal CLI and tcld spell it.
    typed = sa.dev_server_flags()[1::2]  # "AstraRunbook=Keyword", ... in sa.ALL's order
    assert command.split()[6:] == [
        word
        for flag in typed
        if not flag.startswith(f"{sa.RUNBOOK.name}=")
        for word in ("--sa", flag)
    ]
    assert "Request unauthorized" in message


async def test_with_all_keys_there_setup_needs_no_right_to_add() -> None:
    there = {key.name: key.indexed_value_type.value for key in sa.ALL}
    cloud = cast(Client, SimpleNamespace(operator_service=RefusingOperator(there)))
    await sa.register_search_attributes(cloud, "astra-ops.a1b2c")  # adds nothing, so no refusal
