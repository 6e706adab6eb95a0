"""Debian's Prometheus and Alertmanager, run by tests on free loopback ports with the project's own
configs (deploy/prometheus, deploy/alertmanager), changed only where a test cannot wait minutes:
the intervals, and the addresses and credentials of this machine."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
import yaml

from runtime.settings import REPO_ROOT
from sandbox.servers.process import free_port
from tests.conftest_kube import eventually

ALERTMANAGER_CONFIG = REPO_ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yaml"


def alertmanager_config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    return loaded


def program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed, so the real alerting chain cannot run: `apt-get install "
            "prometheus prometheus-alertmanager` (.ci/run installs them where they are missing)"
        )
    return found


@asynccontextmanager
async def on_loopback(app: Any) -> AsyncIterator[str]:
    """An ASGI app served on a free loopback port until the block ends; its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())

    async def started() -> bool:
        if serving.done():
            serving.result()  # its error, if it could not start
        return server.started

    await eventually(started, timeout=10, message="the app is serving")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


@asynccontextmanager
async def _serving(name: str, *args: str, url: str) -> AsyncIterator[str]:
    """``name`` run with ``args`` until the block ends, once ``url``/-/ready answers; ``url``."""
    process = await asyncio.create_subprocess_exec(
        program(name),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient() as http:

            async def ready() -> bool:
                if process.returncode is not None:
                    raise AssertionError(f"{name} exited with {process.returncode}")
                try:
                    return (await http.get(f"{url}/-/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, timeout=20, interval=0.1, message=f"{name} is ready")
        yield url
    finally:
        process.terminate()
        await process.wait()


@asynccontextmanager
async def alertmanager(api_url: str, token: str, workdir: Path) -> AsyncIterator[str]:
    """Alertmanager with deploy/alertmanager's config, posting to the API at ``api_url`` with
    ``token``, grouping within a second instead of 30 s and a minute; its own URL."""
    (workdir / "token").write_text(token)
    ours = alertmanager_config()
    ours["route"].update(group_wait="1s", group_interval="1s")
    (hook,) = ours["receivers"][0]["webhook_configs"]
    hook["url"] = api_url + urlsplit(hook["url"]).path
    hook["http_config"]["authorization"]["credentials_file"] = str(workdir / "token")
    (workdir / "alertmanager.yml").write_text(yaml.safe_dump(ours))
    url = f"http://127.0.0.1:{free_port()}"
    async with _serving(
        "prometheus-alertmanager",
        f"--config.file={workdir / 'alertmanager.yml'}",
        f"--storage.path={workdir / 'alertmanager-data'}",
        f"--web.listen-address={url.removeprefix('http://')}",
        "--cluster.listen-address=",
        url=url,
    ):
        yield url


@asynccontextmanager
async def prometheus(metrics_url: str, alertmanager_url: str, workdir: Path) -> AsyncIterator[str]:
    """Prometheus scraping ``metrics_url`` and evaluating deploy/prometheus's rules every second
    (the file itself: no rule needs a shorter `for:` or window for what the tests inject),
    alerting ``alertmanager_url``; its own URL."""
    scraped = urlsplit(metrics_url)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "astra",
                "metrics_path": scraped.path,
                "static_configs": [{"targets": [scraped.netloc]}],
            }
        ],
        "alerting": {
            "alertmanagers": [
                {"static_configs": [{"targets": [urlsplit(alertmanager_url).netloc]}]}
            ]
        },
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    async with _serving(
        "prometheus",
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'prometheus-data'}",
        f"--web.listen-address={url.removeprefix('http://')}",
        url=url,
    ):
        yield url
