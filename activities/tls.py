"""TLS activities for `tls-rotation`: scan, renew, roll back and verify services' certificates.

Every private key stays in here. A service's certificate and key live in its ``kubernetes.io/tls``
Secret (the one its Deployment mounts); these activities read it, issue a new pair signed by the
CA the worker's settings name, and write it back. The CA is a Vault (OpenBao) PKI engine's role
when ``ASTRA_OPS_TLS_VAULT_PKI_MOUNT`` names one (Vault makes the key; it passes through here
once, into the Secret), else the key pair in ``ASTRA_OPS_TLS_CA_CERT_FILE``/``_KEY_FILE``.
What they return, and so what a run's history holds, is ``CertificateInfo``: names, dates,
issuer and fingerprints.

The previous pair is kept in the same Secret under ``previous.tls.crt``/``previous.tls.key``:
one object, written with one resourceVersion precondition, so the rollback target can never
belong to another write than the certificate it replaced.

Where a service serves TLS is the cluster's to say, never the request's: its Deployment's
``astra-ops/tls-endpoint`` annotation, else its Service's DNS name on 443. Every check of what an
endpoint serves is a real TLS handshake (``certificates.handshake``).

Idempotent by construction: a renewal or rollback stamps the Secret with its step's token and
compares the certificate with the one the run read first, so a retry recognises its own write
and a concurrent writer is never overwritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeats import beat, heartbeating_sync
from activities.kube_annotations import CERT_RENEWED_BY, TLS_ENDPOINT
from activities.kubernetes import KubernetesActivities
from activities.mutation import Mutation, MutationResult

if TYPE_CHECKING:
    from activities.certificates import Issuer

CRT, KEY = "tls.crt", "tls.key"
PREVIOUS_CRT, PREVIOUS_KEY = "previous.tls.crt", "previous.tls.key"
TLS_SECRET_TYPE = "kubernetes.io/tls"
DEFAULT_WINDOW_SHARE = 1 / 3
"""Renew in the last third of a certificate's life, as cert-manager does."""


@dataclass(frozen=True)
class VaultPki:
    """A Vault (OpenBao) PKI engine as the CA: where, as which role, with which token."""

    address: str
    token: str | None
    token_file: Path | None
    mount: str
    role: str


@dataclass(frozen=True)
class TlsConfig:
    """What the worker's settings say about certificates (``runtime.settings``): a PKI engine
    when one is named, else the CA key pair's files."""

    ca_cert_file: Path | None
    ca_key_file: Path | None
    handshake_timeout_seconds: float = 5.0
    vault_pki: VaultPki | None = None


# ----- inputs and results ---------------------------------------------------------------------


class CertificateInfo(BaseModel):
    """What may be said of a certificate anywhere (history, logs, the UI): never its key."""

    fingerprint: str
    """``sha256:`` and the first 24 hex digits of the SHA-256 of its DER form."""
    subject: str
    issuer: str
    sans: list[str]
    not_before: datetime
    not_after: datetime

    def renew_at(self, window_share: float) -> datetime:
        """When the renewal window opens: ``window_share`` of the lifetime before expiry."""
        return self.not_after - (self.not_after - self.not_before) * window_share

    def summary(self) -> str:
        return (
            f"{self.fingerprint} for {', '.join(self.sans)} until {self.not_after:%Y-%m-%d %H:%M}Z"
        )


class CertificateScanRequest(BaseModel):
    namespace: str
    services: list[str]
    window_share: float = Field(default=DEFAULT_WINDOW_SHARE, gt=0, lt=1)


class ServiceCertificate(BaseModel):
    """One service's certificate, as its Secret holds it and as its endpoint serves it."""

    service: str
    secret: str | None
    endpoint: str
    server_name: str
    stored: CertificateInfo | None = None
    """The Secret's ``tls.crt``."""
    stored_error: str | None = None
    served: CertificateInfo | None = None
    served_error: str | None = None
    previous: CertificateInfo | None = None
    """The pair a rollback restores (``previous.tls.crt``), if the Secret keeps one."""
    trusted: bool = False
    """The stored certificate was issued by the worker's CA."""
    renew_at: datetime | None = None
    due: bool = False
    """Missing, unreadable, not the CA's, or inside the renewal window."""

    @property
    def stored_fingerprint(self) -> str | None:
        return self.stored.fingerprint if self.stored else None

    @property
    def served_fingerprint(self) -> str | None:
        return self.served.fingerprint if self.served else None

    @property
    def previous_fingerprint(self) -> str | None:
        return self.previous.fingerprint if self.previous else None

    @property
    def mismatch(self) -> bool:
        """The endpoint serves another certificate than its Secret holds (or none)."""
        return self.stored is not None and self.served_fingerprint != self.stored_fingerprint

    def summary(self) -> str:
        if self.stored is None:
            state = f"no usable certificate in its Secret ({self.stored_error})"
        else:
            state = (
                f"{self.stored_fingerprint} expires {self.stored.not_after:%Y-%m-%d}"
                + (f", renew from {self.renew_at:%Y-%m-%d}" if self.renew_at else "")
                + ("" if self.trusted else ", not issued by the CA")
            )
        if self.served_error:
            served = f"endpoint {self.endpoint}: {self.served_error}"
        elif self.mismatch:
            served = f"endpoint serves {self.served_fingerprint}"
        else:
            served = "served"
        return f"{self.service}: {state}; {served}" + ("; DUE" if self.due else "")


class CertificateScan(BaseModel):
    namespace: str
    scanned_at: datetime
    services: list[ServiceCertificate]

    @property
    def due(self) -> list[str]:
        return [s.service for s in self.services if s.due]

    @property
    def mismatched(self) -> list[str]:
        return [s.service for s in self.services if s.mismatch]

    def of(self, service: str) -> ServiceCertificate:
        return next(s for s in self.services if s.service == service)

    def summary(self) -> str:
        return "; ".join(s.summary() for s in self.services)


class RenewCertificate(Mutation):
    namespace: str
    service: str
    secret: str
    expected: str | None
    """The fingerprint the run's scan read: any other is someone else's write."""
    sans: list[str] = Field(min_length=1)
    lifetime_days: int = Field(gt=0, le=825)


class CertificateWritten(MutationResult):
    fingerprint: str | None = None
    """The certificate the Secret holds now."""
    replaced: str | None = None
    """The one it held before, kept as the rollback target."""


class RollbackCertificate(Mutation):
    namespace: str
    service: str
    secret: str
    to: str
    """The fingerprint of the previous certificate the run's scan read."""


class ServedCheck(BaseModel):
    namespace: str
    service: str
    expected: str
    """The fingerprint the endpoint must serve."""
    timeout_seconds: float = Field(default=30, gt=0)
    poll_seconds: float = Field(default=0.5, gt=0)


class ServedVerdict(BaseModel):
    service: str
    expected: str
    served: str | None
    error: str | None = None
    chain_verified: bool = False
    verify_error: str | None = None
    sans_match: bool = False

    @property
    def ok(self) -> bool:
        return self.served == self.expected and self.chain_verified and self.sans_match

    def summary(self) -> str:
        if self.ok:
            return f"{self.service} serves {self.expected}: chain verified, names match"
        if self.served is None:
            return f"{self.service} serves nothing readable ({self.error})"
        if self.served != self.expected:
            return f"{self.service} still serves {self.served}, not {self.expected}"
        if not self.chain_verified:
            return f"{self.service} serves {self.served}, whose chain fails: {self.verify_error}"
        return f"{self.service} serves {self.served} for other names than its Secret's"


# ----- the activities -------------------------------------------------------------------------


class TlsActivities:
    """`tls-rotation`'s side effects on services' TLS Secrets, and its handshakes."""

    def __init__(self, config: TlsConfig, kubernetes: KubernetesActivities) -> None:
        self.config = config
        self.kubernetes = kubernetes

    # -- helpers ---------------------------------------------------------------------------

    def _ca_cert_pem(self) -> str | None:
        if self.config.vault_pki is not None:
            return self._ca().cert_pem
        file = self.config.ca_cert_file
        return file.read_text() if file is not None else None

    def _ca(self) -> Issuer:
        from activities.certificates import CertificateAuthority, VaultPkiIssuer

        if self.config.vault_pki is not None:
            return VaultPkiIssuer.connect(self.config.vault_pki)
        cert, key = self.config.ca_cert_file, self.config.ca_key_file
        if cert is None or key is None:
            raise ApplicationError(
                "the worker has no CA to sign certificates with: set ASTRA_OPS_TLS_CA_CERT_FILE "
                "and ASTRA_OPS_TLS_CA_KEY_FILE (PEM) and restart the worker",
                type="TlsCaNotConfigured",
                non_retryable=True,
            )
        try:
            return CertificateAuthority.load(cert.read_text(), key.read_text())
        except (OSError, ValueError) as err:
            raise ApplicationError(
                f"cannot load the CA key pair from {cert} and {key}: {type(err).__name__}; check "
                "the files (PEM, an ECDSA key without a passphrase)",
                type="TlsCaNotConfigured",
                non_retryable=True,
            ) from None

    def _target(self, namespace: str, service: str) -> tuple[str | None, str, str]:
        """The service's TLS Secret (the ``kubernetes.io/tls`` one its pods mount), where it
        serves, and the name its clients ask for."""
        deployment = self.kubernetes.read_deployment(namespace, service)
        server_name = f"{service}.{namespace}.svc"
        annotations = deployment.metadata.annotations or {}
        endpoint = annotations.get(TLS_ENDPOINT) or f"{server_name}:443"
        for volume in deployment.spec.template.spec.volumes or []:
            if volume.secret is None:
                continue
            name = volume.secret.secret_name
            data, _, _ = self.kubernetes.secret_object(namespace, name)
            if CRT in data and KEY in data:
                return name, endpoint, server_name
        return None, endpoint, server_name

    def _scan_one(
        self, namespace: str, service: str, window: float, now: datetime, ca_pem: str | None
    ) -> ServiceCertificate:
        from activities.certificates import describe, handshake, key_matches, read_pem

        secret, endpoint, server_name = self._target(namespace, service)
        found = ServiceCertificate(
            service=service, secret=secret, endpoint=endpoint, server_name=server_name
        )
        seen = handshake(endpoint, server_name, self.config.handshake_timeout_seconds)
        found.served = seen.served
        found.served_error = seen.error
        if secret is None:
            found.stored_error = f"{service} mounts no Secret with {CRT} and {KEY}"
            found.due = True
            return found
        data, _, _ = self.kubernetes.secret_object(namespace, secret)
        try:
            cert = read_pem(data[CRT])
            if not key_matches(data[CRT], data[KEY]):
                raise ValueError(f"{KEY} is not the key of {CRT}")
        except ValueError as err:
            found.stored_error = str(err)
            found.due = True
            return found
        info = describe(cert)
        found.stored = info
        if data.get(PREVIOUS_CRT):
            try:
                found.previous = describe(read_pem(data[PREVIOUS_CRT]))
            except ValueError:
                found.previous = None
        found.trusted = ca_pem is not None and info.issuer == describe(read_pem(ca_pem)).subject
        found.renew_at = info.renew_at(window)
        found.due = now >= found.renew_at or (ca_pem is not None and not found.trusted)
        return found

    def _written(
        self, req: RenewCertificate | RollbackCertificate
    ) -> tuple[dict[str, str], str, str | None, CertificateWritten | None]:
        """The Secret's values, version and current fingerprint; or, when this step's token
        already wrote it, what that write did."""
        from activities.certificates import describe, read_pem

        data, version, annotations = self.kubernetes.secret_object(req.namespace, req.secret)
        current = describe(read_pem(data[CRT])).fingerprint if data.get(CRT) else None
        if req.token and annotations.get(CERT_RENEWED_BY) == req.token:
            previous = describe(read_pem(data[PREVIOUS_CRT])).fingerprint
            return (
                data,
                version,
                current,
                CertificateWritten(
                    changed=False,
                    detail=f"{req.namespace}/{req.secret} was already written by {req.token}",
                    fingerprint=current,
                    replaced=previous,
                ),
            )
        return data, version, current, None

    # -- checks ----------------------------------------------------------------------------

    @activity.defn
    def scan_certificates(self, req: CertificateScanRequest) -> CertificateScan:
        """Each service's certificate, in its Secret and as its endpoint serves it (a real
        handshake): expiry, issuer, names, fingerprints, and whether it is due."""
        now = datetime.now(UTC)
        ca_pem = self._ca_cert_pem()
        with heartbeating_sync(f"scanning the certificates of {req.namespace}"):
            services = [
                self._scan_one(req.namespace, service, req.window_share, now, ca_pem)
                for service in req.services
            ]
        return CertificateScan(namespace=req.namespace, scanned_at=now, services=services)

    @activity.defn
    def verify_served(self, req: ServedCheck) -> ServedVerdict:
        """Handshake until the endpoint serves the expected certificate (or the deadline): its
        chain must verify against the CA and its names must be the Secret's."""
        from activities.certificates import handshake

        ca_pem = self._ca_cert_pem()
        if ca_pem is None:
            self._ca()  # raises, saying which settings to set
        _, endpoint, server_name = self._target(req.namespace, req.service)
        deadline = time.monotonic() + req.timeout_seconds
        # A handshake may take its whole timeout: the heartbeat must not wait for it.
        with heartbeating_sync(f"handshaking with {req.service}"):
            while True:
                seen = handshake(
                    endpoint, server_name, self.config.handshake_timeout_seconds, ca_pem
                )
                served = seen.served.fingerprint if seen.served else None
                if served == req.expected or time.monotonic() >= deadline:
                    break
                beat(f"{req.service} serves {served}")
                time.sleep(req.poll_seconds)
            stored = self._scan_one(
                req.namespace, req.service, DEFAULT_WINDOW_SHARE, datetime.now(UTC), ca_pem
            )
        return ServedVerdict(
            service=req.service,
            expected=req.expected,
            served=served,
            error=seen.error,
            chain_verified=seen.verified,
            verify_error=seen.verify_error,
            sans_match=bool(
                seen.served and stored.stored and seen.served.sans == stored.stored.sans
            ),
        )

    # -- changes ---------------------------------------------------------------------------

    @activity.defn
    def renew_certificate(self, req: RenewCertificate) -> CertificateWritten:
        """A new key and certificate for the same names, signed by the CA, into the Secret; the
        pair it replaces is kept as ``previous.tls.*``."""
        from activities.certificates import describe, read_pem

        target = f"{req.namespace}/{req.secret}"
        data, version, current, done = self._written(req)
        if done is not None:
            return done
        if current != req.expected:
            raise ApplicationError(
                f"the certificate in {target} is {current}, not {req.expected} as this run read "
                "it: someone else wrote it since; re-run tls-rotation to scan again",
                type="CertificateChangedByOthers",
                non_retryable=True,
            )
        ca = self._ca()
        if req.dry_run:
            return CertificateWritten(
                changed=False,
                detail=f"would issue a {req.lifetime_days}-day certificate for "
                f"{', '.join(req.sans)} signed by {ca.subject} into "
                f"{target}, keeping {current} as the previous one",
                fingerprint=current,
            )
        now = datetime.now(UTC)
        expires = now + timedelta(days=req.lifetime_days)
        cert_pem, key_pem = ca.issue(req.sans, now - timedelta(minutes=5), expires)
        values = {CRT: cert_pem, KEY: key_pem}
        if CRT in data and KEY in data:
            values |= {PREVIOUS_CRT: data[CRT], PREVIOUS_KEY: data[KEY]}
        self.kubernetes.put_secret_data(
            req.namespace, req.secret, values, version, {CERT_RENEWED_BY: req.token}
        )
        new = describe(read_pem(cert_pem)).fingerprint
        return CertificateWritten(
            changed=True,
            detail=f"wrote {new} into {target} (until {expires:%Y-%m-%d}); "
            f"{current} kept as {PREVIOUS_CRT}",
            fingerprint=new,
            replaced=current,
        )

    @activity.defn
    def rollback_certificate(self, req: RollbackCertificate) -> CertificateWritten:
        """Put the previous pair back in ``tls.*`` (and the current one in ``previous.tls.*``, so
        a rollback can itself be undone)."""
        from activities.certificates import describe, read_pem

        target = f"{req.namespace}/{req.secret}"
        data, version, current, done = self._written(req)
        if done is not None:
            return done
        if current == req.to:
            return CertificateWritten(
                changed=False, detail=f"{target} already holds {req.to}", fingerprint=current
            )
        previous = (
            describe(read_pem(data[PREVIOUS_CRT])).fingerprint if data.get(PREVIOUS_CRT) else None
        )
        if previous != req.to:
            raise ApplicationError(
                f"{target} keeps {previous} as its previous certificate, not {req.to} as this run "
                "read it: someone else wrote it since; re-run tls-rotation to scan again",
                type="CertificateChangedByOthers",
                non_retryable=True,
            )
        if req.dry_run:
            return CertificateWritten(
                changed=False,
                detail=f"would put {req.to} back into {target}, keeping {current} as previous",
                fingerprint=current,
            )
        values = {
            CRT: data[PREVIOUS_CRT],
            KEY: data[PREVIOUS_KEY],
            PREVIOUS_CRT: data[CRT],
            PREVIOUS_KEY: data[KEY],
        }
        self.kubernetes.put_secret_data(
            req.namespace, req.secret, values, version, {CERT_RENEWED_BY: req.token}
        )
        return CertificateWritten(
            changed=True,
            detail=f"put {req.to} back into {target}; {current} kept as {PREVIOUS_CRT}",
            fingerprint=req.to,
            replaced=current,
        )
