"""The workflow sandbox, with the garbage collector held off while it imports.

On Python 3.10 and 3.11 a module's import lock is not re-entrant (CPython gh-91351), and the
workflow sandbox takes it with the pure-Python importer every time it loads a run's modules. If
the cyclic garbage collector runs inside that window and a finalizer imports something (a
never-awaited coroutine's warning does), the nested import clears the outer import's entry and
the outer one fails with ``KeyError: <thread id>``: "Failed validating workflow" when a worker
starts, or a failed workflow task (a failed run, since ``LookupError`` is one of
``workflows.errors.CODE_ERRORS``) when a run starts. CI met the first once (temporalio/sdk-python
#585, #1833). Holding the cyclic collector off while the sandbox loads modules or runs an
activation closes that window; reference counting still frees memory meanwhile, and the
collector catches up as soon as no sandbox is importing.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import temporalio.workflow
from temporalio.bridge.proto.workflow_activation import WorkflowActivation
from temporalio.bridge.proto.workflow_completion import WorkflowActivationCompletion
from temporalio.converter import SerializationContext, StorageDriverStoreContext
from temporalio.worker import WorkflowInstance, WorkflowInstanceDetails
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner


class _CollectorHold:
    """Cyclic GC off while any thread holds it: workflow tasks run on a pool of threads, and
    the collector is process-wide, so the last one out turns it back on (if it was on)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._was_enabled = False

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0 and self._was_enabled:
                    gc.enable()


collector = _CollectorHold()


class _HeldInstance(WorkflowInstance):
    """A sandboxed run whose activations (which may import modules first used mid-run) run
    with the collector held off.

    It also remembers the run's answers for payloads of no command (most of them: signals,
    queries, the run's input and result). The SDK asks them of the sandboxed run for every
    payload it encodes or decodes, each time by executing code inside the sandbox, and derives
    them from the run's namespace and ids only, which never change within a run: in an alert
    storm that asking was a fifth of the worker's CPU."""

    def __init__(self, inner: WorkflowInstance) -> None:
        self._inner = inner
        self._context: tuple[SerializationContext | None] | None = None
        self._store_context: StorageDriverStoreContext | None = None

    def activate(self, act: WorkflowActivation) -> WorkflowActivationCompletion:
        with collector.held():
            return self._inner.activate(act)

    def get_info(self) -> temporalio.workflow.Info:
        return self._inner.get_info()

    def get_thread_id(self) -> int | None:
        return self._inner.get_thread_id()

    # The SDK types ``command_info`` with a private class (``_command_aware_visitor``).
    def get_serialization_context(self, command_info: Any) -> SerializationContext | None:
        if command_info is not None:
            return self._inner.get_serialization_context(command_info)
        if self._context is None:
            self._context = (self._inner.get_serialization_context(None),)
        return self._context[0]

    def get_external_store_context(self, command_info: Any) -> StorageDriverStoreContext:
        if command_info is not None:
            return self._inner.get_external_store_context(command_info)
        if self._store_context is None:
            self._store_context = self._inner.get_external_store_context(None)
        return self._store_context


@dataclass(frozen=True)
class ImportSafeSandboxRunner(SandboxedWorkflowRunner):
    """The SDK's sandbox, creating and activating runs with the collector held off."""

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        with collector.held():
            return _HeldInstance(super().create_instance(det))
