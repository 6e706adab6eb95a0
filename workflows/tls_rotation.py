"""TLS Rotation: renew the certificates of Astra's services before they expire, and prove that
each service serves its new one.

Operations wiki: trigger "Certificate expiration — generate new certs, update K8s secrets, roll
services". The scan reads every certificate twice, in its Secret and from its live endpoint (a
real handshake), so a certificate that expires, is not the CA's, or is not what the endpoint
serves is found before a person is asked. The order matters: the Secret is written before the
service restarts (its pods load it at start), one service at a time, and each is verified by a
handshake (chain against the CA, names, fingerprint) before the next is touched: a service that
still serves its old certificate after the roll stops the run, which never reports success for a
certificate nobody serves.

No key passes through this workflow: the activities issue and write the pairs and report
fingerprints.

Rollback: none automatic. A run that fails, is rejected or is cancelled leaves each Secret as
its last step wrote it: a renewed Secret keeps the pair it replaced as ``previous.tls.crt`` and
``previous.tls.key``, and a run started with ``rollback=true`` puts that pair back and rolls the
service, with approval (putting back an old certificate is a choice for a person, not a reflex:
it may be the one about to expire).
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
from workflows.timeouts import DEFAULT_TIMEOUT

with workflow.unsafe.imports_passed_through():
    from activities.tls import (
        DEFAULT_WINDOW_SHARE,
        CertificateScan,
        CertificateScanRequest,
        RenewCertificate,
        RollbackCertificate,
        ServedCheck,
        TlsActivities,
    )

TLS_SERVICES = ["agent-service", "goal-service", "gateway"]
"""The platform contract's services that serve TLS, each with a ``<name>-tls`` Secret."""
SCAN_PER_SERVICE = timedelta(seconds=15)
"""A scan's work per service: a handshake (5 s at most by default) and a Secret read."""


def scan_timeout(services: list[str]) -> timedelta:
    """How long scanning ``services``' certificates may take (the scan heartbeats)."""
    return DEFAULT_TIMEOUT + len(services) * SCAN_PER_SERVICE


class TlsRotationRequest(RunbookRequest):
    namespace: KubernetesLabel = "astra"
    services: list[KubernetesName] = Field(
        default=TLS_SERVICES, min_length=1, max_length=20, description="the Deployments to scan"
    )
    renewal_window_share: float = Field(
        default=DEFAULT_WINDOW_SHARE,
        gt=0,
        lt=1,
        description="renew a certificate in this last share of its lifetime (policy-bounded)",
    )
    lifetime_days: int = Field(default=90, gt=0, le=398, description="the new certificates'")
    rollback: bool = Field(
        default=False,
        description="put back the certificate each service's last renewal replaced, and roll it",
    )
    rollout_timeout_seconds: float = Field(default=600, gt=0, le=DAY)
    verify_timeout_seconds: float = Field(
        default=60, gt=0, le=3600, description="how long a rolled service may take to serve it"
    )


def _service_steps(service: str) -> list[str]:
    return [
        f"renew {service}'s certificate",
        f"roll back {service}'s certificate",
        *roll_steps(service),
        f"verify {service} serves the certificate in its Secret",
    ]


SPEC = RunbookSpec(
    name="tls-rotation",
    title="TLS Rotation",
    trigger="Certificate expiration",
    rotation="kernel-sre",
    severity="SEV3",
    request=TlsRotationRequest,
    subject=lambda req: req.namespace,
    steps=lambda req: [
        "scan the certificates",
        "approve renewing certificates",
        "approve rolling back certificates",
        *[step for service in req.services for step in _service_steps(service)],
    ],
)


@workflow.defn(name=SPEC.name)
class TlsRotation(Runbook):
    spec = SPEC

    @workflow.run
    async def run(self, req: TlsRotationRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._rotate(req))

    async def _rotate(self, req: TlsRotationRequest) -> RunbookResult:
        scan = await self.steps.check(
            "scan the certificates",
            TlsActivities.scan_certificates,
            CertificateScanRequest(
                namespace=req.namespace,
                services=req.services,
                window_share=req.renewal_window_share,
            ),
            start_to_close_timeout=scan_timeout(req.services),
        )
        if req.rollback:
            return await self._roll_back(req, scan)
        self.steps.skip("approve rolling back certificates", "not asked: this run renews")
        due = scan.due
        restart = [s for s in scan.mismatched if s not in due]
        if not due and not restart:
            return self.steps.finish(
                Outcome.NO_CHANGE,
                "every certificate is outside its renewal window, the CA's, and served: "
                + scan.summary(),
            )
        plan = [
            *([f"renew {', '.join(due)}"] if due else []),
            *(
                [f"restart {', '.join(restart)} (the endpoint serves another certificate)"]
                if restart
                else []
            ),
        ]
        await self.steps.approval(
            "approve renewing certificates", f"{'; '.join(plan)}: {scan.summary()}. {req.reason}"
        )
        served = []
        for service in req.services:
            entry = scan.of(service)
            self.steps.skip(f"roll back {service}'s certificate", "not asked: this run renews")
            if service in due:
                if entry.secret is None:
                    raise self.steps.fail(
                        f"renew {service}'s certificate",
                        f"{entry.stored_error}; mount its kubernetes.io/tls Secret in the "
                        "Deployment, then re-run",
                    )
                sans = entry.stored.sans if entry.stored else [entry.server_name]
                written = await self.steps.act(
                    f"renew {service}'s certificate",
                    TlsActivities.renew_certificate,
                    RenewCertificate(
                        namespace=req.namespace,
                        service=service,
                        secret=entry.secret,
                        expected=entry.stored_fingerprint,
                        sans=sans,
                        lifetime_days=req.lifetime_days,
                    ),
                )
                expected, replaced = written.fingerprint, written.replaced
            elif service in restart:
                self.steps.skip(f"renew {service}'s certificate", f"not due: {entry.summary()}")
                expected, replaced = entry.stored_fingerprint, None
            else:
                for step in _service_steps(service):
                    self.steps.skip(step, f"not needed: {entry.summary()}")
                continue
            if await self._roll(req, service, expected):
                served.append(
                    f"{service} serves {expected}"
                    + (f" (replaced {replaced}, kept as previous)" if replaced else "")
                )
        if req.dry_run:
            return self.steps.finish(Outcome.DONE, f"dry-run: would {'; '.join(plan)}")
        return self.steps.finish(Outcome.DONE, "; ".join(served))

    async def _roll_back(self, req: TlsRotationRequest, scan: CertificateScan) -> RunbookResult:
        self.steps.skip("approve renewing certificates", "not asked: this run rolls back")
        kept = [s for s in scan.services if s.previous is not None and s.secret is not None]
        if not kept:
            return self.steps.finish(
                Outcome.NO_CHANGE,
                f"no Secret of {', '.join(req.services)} keeps a previous certificate to put back",
            )
        await self.steps.approval(
            "approve rolling back certificates",
            "; ".join(
                f"put {s.previous_fingerprint} back into {s.secret} (replacing "
                f"{s.stored_fingerprint}) and restart {s.service}"
                for s in kept
            )
            + f". {req.reason}",
        )
        served = []
        for entry in scan.services:
            service = entry.service
            self.steps.skip(f"renew {service}'s certificate", "not asked: this run rolls back")
            if entry not in kept or entry.secret is None or entry.previous_fingerprint is None:
                for step in _service_steps(service):
                    self.steps.skip(step, "not needed: its Secret keeps no previous certificate")
                continue
            await self.steps.act(
                f"roll back {service}'s certificate",
                TlsActivities.rollback_certificate,
                RollbackCertificate(
                    namespace=req.namespace,
                    service=service,
                    secret=entry.secret,
                    to=entry.previous_fingerprint,
                ),
            )
            if await self._roll(req, service, entry.previous_fingerprint):
                served.append(f"{service} serves {entry.previous_fingerprint} again")
        if req.dry_run:
            return self.steps.finish(
                Outcome.DONE,
                "dry-run: would put back "
                + ", ".join(f"{s.previous_fingerprint} for {s.service}" for s in kept),
            )
        return self.steps.finish(Outcome.DONE, "rolled back: " + "; ".join(served))

    async def _roll(self, req: TlsRotationRequest, service: str, expected: str | None) -> bool:
        """Restart the service onto its Secret's certificate and prove it serves it; False in a
        dry-run, which changed nothing to prove."""
        await roll(self.steps, req.namespace, service, req.rollout_timeout_seconds)
        verify = f"verify {service} serves the certificate in its Secret"
        if req.dry_run:
            self.steps.skip(verify, "dry-run: nothing changed")
            return False
        if expected is None:
            raise self.steps.fail(verify, f"{service}'s Secret holds no certificate to verify")
        verdict = await self.steps.verify(
            verify,
            TlsActivities.verify_served,
            ServedCheck(
                namespace=req.namespace,
                service=service,
                expected=expected,
                timeout_seconds=req.verify_timeout_seconds,
            ),
            start_to_close_timeout=timedelta(seconds=req.verify_timeout_seconds + 60),
        )
        if not verdict.ok:
            raise self.steps.fail(
                verify,
                f"{verdict.summary()}. Its Secret holds {expected} (the certificate it replaced "
                f"is kept as previous.tls.crt): make {service} load its certificate when it "
                "starts and re-run, or put the previous one back with rollback=true",
            )
        return True
