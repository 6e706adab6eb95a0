"""The CLI starts without loading the clients of systems it never talks to.

An approver answering a page types several commands; each one pays for every import. Importing
the Kubernetes client alone took a second, pulled in through the catalogue (workflows import
activity modules) and the sandbox commands. Timing is the bench's job (`bench/cli_latency.py`);
this test guards the structure that makes the CLI fast.
"""

from __future__ import annotations

import json
import subprocess
import sys

# Temporal's SDK too: outside dev mode every command goes through the API, and dev-mode commands
# import the client when they connect.
NOT_FOR_THE_CLI = (
    "kubernetes",
    "psycopg",
    "redis",
    "fastapi",
    "uvicorn",
    "sandbox",
    "temporalio",
    "httpx",
    "rich",
    # PostgreSQL's parser: only `check-migrations` needs it.
    "pglast",
)

PROBE = f"""
import json, sys
import starters.cli
print(json.dumps([name for name in {NOT_FOR_THE_CLI!r} if name in sys.modules]))
"""


def test_importing_the_cli_loads_no_cluster_database_or_server_code() -> None:
    # A fresh interpreter: this test session has imported all of these already.
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(probe.stdout)
    assert loaded == [], (
        f"`import starters.cli` loads {loaded}; import them where they are used (in the "
        "activity's constructor or method, or the command that needs them), as "
        "activities/kubernetes.py and the sandbox commands in starters/cli.py do"
    )
