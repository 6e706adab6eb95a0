"""Vault (or OpenBao) activities for `vault-setup`: check, unseal, load KV-v2, policy, credential.

Every secret value stays in here. The worker's token, the unseal keys, the values loaded and the
platform's token are read and written by these activities; what they return, and so what a
run's history holds, is key names, versions, policy names and fingerprints. hvac is synchronous:
these are sync activities on the worker's thread pool, and the client is made per call from the
settings (the token file is read each time, so rotating it needs no restart).

Idempotent by construction: loads compare before they write and write with check-and-set on the
version the run read, so a retry writes nothing twice and a concurrent writer is never
overwritten; the platform's credential carries the accessor of the one it replaces in its own
metadata, so revoking that one can be retried after the new one is in place. It also carries
the idempotency token of the step that made it: a retry of that step (after a worker died
between making a credential and writing the Secret) first revokes what its earlier attempts
made, so no credential is left live that nothing holds.

AppRole (``ASTRA_OPS_VAULT_CREDENTIAL=approle``): the Astra contract gives the services a
token (ASTRA_VAULT_TOKEN); they do not log in. So the worker is AppRole's trusted broker: it
issues a single-use, short-lived secret_id and spends it at once on a login whose (periodic)
token goes into the Secret. Writing ASTRA_VAULT_ROLE_ID and ASTRA_VAULT_SECRET_ID into the
Secret instead would need services that log in (they do not), and would put both halves of the
AppRole side by side in one Secret, a long-lived credential as strong as a token but harder to
revoke (the tokens it had made would live on). What AppRole adds over a periodic token: the
token's policies come from the role (not from whoever issues it), Vault gives the platform an
entity of its own (audit, identity), and no secret_id outlives the step that made it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeats import heartbeating_sync
from activities.kube_models import DEFAULT_NAMESPACE, DEFAULT_VAULT_SECRET
from activities.kubernetes import KubernetesActivities
from activities.mutation import Mutation, MutationResult
from activities.secret_sources import SecretSource, SourceError, read_source

if TYPE_CHECKING:
    import hvac

_T = TypeVar("_T")

ADDR_KEY, TOKEN_KEY, PATH_KEY = "ASTRA_VAULT_ADDR", "ASTRA_VAULT_TOKEN", "ASTRA_VAULT_PATH"
ISSUED_BY = "astra-ops-vault-setup"
"""The ``issued_by`` metadata of every platform token this runbook makes."""


def fingerprint(text: str) -> str:
    """A short, one-way name for a credential, safe to show: which one, never what it is."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:12]


def policy_text(mount: str, path: str) -> str:
    """Read-only access to the platform's KV-v2 path and what lies under it; nothing else."""
    return "".join(
        f'path "{mount}/{kind}/{path}{tail}" {{\n  capabilities = {caps}\n}}\n'
        for kind, caps in (("data", '["read"]'), ("metadata", '["read", "list"]'))
        for tail in ("", "/*")
    )


@dataclass(frozen=True)
class VaultConfig:
    """What the worker's settings say about Vault (``runtime.settings``)."""

    address: str | None
    token: str | None
    token_file: Path | None
    unseal_keys_file: Path | None
    source_root: Path | None
    source_env_prefix: str | None
    token_period_seconds: int
    credential: Literal["token", "approle"] = "token"
    """How the platform's token is made: a periodic orphan token, or an AppRole login."""
    approle_mount: str = "approle"
    secret_id_ttl_seconds: int = 600


# ----- inputs and results ---------------------------------------------------------------------


class VaultCheck(BaseModel):
    """Ask the worker's Vault how it is."""


class VaultHealth(BaseModel):
    address: str
    initialized: bool
    sealed: bool
    version: str = ""
    can_unseal: bool = False
    """Whether the worker's settings name unseal keys."""

    def summary(self) -> str:
        state = (
            "not initialised"
            if not self.initialized
            else "sealed"
            if self.sealed
            else "initialised and unsealed"
        )
        return f"Vault {self.version} at {self.address}: {state}"


class Unseal(Mutation):
    """Unseal the worker's Vault with the keys its settings name."""


class KvMount(BaseModel):
    mount: str


class MountState(BaseModel):
    mount: str
    engine: str | None
    """None: nothing is mounted there."""
    kv_version: str | None = None

    @property
    def is_kv2(self) -> bool:
        return self.engine == "kv" and self.kv_version == "2"

    def summary(self) -> str:
        if self.engine is None:
            return f"nothing mounted at {self.mount}/"
        return f"{self.mount}/ is {self.engine}" + (
            f" version {self.kv_version}" if self.kv_version else ""
        )


class EnsureKvMount(Mutation):
    mount: str


class SecretsRef(BaseModel):
    mount: str
    path: str
    source: str
    """``file:NAME``, ``directory:NAME`` or ``env:PREFIX`` (``secret_sources``)."""


class SecretsDiff(BaseModel):
    """How the stored secrets differ from the source, by key name."""

    path: str
    version: int
    """The stored version compared (0: nothing stored yet); the write's check-and-set."""
    added: list[str]
    changed: list[str]
    unchanged: list[str]
    kept: list[str]
    """Stored keys the source does not have: left as they are."""

    @property
    def to_write(self) -> list[str]:
        return [*self.added, *self.changed]

    def summary(self) -> str:
        return (
            f"{self.path} v{self.version}: {len(self.added)} new, {len(self.changed)} changed "
            f"({', '.join(self.to_write) or 'none'}), {len(self.unchanged)} unchanged, "
            f"{len(self.kept)} only in Vault"
        )


class LoadSecrets(Mutation):
    mount: str
    path: str
    source: str
    expected_version: int = Field(ge=0)
    """The version the run compared against: anything newer is someone else's write."""


class SecretsLoaded(MutationResult):
    written: list[str] = Field(default_factory=list)
    version: int


class PolicyRef(BaseModel):
    name: str
    mount: str
    path: str


class PolicyState(BaseModel):
    name: str
    exists: bool
    current: bool
    """It grants exactly what the runbook's policy for the path grants."""

    def summary(self) -> str:
        if not self.exists:
            return f"policy {self.name} does not exist"
        return f"policy {self.name} is " + ("current" if self.current else "different")


class WritePolicy(Mutation):
    name: str
    mount: str
    path: str


class PlatformRef(BaseModel):
    namespace: str = DEFAULT_NAMESPACE
    secret: str = DEFAULT_VAULT_SECRET
    address: str | None = None
    """ASTRA_VAULT_ADDR the services are to use; None: the worker's own Vault address."""
    mount: str
    path: str
    policy: str


class PlatformCredential(BaseModel):
    """What the platform's Secret holds, compared with the goal: names and fingerprints."""

    address: str | None
    path: str | None
    goal_address: str
    goal_path: str
    token: str | None = None
    """The token's accessor fingerprint, None when the Secret has no token Vault knows."""
    token_current: bool = False
    """The token is valid, periodic, has exactly the platform policy and was issued for the
    goal path."""

    @property
    def stale_keys(self) -> list[str]:
        return [
            key
            for key, ok in (
                (ADDR_KEY, self.address == self.goal_address),
                (TOKEN_KEY, self.token_current),
                (PATH_KEY, self.path == self.goal_path),
            )
            if not ok
        ]

    def summary(self) -> str:
        stale = self.stale_keys
        token = f"token {self.token}" if self.token else "no valid token"
        return f"{token}; " + (f"to update: {', '.join(stale)}" if stale else "all current")


class IssueCredential(PlatformRef, Mutation):
    """Make the platform's Secret name the goal address and path, with a current token."""


class CredentialIssued(MutationResult):
    updated: list[str] = Field(default_factory=list)
    """The Secret's keys written."""
    token: str | None = None
    """The (new) token's accessor fingerprint."""
    replaced: str | None = None
    """The fingerprint of the token it replaces, still to revoke."""


class RevokeReplaced(Mutation):
    namespace: str = DEFAULT_NAMESPACE
    secret: str = DEFAULT_VAULT_SECRET


class CredentialProbe(BaseModel):
    namespace: str = DEFAULT_NAMESPACE
    secret: str = DEFAULT_VAULT_SECRET
    mount: str
    path: str


class CredentialVerdict(BaseModel):
    reads_path: bool
    denied: list[str]
    allowed: list[str]
    """Probes outside its path the credential was not refused: each is a leak."""

    @property
    def ok(self) -> bool:
        return self.reads_path and not self.allowed

    def summary(self) -> str:
        own = "reads its path" if self.reads_path else "CANNOT read its path"
        leaks = f"; NOT denied: {', '.join(self.allowed)}" if self.allowed else ""
        return f"{own}; denied {', '.join(self.denied)}{leaks}"


# ----- the activities -------------------------------------------------------------------------


class VaultActivities:
    """`vault-setup`'s side effects on the worker's Vault and the platform's Secret."""

    def __init__(self, config: VaultConfig, kubernetes: KubernetesActivities) -> None:
        self.config = config
        self.kubernetes = kubernetes

    # -- helpers ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        if not self.config.address:
            raise ApplicationError(
                "ASTRA_OPS_VAULT_ADDR is not set: the worker does not know which Vault to set "
                "up; set it (and ASTRA_OPS_VAULT_TOKEN_FILE) and restart the worker",
                type="VaultNotConfigured",
                non_retryable=True,
            )
        return self.config.address

    def _client(self, token: str | None = None) -> hvac.Client:
        import hvac

        if token is None:
            file = self.config.token_file
            token = file.read_text().strip() if file is not None else self.config.token
        return hvac.Client(url=self.address, token=token, timeout=10)

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Vault's refusals as failures that say what failed and what to do; a Vault that does
        not answer is retried (it may be restarting)."""
        import hvac.exceptions as vault
        import requests

        try:
            yield
        except (vault.Unauthorized, vault.Forbidden) as e:
            raise ApplicationError(
                f"Vault at {self.address} refused to {action} ({type(e).__name__}): the worker's "
                "token lacks the permission; give it a policy that allows this (setting up Vault "
                "needs an admin token)",
                type="VaultForbidden",
                non_retryable=True,
            ) from None
        except vault.VaultDown:
            raise ApplicationError(
                f"Vault at {self.address} is sealed, so it cannot {action}; unseal it and re-run",
                type="VaultSealed",
                non_retryable=True,
            ) from None
        except requests.RequestException as e:
            raise ApplicationError(
                f"Vault at {self.address} did not answer while trying to {action} "
                f"({type(e).__name__}); is it running?",
                type="VaultUnreachable",
            ) from None

    def _call(self, action: str, fn: Callable[[], _T]) -> _T:
        with self._errors(action):
            return fn()

    def _stored(self, client: hvac.Client, mount: str, path: str) -> tuple[dict[str, str], int]:
        """The stored key/values and their version; nothing stored is version 0."""
        import hvac.exceptions as vault

        try:
            read = client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=mount, raise_on_deleted_version=False
            )
        except vault.InvalidPath:
            # Nothing at the path, or a deleted version (its version is still the one to CAS).
            try:
                meta = client.secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount)
            except vault.InvalidPath:
                return {}, 0
            return {}, int(meta["data"]["current_version"])
        data = read["data"]
        return dict(data.get("data") or {}), int(data["metadata"]["version"])

    def _source(self, text: str) -> dict[str, str]:
        try:
            source = SecretSource.parse(text)
            return read_source(
                source, self.config.source_root, self.config.source_env_prefix, os.environ
            )
        except SourceError as e:
            raise ApplicationError(
                f"cannot load {source.describe()}: {e}",
                type="SecretSourceError",
                non_retryable=True,
            ) from None

    def _platform_secret(self, namespace: str, name: str) -> tuple[dict[str, str], str]:
        return self.kubernetes.secret_data(namespace, name)

    def _lookup(self, client: hvac.Client, token: str) -> dict[str, Any] | None:
        """What Vault knows of a token; None for a token it does not know (revoked, expired)."""
        import hvac.exceptions as vault

        if not token:
            return None
        try:
            found: dict[str, Any] = client.auth.token.lookup(token)["data"]
        except (vault.Forbidden, vault.InvalidRequest, vault.InvalidPath):
            return None
        return found

    def _state(self, req: PlatformRef) -> tuple[PlatformCredential, dict[str, Any] | None, str]:
        data, _ = self._platform_secret(req.namespace, req.secret)
        goal_path = f"{req.mount}/{req.path}"
        with self._errors("look up the platform's token"):
            found = self._lookup(self._client(), data.get(TOKEN_KEY, ""))
        meta = (found or {}).get("meta") or {}
        current = bool(
            found
            and sorted(found.get("policies") or []) == sorted(["default", req.policy])
            and int(found.get("period") or 0) > 0
            and meta.get("path") == goal_path
            # Of the kind the settings ask for: an AppRole login's token names its role.
            and meta.get("role_name")
            == (req.policy if self.config.credential == "approle" else None)
        )
        state = PlatformCredential(
            address=data.get(ADDR_KEY),
            path=data.get(PATH_KEY),
            goal_address=req.address or self.address,
            goal_path=goal_path,
            token=fingerprint(found["accessor"]) if found else None,
            token_current=current,
        )
        return state, found, data.get(TOKEN_KEY, "")

    def _periodic_token(
        self, client: hvac.Client, policy: str, meta: dict[str, str]
    ) -> tuple[str, str]:
        """A new periodic orphan token with only the platform's policy: (token, accessor)."""
        created = client.auth.token.create_orphan(
            policies=[policy],
            period=f"{self.config.token_period_seconds}s",
            display_name="astra-platform",
            renewable=True,
            meta=meta,
        )
        return created["auth"]["client_token"], created["auth"]["accessor"]

    def _approle_login(
        self, client: hvac.Client, role: str, meta: dict[str, str]
    ) -> tuple[str, str]:
        """Log in to the platform's AppRole (made or brought up to date here) with a new
        single-use secret_id: (token, accessor). The secret_id's metadata is set on the token,
        so the token names the step that made it, the path and the token it replaces."""
        mount = self.config.approle_mount
        methods: dict[str, Any] = client.sys.list_auth_methods()
        if f"{mount}/" not in (methods.get("data") or methods):
            client.sys.enable_auth_method("approle", path=mount)
        approle = client.auth.approle
        # Written on every issue: a role someone loosened by hand is brought back to this.
        approle.create_or_update_approle(
            role,
            token_policies=[role],
            token_period=f"{self.config.token_period_seconds}s",
            token_type="service",
            secret_id_num_uses=1,
            secret_id_ttl=f"{self.config.secret_id_ttl_seconds}s",
            mount_point=mount,
        )
        role_id = approle.read_role_id(role, mount_point=mount)["data"]["role_id"]
        secret_id = approle.generate_secret_id(role, metadata=meta, mount_point=mount)["data"]
        login = self._client("").auth.approle.login(
            role_id, secret_id["secret_id"], use_token=False, mount_point=mount
        )["auth"]
        return login["client_token"], login["accessor"]

    def _discard_earlier_attempts(
        self, client: hvac.Client, req: IssueCredential, keep: str
    ) -> list[str]:
        """Revoke the tokens (and destroy the unspent secret_ids) an earlier attempt of this
        step made: a worker that died before writing the Secret left them live and unheld.
        Found by the step's idempotency token in their metadata; ``keep`` (the Secret's
        token) is never touched. Returns their fingerprints.

        Only a retry looks: listing every token's accessor costs a lookup per token, and a first
        attempt (the step runner retries only through the activity's retry policy) has nothing
        earlier to find."""
        import hvac.exceptions as vault

        if not req.token or (activity.in_activity() and activity.info().attempt == 1):
            return []
        mine = {"issued_by": ISSUED_BY, "step": req.token}
        gone: list[str] = []
        tokens = client.auth.token
        for accessor in tokens.list_accessors()["data"]["keys"]:
            try:
                meta = tokens.lookup_accessor(accessor)["data"].get("meta") or {}
            except (vault.InvalidRequest, vault.InvalidPath):
                continue  # revoked or expired since it was listed
            if accessor != keep and mine.items() <= meta.items():
                tokens.revoke_accessor(accessor)
                gone.append(f"token {fingerprint(accessor)}")
        if self.config.credential != "approle":
            return gone
        approle, mount = client.auth.approle, self.config.approle_mount
        try:
            unspent = approle.list_secret_id_accessors(req.policy, mount_point=mount)
        except (vault.InvalidPath, vault.InvalidRequest):
            return gone  # no secret_id of the role left, or no role yet
        for accessor in unspent["data"]["keys"]:
            try:
                found = approle.read_secret_id_accessor(req.policy, accessor, mount_point=mount)
            except (vault.InvalidRequest, vault.InvalidPath):
                continue
            if mine.items() <= ((found.get("data") or {}).get("metadata") or {}).items():
                approle.destroy_secret_id_accessor(req.policy, accessor, mount_point=mount)
                gone.append(f"secret_id {fingerprint(accessor)}")
        return gone

    # -- checks ----------------------------------------------------------------------------

    @activity.defn
    def vault_health(self, req: VaultCheck) -> VaultHealth:
        """Initialised and unsealed? (``sys/seal-status`` answers even a sealed Vault.)"""
        status: dict[str, Any] = self._call(
            "report its seal status", lambda: self._client().sys.read_seal_status()
        )
        return VaultHealth(
            address=self.address,
            initialized=bool(status.get("initialized")),
            sealed=bool(status.get("sealed")),
            version=str(status.get("version") or ""),
            can_unseal=self.config.unseal_keys_file is not None,
        )

    @activity.defn
    def kv_mount(self, req: KvMount) -> MountState:
        """What is mounted at the path: KV version 2, something else, or nothing."""
        mounts: dict[str, Any] = self._call(
            "list its secrets engines",
            lambda: self._client().sys.list_mounted_secrets_engines()["data"],
        )
        found = mounts.get(f"{req.mount}/")
        if found is None:
            return MountState(mount=req.mount, engine=None)
        return MountState(
            mount=req.mount,
            engine=found.get("type"),
            kv_version=(found.get("options") or {}).get("version"),
        )

    @activity.defn
    def compare_secrets(self, req: SecretsRef) -> SecretsDiff:
        """The source against the stored secrets, by key name (values are compared here)."""
        wanted = self._source(req.source)
        stored, version = self._call(
            f"read {req.mount}/{req.path}",
            lambda: self._stored(self._client(), req.mount, req.path),
        )
        return SecretsDiff(
            path=f"{req.mount}/{req.path}",
            version=version,
            added=sorted(k for k in wanted if k not in stored),
            changed=sorted(k for k in wanted if k in stored and stored[k] != wanted[k]),
            unchanged=sorted(k for k in wanted if k in stored and stored[k] == wanted[k]),
            kept=sorted(k for k in stored if k not in wanted),
        )

    @activity.defn
    def policy_state(self, req: PolicyRef) -> PolicyState:
        """Whether the policy exists and grants exactly read access to the platform's path."""
        import hvac.exceptions as vault

        with self._errors(f"read policy {req.name}"):
            try:
                read = self._client().sys.read_policy(req.name)
            except vault.InvalidPath:
                return PolicyState(name=req.name, exists=False, current=False)
        rules = (read.get("data") or read).get("rules", "")
        return PolicyState(
            name=req.name,
            exists=True,
            current=rules.strip() == policy_text(req.mount, req.path).strip(),
        )

    @activity.defn
    def platform_credential(self, req: PlatformRef) -> PlatformCredential:
        """What the platform's Secret names, and whether its token is the one it should be."""
        return self._state(req)[0]

    @activity.defn
    def verify_credential(self, req: CredentialProbe) -> CredentialVerdict:
        """With the token the platform's Secret holds: read its own path, and be refused reading
        and writing a sibling path and listing Vault's policies."""
        import hvac.exceptions as vault

        data, _ = self._platform_secret(req.namespace, req.secret)
        client = self._client(data.get(TOKEN_KEY, ""))
        kv = client.secrets.kv.v2
        sibling = f"{req.path}-outside-probe"
        probes: dict[str, Callable[[], object]] = {
            f"read {req.mount}/{sibling}": lambda: kv.read_secret_version(
                path=sibling, mount_point=req.mount, raise_on_deleted_version=False
            ),
            # cas=0 only creates: an allowed probe cannot overwrite anything.
            f"write {req.mount}/{sibling}": lambda: kv.create_or_update_secret(
                path=sibling, secret={"probe": "denied?"}, cas=0, mount_point=req.mount
            ),
            "list policies": lambda: client.sys.list_acl_policies(),
        }
        with self._errors("answer the credential's probes"):
            try:
                kv.read_secret_version(
                    path=req.path, mount_point=req.mount, raise_on_deleted_version=False
                )
                reads = True
            except (vault.Forbidden, vault.InvalidPath, vault.Unauthorized):
                reads = False
            denied, allowed = [], []
            for name, probe in probes.items():
                try:
                    probe()
                except (vault.Forbidden, vault.Unauthorized):
                    denied.append(name)
                    continue
                except (vault.InvalidPath, vault.InvalidRequest):
                    pass  # allowed: only nothing there, or already something
                allowed.append(name)
        return CredentialVerdict(reads_path=reads, denied=denied, allowed=allowed)

    # -- changes ---------------------------------------------------------------------------

    @activity.defn
    def unseal(self, req: Unseal) -> MutationResult:
        """Submit the unseal keys of the file the settings name; an unsealed Vault is left be."""
        health = self.vault_health(VaultCheck())
        if not health.sealed:
            return MutationResult(changed=False, detail=f"Vault at {self.address} is unsealed")
        file = self.config.unseal_keys_file
        if file is None:
            raise ApplicationError(
                "ASTRA_OPS_VAULT_UNSEAL_KEYS_FILE is not set; unseal Vault by hand",
                type="VaultSealed",
                non_retryable=True,
            )
        if req.dry_run:
            return MutationResult(
                changed=False, detail=f"would unseal Vault at {self.address} with {file}'s keys"
            )
        keys = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        status: dict[str, Any] = self._call(
            "unseal", lambda: self._client().sys.submit_unseal_keys(keys)
        )
        if status.get("sealed"):
            raise ApplicationError(
                f"Vault at {self.address} is still sealed after the {len(keys)} keys of {file} "
                f"({status.get('progress')}/{status.get('t')}): the file holds too few or wrong "
                "keys; unseal it by hand",
                type="VaultSealed",
                non_retryable=True,
            )
        return MutationResult(changed=True, detail=f"unsealed Vault at {self.address}")

    @activity.defn
    def ensure_kv_mount(self, req: EnsureKvMount) -> MutationResult:
        """Mount KV-v2 where nothing is mounted; never remounts or upgrades another engine."""
        found = self.kv_mount(KvMount(mount=req.mount))
        if found.is_kv2:
            return MutationResult(changed=False, detail=f"{req.mount}/ is already KV-v2")
        if found.engine is not None:
            raise ApplicationError(
                f"{found.summary()}, not KV version 2; move or upgrade it by hand (`bao kv "
                f"enable-versioning {req.mount}/`), or choose another mount",
                type="WrongEngine",
                non_retryable=True,
            )
        if req.dry_run:
            return MutationResult(changed=False, detail=f"would mount KV-v2 at {req.mount}/")
        self._call(
            f"mount KV-v2 at {req.mount}/",
            lambda: self._client().sys.enable_secrets_engine(
                "kv", path=req.mount, options={"version": "2"}
            ),
        )
        return MutationResult(changed=True, detail=f"mounted KV-v2 at {req.mount}/")

    @activity.defn
    def load_secrets(self, req: LoadSecrets) -> SecretsLoaded:
        """Write the source's new and changed keys, with check-and-set on the version the run
        compared: a retry after success finds nothing to write, and a write by someone else in
        between stops the run instead of being overwritten."""
        import hvac.exceptions as vault

        target = f"{req.mount}/{req.path}"
        wanted = self._source(req.source)
        client = self._client()
        stored, version = self._call(
            f"read {target}", lambda: self._stored(client, req.mount, req.path)
        )
        writes = {k: v for k, v in wanted.items() if stored.get(k) != v}
        if not writes:
            return SecretsLoaded(
                changed=False,
                detail=f"{target} v{version} already holds the source's {len(wanted)} keys",
                version=version,
            )
        names = sorted(writes)
        if version != req.expected_version:
            raise ApplicationError(
                f"{target} is at version {version}, not {req.expected_version} as this run "
                f"compared it: someone else wrote it since, so {', '.join(names)} were not "
                "written over their change. Check who wrote it, then re-run",
                type="ConcurrentWrite",
                non_retryable=True,
            )
        if req.dry_run:
            return SecretsLoaded(
                changed=False,
                detail=f"would write {', '.join(names)} to {target} (v{version})",
                version=version,
            )
        try:
            with self._errors(f"write {target}"):
                written = client.secrets.kv.v2.create_or_update_secret(
                    path=req.path, mount_point=req.mount, secret={**stored, **writes}, cas=version
                )
        except vault.InvalidRequest as e:
            if "check-and-set" not in str(e):
                raise
            raise ApplicationError(
                f"{target} changed while this run wrote it (check-and-set on version {version} "
                f"refused): {', '.join(names)} were not written over another writer's change. "
                "Check who wrote it, then re-run",
                type="ConcurrentWrite",
                non_retryable=True,
            ) from None
        new_version = int(written["data"]["version"])
        return SecretsLoaded(
            changed=True,
            detail=f"wrote {', '.join(names)} to {target} (v{version} -> v{new_version})",
            written=names,
            version=new_version,
        )

    @activity.defn
    def write_policy(self, req: WritePolicy) -> MutationResult:
        """Write the platform's read-only policy for its path, unless it is already that."""
        if self.policy_state(PolicyRef(name=req.name, mount=req.mount, path=req.path)).current:
            return MutationResult(changed=False, detail=f"policy {req.name} is current")
        if req.dry_run:
            return MutationResult(
                changed=False,
                detail=f"would write policy {req.name}: read {req.mount}/{req.path} only",
            )
        text = policy_text(req.mount, req.path)
        self._call(
            f"write policy {req.name}",
            lambda: self._client().sys.create_or_update_policy(req.name, text),
        )
        return MutationResult(
            changed=True, detail=f"wrote policy {req.name}: read {req.mount}/{req.path} only"
        )

    @activity.defn
    def issue_credential(self, req: IssueCredential) -> CredentialIssued:
        """Update the keys of the platform's Secret that differ from the goal; a token that is
        not current is replaced by a new one (periodic orphan token or AppRole login, per the
        settings), which records the old one's accessor so a later step revokes it (after the
        services run with the new one), and this step's token, so a retry revokes what an
        earlier attempt made but never wrote."""
        state, found, _ = self._state(req)
        stale = state.stale_keys
        target = f"{req.namespace}/{req.secret}"
        if not stale:
            return CredentialIssued(changed=False, detail=f"{target} is current", token=state.token)
        replaced = state.token if TOKEN_KEY in stale else None
        if req.dry_run:
            return CredentialIssued(
                changed=False,
                detail=f"would update {', '.join(stale)} in {target}"
                + (f" and then revoke token {replaced}" if replaced else ""),
                token=state.token,
            )
        values = {ADDR_KEY: state.goal_address, PATH_KEY: state.goal_path}
        token_fp = state.token
        discarded: list[str] = []
        if TOKEN_KEY in stale:
            client = self._client()
            # No empty values: AppRole refuses them in a secret_id's metadata.
            meta = {
                "issued_by": ISSUED_BY,
                "path": state.goal_path,
                **({"replaces": found["accessor"]} if found else {}),
                **({"step": req.token} if req.token else {}),
            }
            # A retry looks up every token's accessor, one request each: it may take long.
            with (
                heartbeating_sync("revoking what an earlier attempt of this step issued"),
                self._errors("revoke what an earlier attempt of this step issued"),
            ):
                discarded = self._discard_earlier_attempts(
                    client, req, keep=found["accessor"] if found else ""
                )
            with self._errors(f"issue the platform's token ({self.config.credential})"):
                values[TOKEN_KEY], accessor = (
                    self._approle_login(client, req.policy, meta)
                    if self.config.credential == "approle"
                    else self._periodic_token(client, req.policy, meta)
                )
            token_fp = fingerprint(accessor)
        # Read again just before the write: its version is the write's precondition.
        data, version = self._platform_secret(req.namespace, req.secret)
        updates = {k: v for k, v in values.items() if data.get(k) != v}
        self.kubernetes.put_secret_data(req.namespace, req.secret, updates, version)
        return CredentialIssued(
            changed=True,
            detail=f"updated {', '.join(sorted(updates))} in {target}"
            + (f" (token {token_fp}, replacing {replaced})" if replaced else "")
            + (
                f"; revoked {', '.join(discarded)}, left by an earlier attempt of this step"
                if discarded
                else ""
            ),
            updated=sorted(updates),
            token=token_fp,
            replaced=replaced,
        )

    @activity.defn
    def revoke_replaced(self, req: RevokeReplaced) -> MutationResult:
        """Revoke the token the platform's current token replaced (named in its metadata)."""
        import hvac.exceptions as vault

        data, _ = self._platform_secret(req.namespace, req.secret)
        client = self._client()
        with self._errors("look up the platform's token"):
            found = self._lookup(client, data.get(TOKEN_KEY, ""))
        old = ((found or {}).get("meta") or {}).get("replaces") or ""
        if not old:
            return MutationResult(changed=False, detail="the platform's token replaced none")
        with self._errors("revoke the replaced token"):
            try:
                client.auth.token.lookup_accessor(old)
            except (vault.InvalidRequest, vault.Forbidden, vault.InvalidPath):
                return MutationResult(
                    changed=False, detail=f"token {fingerprint(old)} is already revoked"
                )
            if req.dry_run:
                return MutationResult(changed=False, detail=f"would revoke {fingerprint(old)}")
            client.auth.token.revoke_accessor(old)
        return MutationResult(changed=True, detail=f"revoked the replaced token {fingerprint(old)}")
