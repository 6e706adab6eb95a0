"""X.509 for `tls-rotation`: read a certificate, issue one from a CA key pair, and look at what a
live endpoint serves, with a real TLS handshake.

Plain functions, not activities: their arguments and results carry certificates and private keys,
so only ``activities.tls`` (and the sandbox, which plays the CA of its own cluster) calls them,
and only what ``CertificateInfo`` says (names, dates, fingerprints) leaves an activity.
Keys are ECDSA P-256: what cert-manager and most meshes issue today, and cheap to make.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel

from activities.tls import CertificateInfo
from runtime.redact import redact

PEM_KEY_MARKER = "PRIVATE KEY-----"
"""What every PEM private key contains (``BEGIN PRIVATE KEY``, ``BEGIN EC PRIVATE KEY``...)."""


def fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()[:24]


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names: list[str] = ext.value.get_values_for_type(x509.DNSName)
    return [*names, *(str(ip) for ip in ext.value.get_values_for_type(x509.IPAddress))]


def describe(cert: x509.Certificate) -> CertificateInfo:
    return CertificateInfo(
        fingerprint=fingerprint(cert.public_bytes(serialization.Encoding.DER)),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        sans=_sans(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def read_pem(pem: str) -> x509.Certificate:
    """The first certificate of a PEM chain (the leaf, as ``tls.crt`` holds it)."""
    return x509.load_pem_x509_certificate(pem.encode())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA key pair that signs leaf certificates (the settings' files, or the sandbox's own)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str, now: datetime, lifetime: timedelta) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_pem: str, key_pem: str) -> CertificateAuthority:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key is not an ECDSA key; astra-ops signs with ECDSA CAs")
        return cls(read_pem(cert_pem), key)

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_pem(self) -> str:
        return _key_pem(self.key)

    def issue(self, sans: list[str], not_before: datetime, not_after: datetime) -> tuple[str, str]:
        """A new key and a server certificate for ``sans`` (the first is its common name), as
        PEM ``(tls.crt, tls.key)``; ``tls.crt`` holds the leaf then the CA, as servers send."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM).decode() + self.cert_pem
        return chain, _key_pem(key)


def key_matches(cert_pem: str, key_pem: str) -> bool:
    """Whether the private key is the certificate's (a Secret with a mismatched pair serves
    nothing: the server cannot load it)."""
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    public = read_pem(cert_pem).public_key()
    der = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(serialization.Encoding.DER, der) == public.public_bytes(
        serialization.Encoding.DER, der
    )


class Handshake(BaseModel):
    """What a TLS handshake with an endpoint showed."""

    served: CertificateInfo | None = None
    error: str | None = None
    """Why no certificate was read (refused, timed out, not TLS)."""
    verified: bool = False
    """The chain verified against the CA and the name matched (only asked with a CA)."""
    verify_error: str | None = None


def handshake(
    address: str, server_name: str, timeout: float, ca_pem: str | None = None
) -> Handshake:
    """Connect to ``host:port``, complete a TLS handshake sending ``server_name`` (SNI), and read
    the leaf it serves. With ``ca_pem`` a second handshake verifies the chain against that CA and
    the certificate's names against ``server_name``, as a client of the service would."""
    host, _, port = address.rpartition(":")
    look = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    look.check_hostname = False
    look.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock,
            look.wrap_socket(sock, server_hostname=server_name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError) as err:
        return Handshake(error=f"{type(err).__name__}: {redact(str(err))}")
    if der is None:
        return Handshake(error="the endpoint completed the handshake without a certificate")
    served = describe(x509.load_der_x509_certificate(der))
    seen = Handshake(served=served)
    if ca_pem is None:
        return seen
    # Given cadata, the context trusts that CA only, not the system's.
    trust = ssl.create_default_context(cadata=ca_pem)
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock,
            trust.wrap_socket(sock, server_hostname=server_name) as tls,
        ):
            again = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as err:
        return seen.model_copy(update={"verify_error": err.verify_message or str(err)})
    except OSError as err:
        return seen.model_copy(update={"verify_error": f"{type(err).__name__}: {err}"})
    if again is None or fingerprint(again) != served.fingerprint:
        return seen.model_copy(
            update={"verify_error": "the endpoint served another certificate the second time"}
        )
    return seen.model_copy(update={"verified": True})
