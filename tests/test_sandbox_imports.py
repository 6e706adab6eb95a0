"""The workflow sandbox survives a garbage collection whose finalizer imports mid-import, and
asks a run for its contexts no more than it must.

CI once failed a worker's start with "Failed validating workflow worker-lost" (``KeyError:
<thread id>`` inside ``importlib``; workers/sandbox.py says why). These tests make that collection
happen at nearly every allocation, as the flake needs it to happen once.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import temporalio.workflow
from temporalio.api.enums.v1 import CommandType
from temporalio.bridge.proto.workflow_activation import WorkflowActivation
from temporalio.bridge.proto.workflow_completion import WorkflowActivationCompletion
from temporalio.converter import (
    SerializationContext,
    StorageDriverStoreContext,
    WorkflowSerializationContext,
)
from temporalio.worker import WorkflowInstance
from temporalio.worker._command_aware_visitor import CommandInfo
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from workers.sandbox import _HeldInstance, collector
from workers.worker import workflow_options, workflow_runner


class _ImportingFinalizer:
    """Garbage in a reference cycle whose finalizer imports a module (what a never-awaited
    coroutine's warning does) and leaves another such cycle behind, until told to stop."""

    live = True

    def __init__(self) -> None:
        self.cycle = self

    def __del__(self) -> None:
        with contextlib.suppress(ImportError):  # it takes the module's import lock, then fails
            importlib.import_module("astra_ops_no_such_module")
        if _ImportingFinalizer.live:
            _ImportingFinalizer()


@pytest.fixture
def collections_that_import() -> Iterator[None]:
    """A collection at nearly every allocation, each running a finalizer that imports."""
    threshold = gc.get_threshold()
    _ImportingFinalizer.live = True
    _ImportingFinalizer()
    gc.set_threshold(1)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        _ImportingFinalizer.live = False
        gc.collect()


def definitions() -> list[temporalio.workflow._Definition]:
    return [
        temporalio.workflow._Definition.must_from_class(cls)
        for cls in workflow_options()["workflows"]
    ]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="CPython 3.12 made the lock re-entrant")
@pytest.mark.usefixtures("collections_that_import")
async def test_the_sdk_sandbox_alone_fails_validation_under_such_collections() -> None:
    """The condition is real: without the hold, validating a runbook fails as CI's did (the
    worker wraps this ``KeyError`` in "Failed validating workflow")."""
    sdk_runner = SandboxedWorkflowRunner(restrictions=workflow_runner().restrictions)
    with pytest.raises(KeyError):
        for _ in range(5):
            sdk_runner.prepare_workflow(definitions()[0])


@pytest.mark.usefixtures("collections_that_import")
async def test_every_workflow_validates_in_our_sandbox_under_such_collections() -> None:
    runner = workflow_runner()
    for definition in definitions():
        runner.prepare_workflow(definition)
    assert gc.isenabled()


def test_the_collector_comes_back_on_only_when_the_last_holder_leaves() -> None:
    entered, release = threading.Barrier(3), threading.Event()

    def hold() -> None:
        with collector.held():
            entered.wait()
            release.wait()

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    entered.wait()
    assert not gc.isenabled()
    with collector.held():
        release.set()
        for thread in threads:
            thread.join()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_already_off_stays_off() -> None:
    gc.disable()
    try:
        with collector.held():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


class _CountingRun(WorkflowInstance):
    """A run that says which serialization and store contexts it was asked for."""

    def __init__(self) -> None:
        self.asked: list[object] = []

    def activate(self, act: WorkflowActivation) -> WorkflowActivationCompletion:
        raise NotImplementedError

    def get_serialization_context(self, command_info: Any) -> SerializationContext | None:
        self.asked.append(("serialization", command_info))
        if command_info is None:
            return WorkflowSerializationContext(namespace="default", workflow_id="wf")
        return None

    def get_external_store_context(self, command_info: Any) -> StorageDriverStoreContext:
        self.asked.append(("store", command_info))
        return StorageDriverStoreContext(target=None)

    def get_info(self) -> temporalio.workflow.Info:
        raise NotImplementedError


def test_a_run_is_asked_its_no_command_contexts_once_and_each_command_every_time() -> None:
    inner = _CountingRun()
    held = _HeldInstance(inner)
    command = CommandInfo(CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK, command_seq=1)

    contexts = [held.get_serialization_context(None) for _ in range(3)]
    for _ in range(3):
        held.get_external_store_context(None)
    assert held.get_serialization_context(command) is None
    assert held.get_serialization_context(command) is None

    assert contexts == [WorkflowSerializationContext(namespace="default", workflow_id="wf")] * 3
    assert inner.asked == [
        ("serialization", None),
        ("store", None),
        ("serialization", command),
        ("serialization", command),
    ]
