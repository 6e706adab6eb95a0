"""Secret hygiene for the whole project, on `astra-ops dev` as a person runs it: every secret the
stack holds, planted or made by a run, is searched for everywhere a person or an attacker with
the history could look, and found nowhere.

Planted: a secret value in `vault-setup`'s source, the API's bearer tokens, the alert sender's
token and the chat webhook's URL. Made: the stack's OpenBao root token and unseal key, the
platform token `vault-setup` issues, the codec key, the CA's key and every private key
`tls-rotation` generates. Then `vault-setup` and `tls-rotation` (renewal and rollback) run end to
end with approvals, `shard-scaling` runs for real, a lost worker is repaired by the incident its
alert opens, and every other runbook runs once as a dry run (their real runs need a failed
PostgreSQL, Redis, error or cost spike, or dead letters).

Searched: the Temporal dev server's SQLite file, byte for byte; every execution's history as
`temporal workflow show --output json` prints it, with and without the API's codec endpoint; the
API's run, approval and incident views; the stack's log (worker, API, sandbox, Temporal). Each
search first finds a value known to be there, so a search that reads nothing cannot pass.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from activities.certificates import PEM_KEY_MARKER
from runtime.access import load_policy
from runtime.data_plane import DataPlaneTopology, PostgresNode, RedisNode
from runtime.keys import parse_keys
from runtime.settings import REPO_ROOT
from sandbox.faults import SandboxTarget
from sandbox.servers import DataPlane
from starters.api import ALERTS_PATH, CODEC_PATH
from tests.conftest_dev import DevStack, dev_stack_config, running
from tests.conftest_kube import eventually
from tests.receivers import Receiver
from tests.test_dev_stack import beside

TEMPORAL = Path(sys.executable).parent / "temporal"
NAMESPACE = "astra"
TLS_SERVICES = ("agent-service", "goal-service", "gateway")
RENEW = "approve renewing certificates"
ROLL_BACK = "approve rolling back certificates"
# Runbooks whose real run needs a fault this test does not make: dry runs, each once.
DRY_RUNS = (
    "high-error-rate",
    "llm-cost-spike",
    "dead-letter-repair",
    "postgres-outage",
    "redis-failure",
)


@dataclass(frozen=True)
class Canaries:
    """The secrets this test plants, each a value found nowhere else."""

    vault_value: str
    api_tokens: dict[str, str]
    """person -> bearer token"""
    alert_token: str
    chat_webhook_url: str

    @classmethod
    def new(cls, chat: Receiver) -> Canaries:
        def canary(what: str) -> str:
            return f"canary-{what}-{uuid.uuid4().hex}"

        return cls(
            vault_value=canary("vault"),
            api_tokens={who: canary(f"token-{who}") for who in ("alice", "bob", "carol")},
            alert_token=canary("alert-sender"),
            chat_webhook_url=f"{chat.url}/services/T0/B0/{canary('chat')}",
        )

    def settings(self) -> dict[str, str]:
        """The stack's settings that carry them (ASTRA_OPS_* without the prefix)."""
        sender = load_policy(REPO_ROOT / "deploy" / "access-policy.yaml").incidents
        return {
            "api_tokens": ",".join(f"{t}:{who}" for who, t in self.api_tokens.items()),
            "alertmanager_tokens": f"{self.alert_token}:{sender.alert_sender if sender else ''}",
            "chat_webhook_url": self.chat_webhook_url,
        }

    def secrets(self) -> dict[str, str]:
        return {
            "vault-setup source value": self.vault_value,
            **{f"API token of {who}": token for who, token in self.api_tokens.items()},
            "alert sender token": self.alert_token,
            "chat webhook URL": self.chat_webhook_url.rsplit("/", 1)[-1],
        }


def plant_vault_source(root: Path, value: str) -> None:
    """A directory source under the stack's vault source root, as a mounted Secret."""
    folder = root / "astra"
    folder.mkdir(parents=True)
    (folder / "OPENAI_API_KEY").write_text(value + "\n")
    (folder / "DB_PASSWORD").write_text(f"pw-{value}\n")


def key_lines(pem: str) -> list[str]:
    """The body lines of a PEM private key: a leak of the key shows them, however the PEM's
    line breaks were escaped on the way. A short last line could be found by chance: left out."""
    return [line for line in pem.splitlines() if len(line) >= 32 and not line.startswith("-")]


def sandbox_terminal(stack: DevStack) -> DevStack:
    """A terminal beside the stack set up for `astra-ops sandbox fault cert-*`, as its banner
    says: the sandbox cluster's address and its CA."""
    ca = Path(stack.env["ASTRA_OPS_STATE_DIR"]) / "tls-ca"
    env = {
        "ASTRA_OPS_KUBE_URL": f"http://127.0.0.1:{stack.ports['kube']}",
        "ASTRA_OPS_TLS_CA_CERT_FILE": str(ca / "ca.crt"),
        "ASTRA_OPS_TLS_CA_KEY_FILE": str(ca / "ca.key"),
    }
    return DevStack(env={**stack.env, **env}, ports=stack.ports, log=stack.log)


async def made_secrets(stack: DevStack, http: httpx.AsyncClient) -> dict[str, str]:
    """The secrets the stack and its runs made, read from where they are kept."""
    state = Path(stack.env["ASTRA_OPS_STATE_DIR"])
    found = {
        "OpenBao root token": (state / "openbao" / "root.token").read_text().strip(),
        "OpenBao unseal key": (state / "openbao" / "unseal.keys").read_text().strip(),
    }
    for key_id, key in parse_keys((state / "codec.keys").read_text()):
        found[f"codec key {key_id}"] = base64.b64encode(key).decode()
        found[f"codec key {key_id}, its bytes"] = key.decode("latin-1")  # as SQLite would hold it
    for i, line in enumerate(key_lines((state / "tls-ca" / "ca.key").read_text())):
        found[f"CA private key, line {i}"] = line
    kube = f"http://127.0.0.1:{stack.ports['kube']}/api/v1/namespaces/{NAMESPACE}/secrets"
    vault = (await http.get(f"{kube}/astra-vault")).json()["data"]
    found["platform Vault token"] = base64.b64decode(vault["ASTRA_VAULT_TOKEN"]).decode()
    for service in TLS_SERVICES:
        data = (await http.get(f"{kube}/{service}-tls")).json()["data"]
        for name in ("tls.key", "previous.tls.key"):
            found[f"{service} {name}, as the Secret holds it"] = data[name]
            pem = base64.b64decode(data[name]).decode()
            for i, line in enumerate(key_lines(pem)):
                found[f"{service} {name}, line {i}"] = line
    return found


class Api:
    """The stack's API as the people of the test, with their (canary) tokens."""

    def __init__(self, http: httpx.AsyncClient, tokens: dict[str, str]) -> None:
        self.http = http
        self.tokens = tokens

    def as_(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    async def start(
        self, runbook: str, params: dict[str, Any], reason: str, dry_run: bool = False
    ) -> str:
        body = {"params": params, "reason": reason, "dry_run": dry_run}
        started = await self.http.post(
            f"/v1/runbooks/{runbook}/runs", json=body, headers=self.as_("alice")
        )
        assert started.status_code == 201, started.text
        return str(started.json()["run_id"])

    async def view(self, run_id: str) -> dict[str, Any]:
        answer = await self.http.get(f"/v1/runs/{run_id}", headers=self.as_("bob"))
        assert answer.status_code == 200, answer.text
        view: dict[str, Any] = answer.json()
        return view

    async def waiting_on(self, run_id: str, step: str) -> None:
        async def waiting() -> bool:
            status = (await self.view(run_id))["status"]
            return status is not None and step in [a["step"] for a in status["pending_approvals"]]

        await eventually(waiting, timeout=60, interval=0.2, message=f"{run_id} asks {step!r}")

    async def outcome(self, run_id: str) -> str:
        async def ended() -> bool:
            return bool((await self.view(run_id))["state"] != "running")

        await eventually(ended, timeout=60, interval=0.2, message=f"{run_id} ended")
        view = await self.view(run_id)
        assert view["state"] == "completed", view["failure"]
        return str(view["result"]["outcome"])


async def approved_run(
    stack: DevStack, api: Api, runbook: str, params: dict[str, Any], step: str, reason: str
) -> str:
    """Started by alice through the API, approved by bob with the CLI, run to its end."""
    run_id = await api.start(runbook, params, reason)
    await api.waiting_on(run_id, step)
    await beside(stack, "approve", run_id, "--step", step, "--as", "bob")
    assert await api.outcome(run_id) == "done", (await api.view(run_id))["result"]
    return run_id


async def renewed_and_rolled_back(stack: DevStack, api: Api, reason: str) -> None:
    """Every TLS service's certificate renewed, then the gateway's put back."""
    await approved_run(stack, api, "tls-rotation", {}, RENEW, reason)
    rollback = {"services": ["gateway"], "rollback": True}
    await approved_run(stack, api, "tls-rotation", rollback, ROLL_BACK, reason)


async def dry_runs(api: Api, reason: str) -> None:
    """The runbooks whose real run needs a fault this test does not make, each once."""
    started = [await api.start(name, {}, reason, dry_run=True) for name in DRY_RUNS]
    for run_id in started:
        assert await api.outcome(run_id) in ("done", "no_change"), await api.view(run_id)


async def repaired_lost_worker(stack: DevStack, api: Api, alert_token: str) -> str:
    """A lost worker's alert, sent as Alertmanager does, opens an incident that repairs it."""
    fault = json.loads(await beside(stack, "sandbox", "fault", "worker-lost", "--json"))
    worker = fault["worker_id"]
    now = "2030-01-01T00:00:00Z"
    labels = {
        "alertname": "AstraWorkerLost",
        "severity": "SEV3",
        "rotation": "agent-platform",
        "runbook": "worker-lost",
        "worker_id": worker,
    }
    alert = {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="AstraWorkerLost", worker_id="{worker}"}}',
        "status": "firing",
        "receiver": "astra-ops",
        "commonLabels": labels,
        "alerts": [
            {
                "status": "firing",
                "fingerprint": f"fp-{worker}",
                "labels": labels,
                "annotations": {"summary": f"Worker {worker} has not heartbeat for 2m"},
                "startsAt": now,
            }
        ],
    }
    sent = await api.http.post(
        ALERTS_PATH, json=alert, headers={"Authorization": f"Bearer {alert_token}"}
    )
    assert sent.status_code == 202, sent.text
    run_id = f"worker-lost/{worker}"

    async def started() -> bool:
        runs = (await api.http.get("/v1/runs", headers=api.as_("carol"))).json()
        return run_id in [r["run_id"] for r in runs]

    await eventually(started, timeout=60, interval=0.2, message="the incident's worker-lost run")
    assert await api.outcome(run_id) == "done", (await api.view(run_id))["result"]
    return run_id


async def temporal_cli(stack: DevStack, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(TEMPORAL), *args, "--address", f"127.0.0.1:{stack.ports['temporal']}",
        "--output", "json", "--color", "never",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def with_payload_data(text: str) -> str:
    """``text`` (JSON) and, after it, every base64 `data` in it decoded: a payload the CLI does
    not show as JSON (an encrypted one, or another encoding) is searched as its bytes too."""
    decoded: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "data" and isinstance(value, str):
                    with contextlib.suppress(ValueError):  # not base64: shown as it is
                        decoded.append(base64.b64decode(value, validate=True).decode("latin-1"))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(text))
    return "\n".join([text, *decoded])


async def histories(stack: DevStack) -> tuple[str, str, int]:
    """Every execution's history, as `temporal workflow show` prints it without and with the
    codec endpoint, and how many executions there were."""
    listed = json.loads(await temporal_cli(stack, "workflow", "list") or "[]")
    executions = [(e["execution"]["workflowId"], e["execution"]["runId"]) for e in listed]
    codec = ["--codec-endpoint", f"http://127.0.0.1:{stack.ports['api']}{CODEC_PATH}"]
    raw, decoded = [], []
    for workflow_id, run_id in executions:
        show = ["workflow", "show", "-w", workflow_id, "-r", run_id]
        raw.append(with_payload_data(await temporal_cli(stack, *show)))
        decoded.append(with_payload_data(await temporal_cli(stack, *show, *codec)))
    return "\n".join(raw), "\n".join(decoded), len(executions)


async def api_views(api: Api) -> tuple[str, int]:
    """Every answer the API gives about runs, approvals and incidents, and how many incidents
    it showed."""
    bob = api.as_("bob")
    answers = [
        (await api.http.get("/v1/runs", headers=bob)).text,
        (await api.http.get("/v1/approvals", headers=bob)).text,
        incidents := (await api.http.get("/v1/incidents", headers=bob)).text,
    ]
    for run in (await api.http.get("/v1/runs", headers=bob)).json():
        answers.append((await api.http.get(f"/v1/runs/{run['run_id']}", headers=bob)).text)
    opened = json.loads(incidents)
    for incident in opened:
        path = f"/v1/incidents/{incident['incident_id']}"
        answers.append((await api.http.get(path, headers=bob)).text)
    return "\n".join(answers), len(opened)


def topology(path: Path, data: SandboxTarget, servers: DataPlane) -> Path:
    """The data plane as `postgres-outage` and `redis-failure` see it: the test's servers, with
    no control over them (their dry runs only look)."""
    DataPlaneTopology(
        postgres=[
            PostgresNode(name="primary", admin_dsn=servers.postgres_url, platform_dsn=data.dsn)
        ],
        redis=[RedisNode(name="primary", url=data.redis_url, platform_url=data.redis_url)],
    ).write(path)
    return path


async def test_no_secret_anywhere_after_every_runbook(
    tmp_path: Path, data_plane: SandboxTarget, data_servers: DataPlane, chat_receiver: Receiver
) -> None:
    canaries = Canaries.new(chat_receiver)
    sources = tmp_path / "vault-sources"
    plant_vault_source(sources, canaries.vault_value)
    queue = f"hygiene-{uuid.uuid4().hex[:8]}"
    stack = dev_stack_config(
        tmp_path / "state",
        tmp_path / "dev.log",
        data_plane,
        queue,
        vault_source_root=str(sources),
        data_plane_topology=str(topology(tmp_path / "topology.json", data_plane, data_servers)),
        **canaries.settings(),
    )
    witness = f"hygiene witness {uuid.uuid4().hex}"  # a reason: in every run's input
    async with running(stack), httpx.AsyncClient(base_url=stack.api, timeout=30) as http:
        api = Api(http, canaries.api_tokens)
        await beside(
            sandbox_terminal(stack), "sandbox", "fault", "cert-expiring", "--days-left", "2"
        )
        vault_run, *_ = await asyncio.gather(  # vault-setup rolls every service: alone
            approved_run(
                stack, api, "vault-setup", {"source": "directory:astra"},
                "approve the Vault setup", witness,
            ),
            dry_runs(api, witness),
        )  # fmt: skip
        await asyncio.gather(  # the TLS services, and the worker pool: apart
            renewed_and_rolled_back(stack, api, witness),
            repaired_lost_worker(stack, api, canaries.alert_token),
        )
        await approved_run(stack, api, "shard-scaling", {"shards": 12}, "approve scaling", witness)
        assert chat_receiver.accepted, "the incident spoke through the chat webhook"

        secrets = {**canaries.secrets(), **await made_secrets(stack, http)}
        raw_history, decoded_history, executions = await histories(stack)
        views, incidents = await api_views(api)
    state = Path(stack.env["ASTRA_OPS_STATE_DIR"])
    database = b"".join(p.read_bytes() for p in sorted(state.glob("temporal.db*")))
    places = {
        "Temporal's SQLite file": database.decode("latin-1"),
        "`temporal workflow show`": raw_history,
        "`temporal workflow show` through the codec": decoded_history,
        "the API's views": views,
        "the stack's log": stack.log.read_text(),
    }
    # Each search finds what is there: the run's id everywhere, its reason once decoded.
    assert executions >= 1 + 2 + 1 + 1 + len(DRY_RUNS), "every run's history was read"
    assert incidents == 1, "the lost worker's incident was read"
    for where, text in places.items():
        assert vault_run in text, f"the search of {where} reads nothing"
    assert witness in decoded_history and witness in views, "the codec and the API decode"
    assert witness not in raw_history and witness not in places["Temporal's SQLite file"]
    leaks = {
        where: [name for name, value in secrets.items() if value in text]
        + ([PEM_KEY_MARKER] if PEM_KEY_MARKER in text else [])
        for where, text in places.items()
    }
    assert leaks == {where: [] for where in places}, leaks
