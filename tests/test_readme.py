"""The README's walk-through runs as written: every `$ ` command of its console blocks, in order,
against `astra-ops dev`, with the output the README shows (`...` stands for output left out).

So the README cannot drift from what the CLI, the API and the stock Temporal CLI do.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime.settings import REPO_ROOT
from sandbox.faults import SandboxTarget
from tests.conftest_dev import dev_stack_config, running

README = REPO_ROOT / "README.md"
COMMAND_SECONDS = 120
# A person who runs `ps` or `status` before the run got there runs it again a moment later.
SETTLE_SECONDS = 60
READING = ("astra-ops ps", "astra-ops status")


@dataclass
class Step:
    command: str
    expected: list[str]


def walkthrough() -> list[Step]:
    text = README.read_text()
    section = text[text.index("## Walk-through") : text.index("## Where to look")]
    steps: list[Step] = []
    for block in re.findall(r"```console\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append(Step(line[2:], []))
            elif steps:
                steps[-1].expected.append(line)
    return steps


def squeeze(text: str) -> str:
    return " ".join(text.split())


def shows(expected: list[str], output: str) -> str | None:
    """Why ``output`` does not show the expected lines in order, or None. In an expected line,
    `...` stands for anything; a line of only `...` for any lines."""
    lines = [squeeze(line) for line in output.splitlines()]
    at = 0
    for want in expected:
        parts = [squeeze(p) for p in want.split("...") if p.strip()]
        if not parts:
            continue
        while at < len(lines):
            line, found, position = lines[at], True, 0
            for part in parts:
                position = line.find(part, position)
                if position < 0:
                    found = False
                    break
                position += len(part)
            at += 1
            if found:
                break
        else:
            return f"expected {want!r}"
    return None


async def test_the_walkthrough_runs_as_written(tmp_path: Path, data_plane: SandboxTarget) -> None:
    steps = walkthrough()
    assert len(steps) >= 15, "the walk-through has its commands"
    stack = dev_stack_config(tmp_path / "state", tmp_path / "dev.log", data_plane, "readme-test")
    env = {
        **stack.env,
        # As a person's second terminal: the venv's commands first, this checkout's dev stack.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TEMPORAL_ADDRESS": f"127.0.0.1:{stack.ports['temporal']}",
        "ASTRA_OPS_TEMPORAL_ADDRESS": f"127.0.0.1:{stack.ports['temporal']}",
        "COLUMNS": "200",
    }
    async with running(stack):
        for step in steps:
            # The README's addresses are the defaults; this stack runs on free ports.
            command = step.command.replace("http://127.0.0.1:8080", stack.api)
            deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
            while True:
                code, output = await run(command, env)
                why = shows(step.expected, output)
                rereadable = command.startswith(READING) and "--wait" not in command
                if why is None or not rereadable or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.5)
            refused = bool(step.expected) and step.expected[0].startswith("error:")
            assert (code != 0) == refused, (step.command, code, output)
            assert why is None, f"$ {step.command}\n{why} in:\n{output}"


async def run(command: str, env: dict[str, str]) -> tuple[int | None, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=REPO_ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_SECONDS)
    return proc.returncode, out.decode()
