"""The worker registers every activity its activity classes define, and some workflow calls each.

Registrations are derived from the classes (``workers.worker.activities_of``), so none can be
forgotten; this test is what makes a dead one show up, and a workflow calling an activity no
worker registers (its run would wait forever for a worker that has it).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from typing import Any

from temporalio import activity
from temporalio.client import Client

import workflows
from activities.privilege import is_privileged
from runtime.settings import Settings
from workers.worker import activities_of, privileged_activities, standard_activities


def called_by_workflows() -> dict[str, str]:
    """Activity name -> a workflow module that refers to it (``SomeActivities.method``)."""
    called: dict[str, str] = {}
    for info in pkgutil.iter_modules(workflows.__path__):
        module = importlib.import_module(f"{workflows.__name__}.{info.name}")
        names = vars(module)
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
                continue
            owner = names.get(node.value.id)
            method = getattr(owner, node.attr, None) if inspect.isclass(owner) else None
            definition = activity._Definition.from_callable(method) if callable(method) else None
            if definition is not None and definition.name is not None:
                called.setdefault(definition.name, module.__name__)
    return called


def names(activities: list[Any]) -> list[str | None]:
    return [activity._Definition.must_from_callable(f).name for f in activities]


async def test_every_registered_activity_is_called_by_a_workflow_and_every_call_registered(
    client: Client, settings: Settings
) -> None:
    standard = activities_of(*standard_activities(client, settings))
    async with privileged_activities(settings) as rights:
        privileged = activities_of(*rights)
    every = names(standard) + names(privileged)
    registered = set(every)
    called = called_by_workflows()
    assert len(registered) == len(every), "two activities share a name"
    unused = registered - set(called)
    assert not unused, (
        f"registered, but no module of workflows/ calls {sorted(map(str, unused))}: remove the "
        "activity (and its tests), or call it from the runbook that needs it"
    )
    unregistered = {name: where for name, where in called.items() if name not in registered}
    assert not unregistered, (
        f"workflows call activities the worker does not register: {unregistered}; give their "
        "class's instance to activities_of in workers/worker.py"
    )
    # Each kind of worker registers exactly what the runs send to its task queue.
    assert not [a.__qualname__ for a in standard if is_privileged(a)]
    assert all(is_privileged(a) for a in privileged)
