"""TLS Rotation with OpenBao's PKI engine as the CA (the settings name a mount and a role),
against the session's OpenBao dev server and the sandbox's services serving TLS.

Moving from the CA files to the PKI engine makes every certificate the old CA issued due (it is
not the CA's); the run renews each from OpenBao, and each endpoint must then serve a certificate
that verifies against OpenBao's CA, by a real handshake. The keys OpenBao makes go into the
Secrets and nowhere else.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import hvac
import pytest
from temporalio.client import Client, WorkflowFailureError

from activities.certificates import PEM_KEY_MARKER, describe, handshake, read_pem
from runtime.settings import Settings
from sandbox.kube.seed import TLS_SERVICES
from sandbox.kube.tls import TlsEndpoints
from sandbox.servers.openbao import OpenBaoServer
from starters.runs import Runs
from tests.conftest_kube import KubeSandbox
from tests.test_runbook_tls_rotation import RENEW, run, stored, tls_worker
from tests.test_runbook_vault_setup import history_texts
from workflows.models import Outcome

ROLE = "astra-services"


@pytest.fixture
def endpoints(kube: KubeSandbox, namespace: str) -> Iterator[TlsEndpoints]:
    with TlsEndpoints(kube.cluster, namespace=namespace) as served:
        yield served


@pytest.fixture
def pki(openbao: OpenBaoServer, namespace: str) -> Iterator[tuple[str, str]]:
    """A PKI mount of the test's own with an ECDSA root, and a role for exactly the namespace's
    service names: the mount and its CA certificate."""
    vault = hvac.Client(url=openbao.address, token=openbao.root_token())
    mount = f"pki-{uuid.uuid4().hex[:8]}"
    vault.sys.enable_secrets_engine("pki", path=mount, config={"max_lease_ttl": "8760h"})
    root = vault.secrets.pki.generate_root(
        "internal",
        "astra test PKI",
        extra_params={"key_type": "ec", "key_bits": 256, "ttl": "8760h"},
        mount_point=mount,
    )
    vault.secrets.pki.create_or_update_role(
        ROLE,
        extra_params={
            # <service>.<namespace>.svc[.cluster.local], and the bare service names.
            "allowed_domains": [
                f"{namespace}.svc",
                f"{namespace}.svc.cluster.local",
                *TLS_SERVICES,
            ],
            "allow_subdomains": True,
            "allow_bare_domains": True,
            "key_type": "ec",
            "key_bits": 256,
            "max_ttl": "2400h",
        },
        mount_point=mount,
    )
    try:
        yield mount, root["data"]["certificate"]
    finally:
        vault.sys.disable_secrets_engine(mount)


def with_pki(settings: Settings, openbao: OpenBaoServer, mount: str, role: str) -> Settings:
    return settings.model_copy(
        update={
            "vault_addr": openbao.address,
            "vault_token_file": openbao.token_file,
            "tls_vault_pki_mount": mount,
            "tls_vault_pki_role": role,
        }
    )


async def test_moving_to_the_pki_engine_renews_every_certificate_from_it_and_serves_them(
    runs: Runs,
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    endpoints: TlsEndpoints,
    openbao: OpenBaoServer,
    pki: tuple[str, str],
) -> None:
    mount, ca_pem = pki
    old = {s: describe(read_pem(stored(kube, namespace, s))).fingerprint for s in TLS_SERVICES}
    async with tls_worker(client, with_pki(settings, openbao, mount, ROLE)):
        result = await run(runs, client, {"namespace": namespace}, RENEW)
    assert result.outcome == Outcome.DONE, result.summary
    issuer = describe(read_pem(ca_pem)).subject
    for service in TLS_SERVICES:
        new = describe(read_pem(stored(kube, namespace, service)))
        assert new.fingerprint != old[service] and new.issuer == issuer
        seen = handshake(endpoints.address(service), f"{service}.{namespace}.svc", 5, ca_pem)
        assert seen.served is not None and seen.served.fingerprint == new.fingerprint
        assert seen.verified, seen.verify_error
    raw, decoded = await history_texts(client, f"tls-rotation/{namespace}")
    for text in (raw, decoded, result.model_dump_json()):
        assert PEM_KEY_MARKER not in text


async def test_a_role_the_engine_does_not_know_fails_the_renewal_saying_what_to_fix(
    runs: Runs,
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    endpoints: TlsEndpoints,
    openbao: OpenBaoServer,
    pki: tuple[str, str],
) -> None:
    mount, _ = pki
    before = {s: stored(kube, namespace, s) for s in TLS_SERVICES}
    async with tls_worker(client, with_pki(settings, openbao, mount, "no-such-role")):
        with pytest.raises(WorkflowFailureError) as failure:
            await run(runs, client, {"namespace": namespace}, RENEW)
    message = str(failure.value.cause)
    assert "failed at step 'renew agent-service's certificate'" in message
    assert f"Vault could not issue a certificate from {mount}/issue/no-such-role" in message
    assert "check the PKI mount and its role" in message
    assert {s: stored(kube, namespace, s) for s in TLS_SERVICES} == before
