"""Vault Setup: load Astra's secrets into KV-v2 and give the platform a least-privilege credential.

Operations wiki: trigger "Initial or reconfigured — set ASTRA_VAULT_ADDR/TOKEN/PATH, load secrets
to KV-v2". Everything is read and compared before a person is asked, so a re-run with the same
input changes nothing and asks nobody. The order matters: the secrets and the policy exist before
a token for them does; the services are restarted onto the new Secret before the token it
replaces is revoked (revoking first would cut them off); and the new token must read its path
and be refused everything else before the run succeeds.

The platform's token is a periodic orphan token or, when the worker's settings say
``ASTRA_OPS_VAULT_CREDENTIAL=approle``, the token of a login to an AppRole bound to the policy
(the services read a token; they do not log in). A worker that dies between issuing it and
writing the Secret leaves nothing behind: the step's retry revokes what its attempt issued.

No value passes through this workflow: activities read the source, the worker's token and the
platform's token themselves, and report key names, versions and fingerprints.

Rollback: none. Written secret versions stay in KV-v2's history (a person restores one with
``bao kv rollback``); a replaced token is only revoked once the services run with the new one.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from temporalio import workflow

from workflows.models import (
    DAY,
    KubernetesLabel,
    KubernetesName,
    Outcome,
    RunbookRequest,
    RunbookResult,
)
from workflows.rollouts import roll, roll_steps
from workflows.runbook import Runbook, RunbookSpec

with workflow.unsafe.imports_passed_through():
    from activities.kube_models import SecretRef
    from activities.kubernetes import KubernetesActivities
    from activities.secret_sources import SOURCE_PATTERN
    from activities.vault import (
        CredentialProbe,
        EnsureKvMount,
        IssueCredential,
        KvMount,
        LoadSecrets,
        PlatformRef,
        PolicyRef,
        RevokeReplaced,
        SecretsRef,
        Unseal,
        VaultActivities,
        VaultCheck,
        WritePolicy,
    )

ISSUE_TIMEOUT = timedelta(minutes=10)
"""Issuing the platform's credential; a retried attempt first revokes what the earlier one issued,
found by looking up every token's accessor, one request each."""

SERVICES = ["astra-scheduler", "astra-worker", "agent-service", "goal-service", "gateway"]
"""The platform contract's Deployments, which all read ``astra-vault``."""

SEGMENT = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$"


class VaultSetupRequest(RunbookRequest):
    namespace: KubernetesLabel = "astra"
    secret: KubernetesName = Field(
        default="astra-vault",
        description="the Secret the platform reads ASTRA_VAULT_ADDR/TOKEN/PATH from",
    )
    address: str | None = Field(
        default=None,
        max_length=256,
        pattern=r"^https?://[^\s/]+/?$",
        description="ASTRA_VAULT_ADDR as the services reach Vault; default: the worker's address",
    )
    mount: str = Field(default="secret", max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    path: str = Field(
        default="astra",
        max_length=200,
        pattern=SEGMENT,
        description="where in the KV-v2 mount the platform's secrets live",
    )
    source: str = Field(
        max_length=520,
        pattern=SOURCE_PATTERN,
        description="where the worker reads the secrets to load: file:NAME (KEY=value lines) or "
        "directory:NAME (a file per key) under its ASTRA_OPS_VAULT_SOURCE_ROOT, or env:PREFIX "
        "(variables under its ASTRA_OPS_VAULT_SOURCE_ENV_PREFIX)",
        examples=["directory:astra"],
    )
    policy: str = Field(default="astra-platform", max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    services: list[KubernetesName] = Field(
        default=SERVICES,
        max_length=20,
        description="the Deployments restarted when the Secret changes; every one that reads "
        "it must be here, or it would keep a revoked token",
    )
    rollout_timeout_seconds: float = Field(default=600, gt=0, le=DAY)


SPEC = RunbookSpec(
    name="vault-setup",
    title="Vault Setup",
    trigger="Initial or reconfigured",
    rotation="kernel-sre",
    severity="SEV3",
    request=VaultSetupRequest,
    subject=lambda req: req.namespace,
    steps=lambda req: [
        "check Vault is initialised and unsealed",
        "approve unsealing Vault",
        "unseal Vault",
        "check the KV-v2 mount",
        "compare the source with the stored secrets",
        "check the platform's policy",
        f"check the credential in {req.secret}",
        f"find the services that read {req.secret}",
        "approve the Vault setup",
        "mount KV-v2",
        "write the changed secrets",
        "write the platform's policy",
        f"update {req.secret}",
        *roll_steps(*req.services),
        "verify the credential reads its path and nothing else",
        "revoke the replaced credential",
    ],
)


@workflow.defn(name=SPEC.name)
class VaultSetup(Runbook):
    spec = SPEC

    @workflow.run
    async def run(self, req: VaultSetupRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._setup(req))

    async def _setup(self, req: VaultSetupRequest) -> RunbookResult:
        health = await self.steps.check(
            "check Vault is initialised and unsealed", VaultActivities.vault_health, VaultCheck()
        )
        if not health.initialized:
            raise self.steps.fail(
                "check Vault is initialised and unsealed",
                f"Vault at {health.address} is not initialised; initialise it (`bao operator "
                "init`), keep its unseal keys and root token safe, then re-run",
            )
        if health.sealed and not health.can_unseal:
            raise self.steps.fail(
                "check Vault is initialised and unsealed",
                f"Vault at {health.address} is sealed; unseal it (`bao operator unseal`, by the "
                "key holders) or set ASTRA_OPS_VAULT_UNSEAL_KEYS_FILE on the worker, then re-run",
            )
        if health.sealed:
            await self.steps.approval(
                "approve unsealing Vault",
                f"Vault at {health.address} is sealed. Unseal it with the keys the worker's "
                f"settings name? {req.reason}",
            )
            unsealed = await self.steps.act("unseal Vault", VaultActivities.unseal, Unseal())
            if req.dry_run:
                return self.steps.finish(
                    Outcome.DONE,
                    f"dry-run: {unsealed.detail}; nothing more can be read while it is sealed",
                )
        else:
            self.steps.skip("approve unsealing Vault", "not needed: Vault is unsealed")
            self.steps.skip("unseal Vault", "not needed: Vault is unsealed")

        mount = await self.steps.check(
            "check the KV-v2 mount", VaultActivities.kv_mount, KvMount(mount=req.mount)
        )
        if mount.engine is not None and not mount.is_kv2:
            raise self.steps.fail(
                "check the KV-v2 mount",
                f"{mount.summary()}, not KV version 2; upgrade it (`bao kv enable-versioning "
                f"{req.mount}/`) or choose another mount, then re-run",
            )
        diff = await self.steps.check(
            "compare the source with the stored secrets",
            VaultActivities.compare_secrets,
            SecretsRef(mount=req.mount, path=req.path, source=req.source),
        )
        policy = await self.steps.check(
            "check the platform's policy",
            VaultActivities.policy_state,
            PolicyRef(name=req.policy, mount=req.mount, path=req.path),
        )
        platform = PlatformRef(
            namespace=req.namespace,
            secret=req.secret,
            address=req.address,
            mount=req.mount,
            path=req.path,
            policy=req.policy,
        )
        credential = await self.steps.check(
            f"check the credential in {req.secret}",
            VaultActivities.platform_credential,
            platform,
        )
        readers = await self.steps.check(
            f"find the services that read {req.secret}",
            KubernetesActivities.secret_readers,
            SecretRef(namespace=req.namespace, name=req.secret),
        )
        unlisted = [d for d in readers.deployments if d not in req.services]
        if unlisted and credential.stale_keys:
            raise self.steps.fail(
                f"find the services that read {req.secret}",
                f"{', '.join(unlisted)} read {req.secret} but are not in this run's services: "
                "they would keep the replaced token; add them to `services` and re-run",
            )

        changes = [
            *([f"mount KV-v2 at {req.mount}/"] if mount.engine is None else []),
            *(
                [f"write {', '.join(diff.to_write)} to {diff.path} (v{diff.version})"]
                if diff.to_write
                else []
            ),
            *([f"write policy {req.policy}"] if not policy.current else []),
            *(
                [f"update {', '.join(credential.stale_keys)} in {req.secret}"]
                if credential.stale_keys
                else []
            ),
        ]
        if not changes:
            return self.steps.finish(
                Outcome.NO_CHANGE,
                f"{diff.path} v{diff.version} holds the source's {len(diff.unchanged)} keys; "
                f"policy {req.policy} and the credential in {req.secret} are current",
            )
        restarted = [d for d in req.services if d in readers.deployments]
        rolls = bool(credential.stale_keys) and bool(restarted)
        await self.steps.approval(
            "approve the Vault setup",
            "; ".join(changes)
            + (f"; then restart {', '.join(restarted)}" if rolls else "")
            + f". {req.reason}",
        )

        if mount.engine is None:
            await self.steps.act(
                "mount KV-v2", VaultActivities.ensure_kv_mount, EnsureKvMount(mount=req.mount)
            )
        else:
            self.steps.skip("mount KV-v2", f"not needed: {mount.summary()}")
        if diff.to_write:
            await self.steps.act(
                "write the changed secrets",
                VaultActivities.load_secrets,
                LoadSecrets(
                    mount=req.mount,
                    path=req.path,
                    source=req.source,
                    expected_version=diff.version,
                ),
            )
        else:
            self.steps.skip("write the changed secrets", f"not needed: {diff.summary()}")
        if not policy.current:
            await self.steps.act(
                "write the platform's policy",
                VaultActivities.write_policy,
                WritePolicy(name=req.policy, mount=req.mount, path=req.path),
            )
        else:
            self.steps.skip("write the platform's policy", f"not needed: {policy.summary()}")
        if not credential.stale_keys:
            self.steps.skip(f"update {req.secret}", f"not needed: {credential.summary()}")
            return self.steps.finish(
                Outcome.DONE,
                ("dry-run: " if req.dry_run else "") + "; ".join(changes),
            )
        issued = await self.steps.act(
            f"update {req.secret}",
            VaultActivities.issue_credential,
            IssueCredential(**platform.model_dump()),
            start_to_close_timeout=ISSUE_TIMEOUT,
        )
        for service in req.services:
            if service not in restarted:
                restart, wait = roll_steps(service)
                self.steps.skip(restart, f"not needed: it does not read {req.secret}")
                self.steps.skip(wait, "not needed")
                continue
            await roll(self.steps, req.namespace, service, req.rollout_timeout_seconds)
        if req.dry_run:
            return self.steps.finish(
                Outcome.DONE,
                f"dry-run: {'; '.join(changes)}; {issued.detail}"
                + (f"; would restart {', '.join(restarted)}" if restarted else ""),
            )
        verdict = await self.steps.verify(
            "verify the credential reads its path and nothing else",
            VaultActivities.verify_credential,
            CredentialProbe(
                namespace=req.namespace, secret=req.secret, mount=req.mount, path=req.path
            ),
        )
        if not verdict.ok:
            raise self.steps.fail(
                "verify the credential reads its path and nothing else",
                f"the new credential {verdict.summary()}: check policy {req.policy} in Vault; the "
                "replaced credential was not revoked",
            )
        revoked = await self.steps.act(
            "revoke the replaced credential",
            VaultActivities.revoke_replaced,
            RevokeReplaced(namespace=req.namespace, secret=req.secret),
        )
        return self.steps.finish(
            Outcome.DONE,
            f"{'; '.join(changes)}; token {issued.token} {verdict.summary()}"
            + (f"; restarted {', '.join(restarted)}" if restarted else "")
            + f"; {revoked.detail}",
        )
