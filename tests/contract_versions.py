"""Pairs of message versions for the contract check: the project's own workflow inputs with a
change applied, and a small Astra message whose second version narrows it every way there is.
Importable as ``tests.contract_versions:Model``, as `astra-ops check-contracts` takes them."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field, create_model

from workflows.models import RunbookRequest
from workflows.task_health import TaskHealthRequest

RunbookRequestWithoutReason = create_model(
    "RunbookRequest",
    __config__=RunbookRequest.model_config,
    **{  # type: ignore[call-overload]  # the field set is only known at run time
        name: (info.annotation, info)
        for name, info in RunbookRequest.model_fields.items()
        if name != "reason"
    },
)
"""RunbookRequest after someone deleted ``reason``."""


class RunbookRequestReasonRetired(RunbookRequestWithoutReason):
    """The same deletion done as the model asks: runs started with a reason still decode."""

    retired: ClassVar[frozenset[str]] = frozenset({"reason"})


class TaskHealthRequestBeforeRetiring(TaskHealthRequest):
    """TaskHealthRequest as it was before ``poll_seconds`` was retired."""

    poll_seconds: float = Field(default=5.0, gt=0)


class Lease(BaseModel):
    worker_id: str
    until: str | None = None


class TaskV1(BaseModel):
    id: str
    status: Literal["pending", "running", "succeeded", "failed", "dead_letter"]
    retries: int = Field(default=0, ge=0)
    cost_usd: float | None = None
    shard: int | str = 0
    error: str = Field(default="", max_length=2000)
    lease: Lease | None = None
    tags: list[str] = []
    goal: str | None = None


class LeaseV2(BaseModel):
    worker_id: str
    until: str


class TaskV2(BaseModel):
    """TaskV1 narrowed in every way the check knows."""

    id: str
    status: Literal["pending", "running", "succeeded", "failed"]
    retries: int = Field(default=0, ge=1)
    cost_usd: int | None = None
    shard: int = 0
    error: str = Field(default="", max_length=200)
    lease: LeaseV2
    tags: list[str] = Field(default=[], max_length=8)
    tenant: str


class TaskV3(BaseModel):
    """TaskV1 widened only: every V1 message is a V3 message."""

    id: str
    status: Literal["pending", "running", "succeeded", "failed", "dead_letter", "cancelled"]
    retries: int = Field(default=0, ge=0)
    cost_usd: float | str | None = None
    shard: int | str = 0
    error: str = Field(default="", max_length=4000)
    lease: Lease | None = None
    tags: list[str] = []
    goal: str | None = None
    tenant: str = ""
