"""One results page: run every benchmark in bench/ at a size this machine can take, and write
bench/RESULTS.md with each one's figures beside its baseline from the same run, the target, the
machine and the date, plus the fault-injection figures of `make proof` when present: its
summary (bench/proof.json) and its worker-kill trials per runbook (bench/proof-tests.xml).

Each benchmark runs as its own process, one after another (they share the machine's cores with
nothing of each other). Each prints its figure beside its baseline and their ratio; this page
quotes the lines that carry them in a table, the target beside them, and the whole output below.
A benchmark that fails or runs past its time limit is on the page as such, with the end of its
output: a result, not something to hide. The sizes are reduced from the benchmarks' defaults
(which take hours on a 2-core machine); the page says which were used, and each bench can be
run at full size by hand with the command shown.

    .venv/bin/python bench/report.py [--only step_overhead,cli_latency] [--out bench/RESULTS.md]
        [--proof bench/proof.json] [--page-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
TAIL_LINES = 40
"""Lines of a failed benchmark's output kept on the page."""
KILL_TRIALS = HERE / "proof-tests.xml"
"""The JUnit XML of `make proof`'s tests (the Makefile names it), beside bench/proof.json."""
KILLED = "_killed_anywhere"
"""What the name of each kill trial of tests/test_kill_anywhere.py says after its runbook's."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    args: tuple[str, ...]
    """The reduced size this page runs it at."""
    target: str
    headline: tuple[str, ...]
    """Substrings of the output lines that carry the figure, its baseline and their ratio."""
    limit: float = 300
    """Seconds before the run is stopped and reported as timed out."""

    @property
    def command(self) -> str:
        return " ".join([".venv/bin/python", f"bench/{self.name}.py", *self.args])


BENCHMARKS = (
    Benchmark(
        "step_overhead",
        ("--runs", "10", "--concurrency", "5", "--rounds", "1"),
        "ratio <= 1.15 (issue 8)",
        ("wall time", "median run", "ratio"),
    ),
    Benchmark(
        "cli_latency",
        ("--rounds", "5"),
        "every command's median < 0.5 s (issue 7)",
        ("median", "temporal workflow describe", "(dev)", "(api)"),
    ),
    Benchmark(
        "kill_switch",
        (
            "--runs",
            "10",
        ),
        "every open run frozen / resumed within 2 s (issue 6)",
        ("freeze", "unfreeze"),
    ),
    Benchmark(
        "requeue",
        ("--tasks", "20000", "--repeat", "2"),
        "none set; the plain UPDATE is the physical limit (issue 3)",
        ("rows/s", "ratio"),
    ),
    Benchmark(
        "waiting_runs",
        ("--runs", "200", "--concurrency", "50"),
        "none set; printed beside a workflow that only waits for a signal (issue 8)",
        ("RSS", "decide all"),
    ),
    Benchmark(
        "alert_storm",
        ("--notifications", "3000", "--groups", "100"),
        "ratio >= 0.8, p99 <= 2 s, incidents opened = groups (issue 9)",
        ("webhook", "bare", "ratio", "incidents"),
    ),
    Benchmark(
        "recovery",
        ("--trials", "3", "--baseline-runs", "1"),
        "a run resumes within 15 s of the new worker polling (issue 13)",
        ("median", "->", "without a kill", "within", "exactly once"),
    ),
    Benchmark(
        "failover_rto",
        ("--legs", "sentinel-tuned,runbook-redis", "--trials", "1", "--deadline", "90"),
        "faster than Patroni's/Sentinel's defaults, within 1.5x of tuned, no acknowledged write "
        "lost with synchronous replication (issue 10)",
        ("sentinel", "runbook", "ratio"),
    ),
)


@dataclass
class Ran:
    bench: Benchmark
    seconds: float
    returncode: int | None
    """None: stopped at its time limit."""
    output: str

    @property
    def status(self) -> str:
        if self.returncode is None:
            return f"stopped after {self.bench.limit:g} s"
        return "ran" if self.returncode == 0 else f"failed (exit {self.returncode})"

    def headline(self) -> list[str]:
        lines = [line.strip() for line in self.output.splitlines()]
        return [
            line
            for line in lines
            if line and any(h.lower() in line.lower() for h in self.bench.headline)
        ]


async def run(bench: Benchmark) -> Ran:
    began = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / f"{bench.name}.py"), *bench.args,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=HERE.parent,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(process.communicate(), bench.limit)
        code: int | None = process.returncode
    except TimeoutError:
        process.kill()
        out, _ = await process.communicate()
        code = None
    return Ran(bench, time.monotonic() - began, code, out.decode(errors="replace"))


def machine() -> list[str]:
    memory = next(
        line.split(":", 1)[1].strip()
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    temporal = Path(sys.executable).parent / "temporal"
    version = subprocess.run([str(temporal), "--version"], capture_output=True, text=True).stdout
    return [
        f"- CPUs (`nproc`): {os.cpu_count()}; memory: {memory}",
        f"- Python {platform.python_version()} on {platform.platform()}",
        f"- Temporal CLI: {version.strip() or 'not found'}",
    ]


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load: the benchmarks share it with other work."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def proof_section(path: Path) -> list[str]:
    if not path.exists():
        return [f"No `{path.name}`: run `make proof` first to put its figures here."]
    proof: dict[str, Any] = json.loads(path.read_text())
    lines = [
        f"`make proof` of {proof['date']} ({proof['seconds']:g} s; runbooks: "
        f"{', '.join(proof['runbooks'])}): **{proof['trials']} trials, {proof['completed']} "
        f"completed, {proof['correct']} correct on the targets, "
        f"{proof['duplicate_side_effects']} duplicate side effects**.",
        "",
        "| fault | trials | completed | correct on the targets | duplicate side effects |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    kinds = {
        "worker": "worker SIGKILLed at a random step, a new worker started",
        "load": "two workers on one queue, one SIGKILLed under load",
        "server": "dev server SIGKILLed and restarted on its SQLite file",
        "target": "Kubernetes API answering 500 or 409, or holding writes, mid-step",
    }
    for kind, figures in proof["by_kind"].items():
        lines.append(
            f"| {kinds.get(kind, kind)} | {figures['trials']} | {figures['completed']} | "
            f"{figures['correct']} | {figures['duplicates']} |"
        )
    for kind, title in (("server", "Server trials"), ("target", "Target trials")):
        named = [r for r in proof["results"] if r["kind"] == kind]
        if named:
            lines += ["", f"{title}:"]
            lines += [f"- {r['name']}: {r['fault']}; outcome {r['outcome']}; {r['detail']}"
                      for r in named]  # fmt: skip
    if proof["failed"]:
        lines += ["", "Trials that failed (findings):"]
        lines += [f"- {f['name']}: {f['summary']}" for f in proof["failed"]]
    return lines


def kill_trials(path: Path) -> list[str]:
    """The trials of tests/test_kill_anywhere.py, per runbook, from the JUnit XML `make proof`
    writes: a trial passes when its run completed and its assertions, which read the targets,
    found every side effect there once."""
    if not path.exists():
        return [f"No `{path.name}`: `make proof` writes the worker-kill trials of each runbook."]
    trials: dict[str, list[ET.Element]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        if case.get("classname", "").endswith("test_kill_anywhere") and KILLED in name:
            runbook = name.split(KILLED)[0].removeprefix("test_").replace("_", "-")
            trials.setdefault(runbook, []).append(case)
    lines = [
        "Worker SIGKILLed at a random activity, per runbook (tests/test_kill_anywhere.py): a "
        "passed trial completed, correct on the targets, with no duplicate side effect.",
        "",
        "| runbook | trials | passed | failed | seconds per trial (mean) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    findings: list[tuple[str, str]] = []
    for runbook, cases in sorted(trials.items()):
        failed = {c.get("name", ""): said for c in cases if (said := failure(c)) is not None}
        findings += failed.items()
        seconds = sum(float(c.get("time", 0)) for c in cases) / len(cases)
        lines.append(
            f"| {runbook} | {len(cases)} | {len(cases) - len(failed)} | {len(failed)} | "
            f"{seconds:.0f} |"
        )
    if findings:
        lines += ["", "Kill trials that failed (findings):"]
        lines += [f"- {name}: {said}" for name, said in findings]
    return lines


def failure(case: ET.Element) -> str | None:
    """The first line of what a failed (or errored) test case said; None when it passed."""
    for outcome in case:
        if outcome.tag in ("failure", "error"):
            said = outcome.get("message", "").strip()
            return said.splitlines()[0] if said else "no message"
    return None


def page(results: list[Ran], proof: Path, began: datetime, total: float, load: str) -> str:
    lines = [
        "# Results",
        "",
        f"Written by `python bench/report.py` on {began:%Y-%m-%d %H:%M} UTC in {total / 60:.0f} "
        "min; every figure is beside its baseline from the same run. Figures are noisy: the "
        "machine's 2 cores are shared with other work, and the sizes are reduced (each "
        "section gives the command; the bench's docstring gives its full size).",
        "",
        "## Machine",
        "",
        *machine(),
        f"- load average (1, 5, 15 min) at the start: {load}; at the end: {load_average()}",
        "",
        "## Fault injection (`make proof`)",
        "",
        *proof_section(proof),
        "",
        *kill_trials(proof.with_name(KILL_TRIALS.name)),
        "",
        "## Benchmarks",
        "",
        "| bench | status | figures beside their baseline (as printed) | target |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        figures = "<br>".join(f"`{line}`" for line in r.headline()[:16]) or "-"
        lines.append(
            f"| [{r.bench.name}](#{r.bench.name}) | {r.status} | {figures} | {r.bench.target} |"
        )
    for r in results:
        output = r.output.rstrip().splitlines()
        if r.returncode != 0:
            output = output[-TAIL_LINES:]
        lines += [
            "",
            f"### {r.bench.name}",
            "",
            f"`{r.bench.command}`: {r.status} in {r.seconds:.0f} s. Target: {r.bench.target}.",
            "",
            "```",
            *output,
            "```",
        ]
    return "\n".join(lines) + "\n"


def save(path: Path, results: list[Ran], began: datetime, seconds: float, load: str) -> None:
    """The benchmarks' outputs, so that ``--page-only`` can write the page again (after a new
    `make proof`) without running them again."""
    runs = [
        {"name": r.bench.name, "seconds": r.seconds, "returncode": r.returncode, "output": r.output}
        for r in results
    ]
    record = {"began": began.isoformat(), "seconds": seconds, "load": load, "runs": runs}
    path.write_text(json.dumps(record, indent=1) + "\n")


def saved(path: Path) -> tuple[list[Ran], datetime, float, str]:
    record = json.loads(path.read_text())
    benches = {b.name: b for b in BENCHMARKS}
    results = [
        Ran(benches[r["name"]], r["seconds"], r["returncode"], r["output"]) for r in record["runs"]
    ]
    return results, datetime.fromisoformat(record["began"]), record["seconds"], record["load"]


async def main(only: list[str] | None, out: Path, proof: Path, page_only: bool) -> None:
    runs_file = out.with_suffix(".json")
    if page_only:
        results, began, seconds, load = saved(runs_file)
        out.write_text(page(results, proof, began, seconds, load))
        print(f"written to {out} from {runs_file}")
        return
    began, start, load = datetime.now(UTC), time.monotonic(), load_average()
    chosen = [b for b in BENCHMARKS if only is None or b.name in only]
    if only and (unknown := set(only) - {b.name for b in BENCHMARKS}):
        raise SystemExit(f"no benchmark {', '.join(sorted(unknown))}; there are: "
                         + ", ".join(b.name for b in BENCHMARKS))  # fmt: skip
    results = []
    for bench in chosen:
        print(f"running {bench.command}", flush=True)
        ran = await run(bench)
        print(f"  {ran.status} in {ran.seconds:.0f} s", flush=True)
        results.append(ran)
    seconds = time.monotonic() - start
    save(runs_file, results, began, seconds, load)
    out.write_text(page(results, proof, began, seconds, load))
    print(f"written to {out} (the outputs to {runs_file})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--only", type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
        help="run only these benchmarks (comma-separated names)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--proof", type=Path, default=HERE / "proof.json")
    parser.add_argument(
        "--page-only", action="store_true",
        help="write the page again from the outputs the last run saved (RESULTS.json) and the "
        "current proof.json, running nothing",
    )  # fmt: skip
    args = parser.parse_args()
    asyncio.run(main(args.only, args.out, args.proof, args.page_only))
