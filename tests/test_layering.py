"""Production code never imports the sandbox: the simulated Astra is for `astra-ops dev`, its
commands, tests and benchmarks, and a worker or API deployed for real must not carry it."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

from runtime.settings import REPO_ROOT

PRODUCTION = ("runtime", "workflows", "activities", "workers", "starters")
# The dev stack and the sandbox's own commands run the simulation on purpose.
ALLOWED = {Path("starters/dev.py"), Path("starters/sandbox_cli.py")}


def parse(path: Path) -> ast.Module:
    """``ast.parse`` with the garbage collector held: a collection in the middle may finalize an
    evicted workflow's coroutine whose cleanup raises, and pytest's report of that ignored error
    parses source too (to point at the failing expression), which on CPython 3.11 breaks the
    outer parse: "AST constructor recursion depth mismatch" (pytest-dev/pytest#10763)."""
    gc.disable()
    try:
        return ast.parse(path.read_text())
    finally:
        gc.enable()


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_production_module_imports_the_sandbox() -> None:
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(
            n for n in imported(path) if n.split(".")[0] == "sandbox"
        )
        for package in PRODUCTION
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        if path.relative_to(REPO_ROOT) not in ALLOWED
    }
    assert {k: v for k, v in offenders.items() if v} == {}
