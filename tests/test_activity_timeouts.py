"""Every activity call allowed longer than a short one heartbeats.

A call given a start-to-close timeout beyond ``DEFAULT_TIMEOUT`` gets a heartbeat timeout of a few
seconds (workflows/timeouts.py), so that a worker dying inside it is noticed within seconds. Its
activity must then heartbeat (activities/heartbeats.py), or each attempt would time out after
``HEARTBEAT_TIMEOUT`` however well it went. Read from the source: each call in a workflow that
sets its own start-to-close timeout, and the activity method it names.
"""

from __future__ import annotations

import ast
import inspect
import pkgutil
import re
from importlib import import_module

import pytest

import activities
from runtime.settings import REPO_ROOT

SHORT = {"DEFAULT_TIMEOUT", "ADMIT_TIMEOUT", "start_to_close_timeout"}
"""Timeouts that are a short call's (admission is a local activity), or passed on as given."""
HEARTBEATS = re.compile(r"\b(beat|heartbeating|heartbeating_sync|activity\.heartbeat)\(")
ACTIVITY = re.compile(r"(\w+Activities)\.(\w+)")


def long_calls() -> list[tuple[str, str]]:
    """(where, ``Class.method``) of each call that sets a start-to-close timeout of its own."""
    found = []
    for path in sorted((REPO_ROOT / "workflows").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            timeout = next(
                (k.value for k in node.keywords if k.arg == "start_to_close_timeout"), None
            )
            if timeout is None or ast.unparse(timeout) in SHORT:
                continue
            named = [ast.unparse(a) for a in node.args if ACTIVITY.fullmatch(ast.unparse(a))]
            assert named, f"{path.name}:{node.lineno} names no activity method"
            found.append((f"{path.name}:{node.lineno}", named[0]))
    return found


def activity_classes() -> dict[str, type]:
    classes: dict[str, type] = {}
    for module in pkgutil.iter_modules(activities.__path__):
        loaded = import_module(f"activities.{module.name}")
        classes |= {name: c for name, c in vars(loaded).items() if name.endswith("Activities")}
    return classes


def heartbeats(cls: type, method: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether the method heartbeats, itself or through another method of its class it calls."""
    source = inspect.getsource(getattr(cls, method))
    if HEARTBEATS.search(source):
        return True
    called = set(re.findall(r"self\.(\w+)\(", source)) - seen - {method}
    return any(heartbeats(cls, other, seen | {method}) for other in called if hasattr(cls, other))


def test_the_workflows_make_long_calls() -> None:
    """The reading below finds what it looks for (a rollout wait is a long call)."""
    assert "KubernetesActivities.wait_rollout" in {call for _, call in long_calls()}


@pytest.mark.parametrize(("where", "call"), long_calls(), ids=[w for w, _ in long_calls()])
def test_a_long_call_heartbeats(where: str, call: str) -> None:
    class_name, method = call.split(".")
    assert heartbeats(activity_classes()[class_name], method), (
        f"{where} gives {call} longer than DEFAULT_TIMEOUT, so it runs with a heartbeat "
        "timeout; make it heartbeat (activities/heartbeats.py: beat, heartbeating)"
    )
