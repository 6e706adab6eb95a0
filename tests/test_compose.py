"""The laptop stack's compose file (deploy/compose.yaml), checked without a container engine.

No engine runs on this machine, so `docker compose up` is never run here. Instead the file is
validated against the Compose Specification's JSON schema, its settings against the settings
model, and then its services are run as what they are, processes: each service's command, with
its environment, in the order its ``depends_on`` says, gated by its own healthcheck commands.
Every service shares the host's network in the file, so a process on this machine sees what the
container would, once the file's ports are moved to free ones and its volumes to folders (the
PostgreSQL and Redis services are the test session's). A run then goes through the API, waits for
an approval and completes, which takes the worker, the sandbox cluster, Temporal, `astra-ops
setup`'s search attributes and the codec, all wired as the file wires them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from runtime.settings import ENV_PREFIX, REPO_ROOT, Settings
from sandbox.servers import DataPlane
from sandbox.servers.process import free_port
from starters.api import CODEC_PATH
from starters.dev import DEV_TOKENS, alert_sender_setting
from tests.conftest_data import NewDatabase
from tests.conftest_dev import BOB
from tests.conftest_kube import eventually

COMPOSE_FILE = REPO_ROOT / "deploy" / "compose.yaml"
SCHEMA = REPO_ROOT / "tests" / "schemas" / "compose-spec.json"
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# The image's ENTRYPOINT (tests/test_container_image.py checks the Dockerfile says so).
IMAGE_ENTRYPOINT = ["astra-ops"]
OUR_IMAGES = ("astra-ops:",)
# Served by the session's data plane in the process run, not by a process of their own.
DATA_SERVICES = {"postgres", "redis"}
STARTUP_SECONDS = 90


def settings_of(service: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def file_settings() -> set[str]:
    """Settings checked to name an existing file, which exists only in the containers."""
    validator = Settings.__pydantic_decorators__.field_validators["_file_exists"]
    return set(validator.info.fields)


# ----- the file --------------------------------------------------------------------------------


def test_it_follows_the_compose_specification() -> None:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    problems = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(COMPOSE)]
    assert not problems, problems


def test_every_setting_is_real_and_valid() -> None:
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    files = file_settings()
    for name, service in SERVICES.items():
        values = settings_of(service)
        ours = {k: v for k, v in values.items() if k.startswith(ENV_PREFIX)}
        assert set(ours) <= fields, (name, set(ours) - fields)
        parsed = {
            key.removeprefix(ENV_PREFIX).lower(): value
            for key, value in ours.items()
            if key.removeprefix(ENV_PREFIX).lower() not in files
        }
        Settings.model_validate(parsed)  # raises naming the setting that does not parse


def test_the_api_knows_the_dev_people_and_the_ui_decodes_through_it() -> None:
    api = settings_of(SERVICES["api"])
    # As `make run`'s: the README's walk-through works against either.
    assert api[f"{ENV_PREFIX}API_TOKENS"] == DEV_TOKENS
    policy = REPO_ROOT / "deploy" / "access-policy.yaml"
    assert f"./{policy.name}:{api[f'{ENV_PREFIX}ACCESS_POLICY']}:ro" in SERVICES["api"]["volumes"]
    sender = alert_sender_setting(Settings(access_policy=policy))
    assert api[f"{ENV_PREFIX}ALERTMANAGER_TOKENS"] == sender["ALERTMANAGER_TOKENS"]
    api_address = f"http://{api.get(f'{ENV_PREFIX}API_HOST', '127.0.0.1')}:"
    codec = f"--ui-codec-endpoint={api_address}{api[f'{ENV_PREFIX}API_PORT']}{CODEC_PATH}"
    assert codec in SERVICES["temporal"]["command"]


def test_services_depend_on_what_exists_and_wait_on_what_can_tell() -> None:
    for name, service in SERVICES.items():
        assert service.get("network_mode") == "host", name  # loopback, as `astra-ops dev`
        for needed, how in (service.get("depends_on") or {}).items():
            assert needed in SERVICES, (name, needed)
            if how["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[needed], (name, needed)
            if how["condition"] == "service_completed_successfully":
                assert "restart" not in SERVICES[needed], (name, needed)
        image = service["image"]
        if not image.startswith(OUR_IMAGES):  # pinned to a release line, never `latest`
            repository, _, tag = image.rpartition(":")
            assert repository and tag and tag != "latest", image
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_FILE.parent / source).exists(), (name, source)
            else:
                assert source in COMPOSE["volumes"], (name, source)


def test_it_runs_every_worker_kind_the_manifests_deploy() -> None:
    commands = {tuple(s.get("command", [])) for s in SERVICES.values()}
    assert ("worker", "--kind", "standard") in commands
    assert ("worker", "--kind", "privileged") in commands


# ----- the services as processes ---------------------------------------------------------------


@dataclass
class Relocation:
    """The file's ports, volumes and data-plane URLs, moved to this test's."""

    ports: dict[str, str]
    paths: dict[str, str]
    urls: dict[str, str]
    key_prefix: str
    """Of the sandbox's Redis keys: the session's Redis is shared."""

    def __call__(self, text: str) -> str:
        for old, new in self.urls.items():
            text = text.replace(old, new)
        for old, new in self.paths.items():
            text = text.replace(old, new)
        for old, new in self.ports.items():
            text = re.sub(rf"(?<![\d.]){old}(?!\d)", new, text)
        return text


def relocation(tmp: Path, database: str, redis_url: str, key_prefix: str) -> Relocation:
    """Free ports for every port the file's services listen on, a folder for each volume, the
    repository's files for its bind mounts, and the session's PostgreSQL and Redis."""
    text = COMPOSE_FILE.read_text()
    ports = set(re.findall(r"127\.0\.0\.1:(\d+)", text)) | set(re.findall(r"port=(\d+)", text))
    ports |= {
        v for s in SERVICES.values() for k, v in settings_of(s).items() if k.endswith("_PORT")
    }
    data_urls = {
        k: v
        for s in SERVICES.values()
        for k, v in settings_of(s).items()
        if k in (f"{ENV_PREFIX}DATABASE_URL", f"{ENV_PREFIX}REDIS_URL")
    }
    data_ports = {port for url in data_urls.values() for port in re.findall(r":(\d+)/", url)}
    paths: dict[str, str] = {}
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                paths[target] = str((COMPOSE_FILE.parent / source).resolve())
            else:
                paths[target] = str(tmp / source)
                (tmp / source).mkdir(exist_ok=True)
    urls = {
        data_urls[f"{ENV_PREFIX}DATABASE_URL"]: database,
        data_urls[f"{ENV_PREFIX}REDIS_URL"]: redis_url,
    }
    return Relocation({p: str(free_port()) for p in ports - data_ports}, paths, urls, key_prefix)


def argv(service: Mapping[str, Any], moved: Callable[[str], str]) -> list[str]:
    entrypoint = service.get("entrypoint") or IMAGE_ENTRYPOINT
    return [moved(word) for word in [*entrypoint, *service.get("command", [])]]


def environment(service: Mapping[str, Any], moved: Relocation) -> dict[str, str]:
    """The process's environment: this machine's, without settings of its own, the venv's
    commands first (the image's PATH), and the service's, moved."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    venv = str(Path(sys.executable).parent)
    env = {**base, "PATH": f"{venv}:{base.get('PATH', '')}"}
    env.update({k: moved(v) for k, v in settings_of(service).items()})
    if any(k.startswith(ENV_PREFIX) for k in env):
        env[f"{ENV_PREFIX}REDIS_KEY_PREFIX"] = moved.key_prefix
    return env


def shell_words(words: list[str]) -> list[str]:
    """Compose's ``$$`` is a literal ``$``."""
    return [w.replace("$$", "$") for w in words]


def documented_exec() -> tuple[str, str]:
    """The service and the command of the `exec` the file's header shows."""
    [(service, command)] = re.findall(
        r"^# +docker compose -f deploy/compose\.yaml exec (\S+) (astra-ops .+)$",
        COMPOSE_FILE.read_text(),
        re.M,
    )
    return service, command


def order() -> list[str]:
    """The services in an order that starts each after what it depends on."""
    done: list[str] = []
    while len(done) < len(SERVICES):
        ready = [
            name
            for name, service in SERVICES.items()
            if name not in done and set(service.get("depends_on") or {}) <= set(done)
        ]
        assert ready, f"depends_on has a cycle among {set(SERVICES) - set(done)}"
        done += ready
    return done


@dataclass
class Stack:
    logs: Path
    moved: Relocation
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    def env(self, name: str) -> dict[str, str]:
        return environment(SERVICES[name], self.moved)

    async def start(self, name: str) -> None:
        with (self.logs / f"{name}.log").open("ab") as log:
            self.procs[name] = await asyncio.create_subprocess_exec(
                *shell_words(argv(SERVICES[name], self.moved)),
                env=self.env(name),
                cwd=self.logs,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    async def healthy(self, name: str) -> None:
        """Until the service's own healthcheck command succeeds."""
        check = SERVICES[name]["healthcheck"]["test"]
        assert check[0] == "CMD", check

        async def passes() -> bool:
            proc = self.procs[name]
            assert proc.returncode is None, f"{name} exited: {self.log(name)}"
            probe = await asyncio.create_subprocess_exec(
                *[self.moved(w) for w in check[1:]],
                env=self.env(name),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            return await probe.wait() == 0

        await eventually(passes, STARTUP_SECONDS, interval=0.5, message=f"{name} healthy")

    async def completed(self, name: str) -> None:
        code = await asyncio.wait_for(self.procs[name].wait(), STARTUP_SECONDS)
        assert code == 0, f"{name} exited with {code}: {self.log(name)}"

    async def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise AssertionError(f"{name} did not stop on SIGTERM: {self.log(name)}") from None


@asynccontextmanager
async def compose_up(tmp: Path, moved: Relocation) -> AsyncIterator[Stack]:
    """`docker compose up`, as processes: each service once what it depends on is healthy or
    has completed, as its condition says."""
    stack = Stack(tmp, moved)
    try:
        for name in order():
            if name in DATA_SERVICES:
                continue
            for needed, how in (SERVICES[name].get("depends_on") or {}).items():
                if needed in DATA_SERVICES:
                    continue
                if how["condition"] == "service_healthy":
                    await stack.healthy(needed)
                elif how["condition"] == "service_completed_successfully":
                    await stack.completed(needed)
            await stack.start(name)
        for name, service in SERVICES.items():
            if name not in DATA_SERVICES and "healthcheck" in service:
                await stack.healthy(name)
        yield stack
    finally:
        await stack.stop()


@pytest.mark.slow
async def test_the_services_run_a_runbook_together(
    tmp_path: Path, new_database: NewDatabase, data_servers: DataPlane, redis_prefix: str
) -> None:
    moved = relocation(tmp_path, await new_database(), data_servers.redis_url, redis_prefix)
    api_settings = settings_of(SERVICES["api"])
    api = f"http://127.0.0.1:{moved(api_settings[f'{ENV_PREFIX}API_PORT'])}"
    async with compose_up(tmp_path, moved) as stack:
        assert "keys in" in stack.log("init")
        assert "search attributes registered" in stack.log("setup")
        async with httpx.AsyncClient(base_url=api, timeout=30) as http:
            [ui_origin, *_] = moved(api_settings[f"{ENV_PREFIX}UI_ORIGINS"]).split(",")
            ui = (await http.get(f"{ui_origin}/api/v1/settings")).json()
            assert ui["Codec"]["Endpoint"] == api + CODEC_PATH, "the UI decodes through the API"
            # Alice starts it as the file's header shows, in a service's container.
            service, command = documented_exec()
            started = await asyncio.create_subprocess_exec(
                *shlex.split(stack.moved(command)),
                env=stack.env(service),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            output = (await asyncio.wait_for(started.communicate(), 60))[0].decode()
            assert started.returncode == 0, output
            [run_id] = re.findall(r"^(\S+) started", output, re.M)

            async def waiting() -> bool:
                approvals = (await http.get("/v1/approvals", headers=BOB)).json()
                return run_id in [a["run_id"] for a in approvals]

            await eventually(waiting, timeout=60, message="run awaiting approval")
            decided = await http.post(
                f"/v1/runs/{run_id}/decisions", json={"decision": "approve"}, headers=BOB
            )
            assert decided.status_code == 200, decided.text

            async def completed() -> bool:
                view = (await http.get(f"/v1/runs/{run_id}", headers=BOB)).json()
                return bool(view["state"] == "completed")

            await eventually(
                completed, timeout=90, message=f"run completed; worker: {stack.log('worker')}"
            )
        # Keys made once, for their owner only, and kept for the next `up`.
        for key in ("codec.keys", "openbao.token"):
            assert (tmp_path / "state" / key).stat().st_mode & 0o777 == 0o600, key
    for name, proc in stack.procs.items():
        if name not in ("init", "setup"):
            assert proc.returncode in (0, -signal.SIGTERM), (name, proc.returncode, stack.log(name))
