"""One settings model for every astra-ops process (CLI, API, worker, dev stack).

Values come from ``ASTRA_OPS_*`` environment variables and, optionally, a dotenv file named by
``ASTRA_OPS_SETTINGS_FILE``. A wrong value fails at start with the setting's name in the message,
so a misconfigured worker never starts half-working.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from runtime.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "ASTRA_OPS_"


class SettingsError(ConfigError):
    """Raised when the environment does not describe a usable configuration."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Temporal
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    temporal_tls: bool = False
    temporal_tls_ca: Path | None = None
    temporal_tls_cert: Path | None = None
    temporal_tls_key: Path | None = None
    temporal_api_key: SecretStr | None = None
    task_queue: str = "astra-ops"
    worker_kind: Literal["all", "standard", "privileged"] = Field(
        default="all",
        description="What a worker polls: `standard`, the runs and every activity that needs no "
        "special rights, on ASTRA_OPS_TASK_QUEUE; `privileged`, only the activities on the data "
        "plane's servers and the platform's secrets, on `<task queue>-privileged` (deploy it "
        "with those rights); `all`, both (a laptop, a single worker).",
    )
    worker_graceful_shutdown_seconds: float = Field(
        default=30,
        ge=0,
        le=3600,
        description="After SIGTERM, how long the worker lets running activities finish before it "
        "cancels them (those that only wait hand their work back at once). Keep it below the "
        "pod's terminationGracePeriodSeconds.",
    )

    # Payload encryption: "keyid:base64key[,keyid:base64key...]"; the first encrypts, all decrypt.
    codec_keys: SecretStr | None = None
    codec_key_file: Path | None = None

    # Who may approve what, and who the caller is.
    access_policy: Path = REPO_ROOT / "deploy" / "access-policy.yaml"
    user: str | None = None
    api_tokens: SecretStr | None = Field(
        default=None, description="Bearer tokens for the HTTP API: 'token:user[,token:user...]'."
    )

    # The alert intake (POST /v1/alerts/alertmanager) knows Alertmanager by what its
    # `http_config` sends: a bearer token or basic auth. The name is who opens the incident.
    alertmanager_tokens: SecretStr | None = Field(
        default=None,
        description="Bearer tokens of alert senders: 'token:name[,token:name...]'.",
    )
    alertmanager_basic_auth: SecretStr | None = Field(
        default=None,
        description="Basic-auth credentials of alert senders: 'name:password[,...]'.",
    )

    # Proven identity (outside dev mode): the API signs what people do with its private key;
    # workers trust the matching public keys. Lines 'keyid:base64'; the first private key signs.
    signing_key_file: Path | None = None
    trusted_keys: str | None = Field(
        default=None, description="Public keys runs trust: 'keyid:base64[,keyid:base64...]'."
    )
    trusted_keys_file: Path | None = None
    api_token: SecretStr | None = Field(
        default=None, description="The CLI's bearer token for the API (outside dev mode)."
    )

    # HTTP API
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    api_url: str = "http://127.0.0.1:8080"
    api_max_body_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="The largest request body the API reads; larger ones are answered 413. "
        "The default holds an Alertmanager group of thousands of alerts and a Temporal UI "
        "codec batch.",
    )
    ui_origins: str = Field(
        default="http://127.0.0.1:8233,http://localhost:8233",
        description="Origins of the Temporal UI allowed to call the codec endpoints (CORS).",
    )
    dev_mode: bool = False

    # What the worker and the API export (runtime/telemetry.py, runtime/logs.py). Tracing is
    # configured by the standard OTEL_* variables, not here.
    worker_metrics_address: str | None = Field(
        default=None,
        description="host:port where the worker serves Prometheus /metrics (the Temporal SDK's "
        "and astra-ops's); unset, it serves none. Off by default: a port bound unasked makes a "
        "second worker on the same host fail to start; deployments set it (deploy/k8s).",
    )
    api_metrics_address: str | None = Field(
        default=None,
        description="host:port where the API serves Prometheus /metrics (its client's SDK "
        "metrics, and approvals waiting, the oldest one's age and the kill switch, read from "
        "Temporal); unset, it serves none.",
    )
    metrics_refresh_seconds: float = Field(
        default=15,
        gt=0,
        description="How often the API re-reads the gauges it serves from Temporal.",
    )
    log_format: Literal["auto", "text", "json"] = Field(
        default="auto",
        description="How the worker and the API log: text, or one JSON object per line; auto "
        "is text on a terminal and JSON otherwise.",
    )

    # Dev stack
    state_dir: Path = REPO_ROOT / ".astra"
    temporal_port: int = Field(default=7233, ge=1, le=65535)
    ui_port: int = Field(default=8233, ge=1, le=65535)
    kube_port: int = Field(default=8001, ge=0, le=65535)
    kube_rollout_seconds: float = Field(default=2.0, ge=0)
    sandbox_metrics_port: int = Field(default=9464, ge=0, le=65535)
    sandbox_tick_seconds: float = Field(default=1.0, gt=0)
    data_plane: Literal["auto", "own", "external"] = Field(
        default="auto",
        description="Where the dev stack's PostgreSQL and Redis come from: 'auto' uses the "
        "configured ones that answer and starts its own (under STATE_DIR) for the others, 'own' "
        "always starts its own, 'external' never does.",
    )
    data_plane_replication: Literal["none", "sync", "async"] = Field(
        default="none",
        description="Run the dev stack's own PostgreSQL with a streaming replica (synchronous "
        "or asynchronous) and its own Redis with a replica; `astra-ops dev --replicated`.",
    )
    data_plane_sentinel: bool = Field(
        default=False, description="Run Redis Sentinel beside the dev stack's own Redis."
    )
    data_plane_topology: Path | None = Field(
        default=None,
        description="A JSON file naming the data plane's PostgreSQL and Redis servers, for "
        "postgres-outage and redis-failure (runtime/data_plane.py); the dev stack writes one.",
    )

    # Targets
    kube_url: str | None = Field(
        default=None, description="Kubernetes API URL without auth (the sandbox); else kubeconfig."
    )
    kube_namespace: str = "astra"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/astra_sandbox"
    state_database_url: str | None = Field(
        default=None,
        description="Where astra-ops keeps its own records (unattended-action budgets); "
        "default: DATABASE_URL.",
    )
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = Field(
        default="astra:", min_length=1, description="Prefix of Astra's Redis keys."
    )
    prometheus_url: str | None = None
    chat_webhook_url: SecretStr | None = Field(
        default=None, description="A Slack-compatible incoming webhook; the URL is a credential."
    )

    # Vault (or OpenBao): where the worker reaches it, with what token, and what `vault-setup`
    # may read. The token is a secret: from a SecretStr or a file, never from a request.
    vault_addr: str | None = Field(
        default=None, description="The Vault the worker acts on (`vault-setup`); the dev stack's."
    )
    vault_token: SecretStr | None = Field(
        default=None, description="The worker's Vault token (or VAULT_TOKEN_FILE)."
    )
    vault_token_file: Path | None = Field(
        default=None, description="A file holding the worker's Vault token, read on every use."
    )
    vault_unseal_keys_file: Path | None = Field(
        default=None,
        description="Unseal keys (one per line) `vault-setup` may use, with approval, on a "
        "sealed Vault; unset, a sealed Vault stops the run.",
    )
    releases_root: Path | None = Field(
        default=None,
        description="The folder of each release's files, by image tag: `<tag>/migrations/*.sql` "
        "and `<tag>/uses/*.sql`; `canary-upgrade` and `blue-green-upgrade` check a release's new "
        "migrations against the running binary's queries before they move any pod. Unset, they "
        "say the check was skipped.",
    )
    vault_source_root: Path | None = Field(
        default=None,
        description="The folder under which `vault-setup` may read the secret files and "
        "directories a request names; unset, it reads none.",
    )
    vault_source_env_prefix: str | None = Field(
        default=None,
        min_length=1,
        description="The prefix every environment-variable source of `vault-setup` must start "
        "with; unset, it reads no environment variables.",
    )
    vault_token_period_seconds: int = Field(
        default=24 * 3600,
        ge=600,
        description="The renewal period of the periodic token `vault-setup` issues the platform "
        "(of an AppRole login's token too).",
    )
    vault_credential: Literal["token", "approle"] = Field(
        default="token",
        description="How `vault-setup` makes the platform's token: `token`, a periodic orphan "
        "token; `approle`, a login to an AppRole bound to the platform's policy (role named "
        "like the policy) with a single-use secret_id the worker issues and spends at once.",
    )
    vault_approle_mount: str = Field(
        default="approle",
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="Where the AppRole auth method is (enabled there if missing).",
    )
    vault_secret_id_ttl_seconds: int = Field(
        default=600,
        ge=60,
        description="How long an AppRole secret_id lives if the worker dies before spending it.",
    )

    # TLS: the CA `tls-rotation` signs services' certificates with, and verifies them against.
    tls_ca_cert_file: Path | None = Field(
        default=None, description="The CA certificate (PEM) `tls-rotation` issues and trusts."
    )
    tls_ca_key_file: Path | None = Field(
        default=None,
        description="The CA's private key (PEM, ECDSA, no passphrase); read only by the "
        "activity that signs.",
    )
    tls_vault_pki_mount: str | None = Field(
        default=None,
        min_length=1,
        description="A Vault (OpenBao) PKI mount `tls-rotation` issues from instead of the CA "
        "files, with the worker's Vault token (ASTRA_OPS_VAULT_ADDR, _TOKEN_FILE); certificates "
        "are then trusted against its CA.",
    )
    tls_vault_pki_role: str = Field(
        default="astra-services",
        min_length=1,
        description="The PKI role it issues as: the token needs `update` on <mount>/issue/<role>.",
    )

    # Incident communication beside the chat webhook; each receiver left unset is skipped.
    status_page_url: str = Field(
        default="https://api.statuspage.io", description="A Statuspage-compatible API (v1)."
    )
    status_page_id: str | None = Field(default=None, min_length=1)
    status_page_api_key: SecretStr | None = None
    status_page_components: str | None = Field(
        default=None,
        description="Astra components shown on the status page: 'component:id[,...]', where id "
        "is the status page's component id; others are not shown.",
    )
    pagerduty_events_url: str = "https://events.pagerduty.com"
    postmortem_dir: Path | None = Field(
        default=None,
        description="Where incidents write their postmortem drafts (Markdown); default: "
        "STATE_DIR/postmortems.",
    )
    pagerduty_routing_keys: SecretStr | None = Field(
        default=None,
        description="PagerDuty Events v2 integration keys: 'rotation:key[,rotation:key...]'.",
    )

    @field_validator("temporal_address", "worker_metrics_address", "api_metrics_address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {value!r}")
        return value

    @field_validator(
        "temporal_tls_ca",
        "temporal_tls_cert",
        "temporal_tls_key",
        "codec_key_file",
        "signing_key_file",
        "trusted_keys_file",
        "vault_token_file",
        "vault_unseal_keys_file",
        "tls_ca_cert_file",
        "tls_ca_key_file",
    )
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {value} does not exist")
        return value

    @field_validator("status_page_components")
    @classmethod
    def _component_pairs(cls, value: str | None) -> str | None:
        if value is not None:
            pairs(value, "component:id")
        return value

    @field_validator("pagerduty_routing_keys")
    @classmethod
    def _routing_key_pairs(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            pairs(value.get_secret_value(), "rotation:key")
        return value

    @field_validator("alertmanager_tokens", "alertmanager_basic_auth")
    @classmethod
    def _sender_pairs(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None:
            shape = "token:name" if info.field_name == "alertmanager_tokens" else "name:password"
            pairs(value.get_secret_value(), shape)
        return value

    @model_validator(mode="after")
    def _status_page_whole(self) -> Self:
        if (self.status_page_id is None) != (self.status_page_api_key is None):
            raise ValueError(
                f"{ENV_PREFIX}STATUS_PAGE_ID and {ENV_PREFIX}STATUS_PAGE_API_KEY go together: "
                "set both to update a status page, or neither"
            )
        return self

    @property
    def state_dsn(self) -> str:
        return self.state_database_url or self.database_url

    @property
    def postmortems(self) -> Path:
        return self.postmortem_dir or self.state_dir / "postmortems"

    @cached_property
    def token_identities(self) -> dict[str, str]:
        """Bearer token -> user name, parsed once."""
        if self.api_tokens is None:
            return {}
        pairs: dict[str, str] = {}
        for item in self.api_tokens.get_secret_value().split(","):
            token, sep, user = item.strip().rpartition(":")
            if not sep or not token or not user:
                raise SettingsError(
                    f"{ENV_PREFIX}API_TOKENS: entries must look like 'token:user', got one "
                    "without a ':'"
                )
            pairs[token] = user
        return pairs

    @property
    def alert_senders(self) -> AlertSenders:
        """Who may post alerts, by the credentials Alertmanager sends. Not cached: a copy of
        these settings with other senders (``model_copy``) must not answer with these."""
        return AlertSenders(
            tokens=pairs(self.alertmanager_tokens.get_secret_value(), "token:name")
            if self.alertmanager_tokens
            else {},
            passwords=pairs(self.alertmanager_basic_auth.get_secret_value(), "name:password")
            if self.alertmanager_basic_auth
            else {},
        )


@dataclass(frozen=True)
class AlertSenders:
    tokens: dict[str, str]
    """bearer token -> sender"""
    passwords: dict[str, str]
    """sender -> basic-auth password"""

    def __bool__(self) -> bool:
        return bool(self.tokens or self.passwords)


def pairs(text: str, shape: str) -> dict[str, str]:
    """``'name:value[,name:value...]'`` as a dict. A malformed entry is named by its position,
    never quoted: the values may be keys."""
    parsed: dict[str, str] = {}
    for number, item in enumerate(text.split(","), start=1):
        name, sep, value = item.strip().partition(":")
        if not sep or not name or not value:
            raise ValueError(f"entry {number} is not '{shape}'")
        parsed[name] = value
    return parsed


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning pydantic's report into one line per bad setting."""
    env_file = os.environ.get(f"{ENV_PREFIX}SETTINGS_FILE")
    if env_file and not Path(env_file).is_file():
        raise SettingsError(f"{ENV_PREFIX}SETTINGS_FILE names {env_file}, which does not exist")
    try:
        return Settings(_env_file=env_file, **overrides)
    except ValidationError as err:
        # A check across settings (no 'loc') names its settings itself.
        lines = [
            f"{ENV_PREFIX}{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            if e["loc"]
            else e["msg"]
            for e in err.errors()
        ]
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
