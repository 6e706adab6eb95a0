"""Stub activities under the real activities' names, answering what a test tells them.

A runbook's branches are decided by what its activities answer. With stubs registered under the
real names, as the Temporal samples test workflows, every branch runs on the session's dev server
without PostgreSQL, Redis or the sandbox cluster, and a test can say which activities the run
called, in which order, with which arguments. Each stub's name and argument type are read from
the real method's definition, so renaming an activity breaks these tests instead of leaving a
stub that nothing calls.

The access activities that need no database stay real (the policy file and the dev server are all
they use), so starts, approvals and signatures are checked as in production; the budget of
unattended actions, kept in PostgreSQL, is stubbed like any other activity.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

import pytest
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.types import MethodAsyncSingleParam, MethodSyncSingleParam
from temporalio.worker import Worker

import activities
from activities.access import AccessActivities, Trust
from activities.communication import CommunicationActivities
from activities.notify import NotifyActivities
from activities.privilege import is_privileged, privileged_queue
from runtime.identity import parse_trusted_keys
from runtime.settings import REPO_ROOT
from tests.helpers import TEST_SIGNER
from workers.worker import workflow_options

A = TypeVar("A")
R = TypeVar("R")

POLICY = REPO_ROOT / "deploy" / "access-policy.yaml"


def name_of(real: Callable[..., Any]) -> str:
    """The name a real activity method is registered under."""
    name = activity._Definition.must_from_callable(real).name
    assert name is not None, f"{real.__qualname__} is a dynamic activity"
    return name


def every_activity() -> Iterator[Callable[..., Any]]:
    """Every ``@activity.defn`` method of every class in ``activities/``: what a worker runs."""
    for info in pkgutil.iter_modules(activities.__path__):
        module = importlib.import_module(f"{activities.__name__}.{info.name}")
        for owner in vars(module).values():
            if inspect.isclass(owner) and owner.__module__ == module.__name__:
                for _, function in inspect.getmembers(owner, inspect.isfunction):
                    if activity._Definition.from_callable(function) is not None:
                        yield function


@dataclass(frozen=True)
class Call:
    activity: str
    arg: Any


class Stubs:
    """Canned answers per activity, and every call the runs made, in order."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._answers: dict[str, list[Any]] = {}

    @overload
    def answer(self, real: MethodAsyncSingleParam[Any, A, R], *answers: R | Exception) -> None: ...

    @overload
    def answer(self, real: MethodSyncSingleParam[Any, A, R], *answers: R | Exception) -> None: ...

    def answer(self, real: Callable[..., Any], *answers: Any) -> None:
        """Answer the calls of ``real`` with these, in order, the last one from then on; an
        exception is raised as the activity's failure."""
        assert answers, "give at least one answer"
        self._answers[name_of(real)] = list(answers)

    @overload
    def args(self, real: MethodAsyncSingleParam[Any, A, Any]) -> list[A]: ...

    @overload
    def args(self, real: MethodSyncSingleParam[Any, A, Any]) -> list[A]: ...

    def args(self, real: Callable[..., Any]) -> list[Any]:
        """What each call of ``real`` was given, in order."""
        name = name_of(real)
        return [c.arg for c in self.calls if c.activity == name]

    def called(self) -> list[str]:
        """The activities called, in order."""
        return [c.activity for c in self.calls]

    def _respond(self, name: str, arg: Any) -> Any:
        self.calls.append(Call(name, arg))
        answers = self._answers.get(name)
        if not answers:
            raise ApplicationError(
                f"the test gave no answer for activity {name} (called with {arg!r})",
                type="Unstubbed",
                non_retryable=True,
            )
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def standing_in(self, real: Sequence[Callable[..., Any]]) -> list[Callable[..., Any]]:
        """These activities, with those this test answers replaced by their stubs."""
        return [self.stub(r) if name_of(r) in self._answers else r for r in real]

    def stub(self, real: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        """An activity named and typed as ``real``, answering from this test's answers."""
        definition = activity._Definition.must_from_callable(real)
        name = name_of(real)
        if definition.arg_types:

            async def with_arg(arg: Any) -> Any:
                return self._respond(name, arg)

            function: Callable[..., Awaitable[Any]] = with_arg
            function.__annotations__ = {"arg": definition.arg_types[0]}
        else:

            async def without_arg() -> Any:
                return self._respond(name, None)

            function = without_arg
        function.__annotations__["return"] = definition.ret_type
        return activity.defn(name=name)(function)


@asynccontextmanager
async def stubbed_worker(
    client: Client, task_queue: str, stubs: Stubs, policy: Path = POLICY
) -> AsyncIterator[Worker]:
    """Every runbook on ``task_queue``, with the real access activities under ``policy`` (trusting
    the tests' signing key, as production trusts the API's) and stubs for everything else."""
    trust = Trust(dev_mode=False, keys=parse_trusted_keys(TEST_SIGNER.public_line()))
    notify = NotifyActivities(policy, CommunicationActivities(state_dsn=""))  # no receivers
    access = AccessActivities(policy, trust, client, notify, state_dsn="")
    real: list[Callable[..., Any]] = [access.admit, access.request_approval, access.freeze_state]
    kept = {name_of(r) for r in real}
    stubbed = [f for f in every_activity() if name_of(f) not in kept]
    # Each stub where the runs send its activity: the privileged ones on their own queue.
    async with (
        Worker(
            client,
            task_queue=task_queue,
            activities=[*real, *(stubs.stub(f) for f in stubbed if not is_privileged(f))],
            **workflow_options(),
        ) as worker,
        Worker(
            client,
            task_queue=privileged_queue(task_queue),
            activities=[stubs.stub(f) for f in stubbed if is_privileged(f)],
        ),
    ):
        yield worker


@pytest.fixture
async def stubs(client: Client, task_queue: str) -> AsyncIterator[Stubs]:
    """This test's stubs, serving its task queue under the example access policy."""
    answers = Stubs()
    async with stubbed_worker(client, task_queue, answers):
        yield answers
