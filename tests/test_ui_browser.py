"""The Temporal UI as a person sees it: a real headless Chromium against `astra-ops dev`.

History is encrypted, so the UI is readable only if it reaches the API's codec endpoint; the
dev-stack test checks the UI's settings, this one reads the rendered pages. Chromium is Debian's
(`apt-get install chromium`; `.ci/run` installs it) driven over its DevTools protocol, so nothing is
downloaded at run time. Screenshots of every page land in test-output/ui/.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import websocket

from runtime.settings import REPO_ROOT
from sandbox.faults import SandboxTarget
from tests.conftest_dev import ALICE, BOB, DevStack, dev_stack_config, running
from tests.conftest_kube import eventually

OUTPUT = REPO_ROOT / "test-output" / "ui"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1440,1000", "--remote-debugging-port=0",
)  # fmt: skip
CODEC_BANNER = "Codec Server could not connect"
PAGE_SECONDS = 30
# The page's text, including the same-origin frames the UI renders user metadata in.
PAGE_TEXT = """
  [document, ...Array.from(document.querySelectorAll('iframe'), f => f.contentDocument)]
    .filter(d => d && d.body).map(d => d.body.innerText).join('\\n')"""


def chromium_binary() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "the browser test needs Debian's Chromium and found no `chromium` on PATH: run "
            "`apt-get install -y chromium` (as root; .ci/run does it in CI)"
        )
    return path


class Page:
    """One tab of a headless Chromium, spoken to over the DevTools protocol's websocket."""

    def __init__(self, ws: websocket.WebSocket, shots: Path) -> None:
        self.ws = ws
        self.shots = shots
        self.last_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        self.ws.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # events arrive between answers; this test subscribes to none it needs
            message = json.loads(self.ws.recv())
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise AssertionError(f"Chromium refused {method}: {message['error']}")
                return dict(message["result"])

    def evaluate(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return answer["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return str(self.evaluate(PAGE_TEXT) or "")

    async def shows(self, *texts: str) -> str:
        """Wait until every text is on the page (the UI renders after its API calls return)."""
        page = ""

        def all_there() -> bool:
            nonlocal page
            page = self.text()
            return all(t in page for t in texts)

        try:
            await eventually(all_there, timeout=PAGE_SECONDS, interval=0.25, message="page")
        except AssertionError:
            missing = [t for t in texts if t not in page]
            url, shot = self.evaluate("location.href"), self.shots / "failed.png"
            self.screenshot(shot)
            raise AssertionError(
                f"{url} never showed {missing} ({shot}); it showed:\n{page}"
            ) from None
        return page

    def screenshot(self, path: Path) -> None:
        shot = self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


@contextmanager
def chromium(profile: Path, shots: Path) -> Iterator[Page]:
    """A fresh headless Chromium (its own profile), killed with its helpers afterwards."""
    profile.mkdir(parents=True)
    log = shots / "chromium.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes its port here when ready
        deadline = time.monotonic() + PAGE_SECONDS
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Chromium did not start (exit {proc.poll()}); see {log}")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        tab = next(t for t in targets if t["type"] == "page")
        ws = websocket.create_connection(
            tab["webSocketDebuggerUrl"], timeout=PAGE_SECONDS, suppress_origin=True
        )
        try:
            yield Page(ws, shots)
        finally:
            ws.close()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def start_run(stack: DevStack, runbook: str, body: dict[str, Any]) -> str:
    async with httpx.AsyncClient(base_url=stack.api, timeout=30) as http:
        started = await http.post(f"/v1/runbooks/{runbook}/runs", json=body, headers=ALICE)
        assert started.status_code == 201, started.text
        return str(started.json()["run_id"])


async def pending_approval(stack: DevStack, run_id: str) -> dict[str, Any]:
    """The approval the run waits for, as the API reports it, once it waits."""
    found: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=stack.api, timeout=30) as http:

        async def listed() -> bool:
            approvals = (await http.get("/v1/approvals", headers=BOB)).json()
            found[:] = [a["approval"] for a in approvals if a["run_id"] == run_id]
            return bool(found)

        await eventually(listed, timeout=PAGE_SECONDS, message=f"{run_id} awaiting approval")
    return found[0]


async def test_ui_shows_decoded_runs_waiting_for_approval(
    tmp_path: Path, data_plane: SandboxTarget
) -> None:
    shutil.rmtree(OUTPUT, ignore_errors=True)  # only this run's screenshots and logs
    OUTPUT.mkdir(parents=True)
    reason = f"UI check {uuid.uuid4().hex[:8]}: scale out for the lantern backlog"
    stack = dev_stack_config(
        tmp_path / "state", OUTPUT / "astra-ops-dev.log", data_plane, "ui-browser-test"
    )
    # Chromium first: without it the test fails at once, saying how to install it.
    with chromium(tmp_path / "chromium", OUTPUT) as page:
        async with running(stack):
            # A dry run never waits for a person: the filtered list must leave it out.
            dry = await start_run(
                stack, "worker-lost", {"params": {"worker_id": "w-dry"}, "dry_run": True}
            )
            run_id = await start_run(
                stack, "shard-scaling", {"params": {"shards": 12}, "reason": reason}
            )
            approval = await pending_approval(stack, run_id)
            deadline = datetime.fromisoformat(approval["deadline"])

            query = quote("AstraAwaitingApproval = true")
            page.open(f"{stack.ui}/namespaces/default/workflows?query={query}")
            listed = await page.shows(run_id)
            page.screenshot(OUTPUT / "awaiting-approval.png")
            assert dry not in listed, "the filter lists only runs waiting for a person"

            page.open(f"{stack.ui}/namespaces/default/workflows/{quote(run_id, safe='')}")
            # The input is ciphertext in history: the reason is readable only through the codec.
            # Each activity in the timeline carries its step's name as its summary.
            run = await page.shows(f'"reason": "{reason}"', "read current shard count")
            page.screenshot(OUTPUT / "run.png")
            assert CODEC_BANNER not in run

            page.evaluate("document.querySelector('a[href$=\"/user-metadata\"]').click()")
            # Current details: every step with its state, and the approval with its deadline.
            details = await page.shows(
                f"started by alice: {reason}",
                "read current shard count: done",
                f"{approval['step']}: awaiting_approval",
                "set TASK_SHARD_COUNT: pending",
                f"until {deadline:%H:%M:%S}",
            )
            page.screenshot(OUTPUT / "run-details.png")
            assert CODEC_BANNER not in details
