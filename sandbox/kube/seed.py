"""The Astra platform as DESIGN.md's contract describes it, seeded into a sandbox cluster."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

from activities.certificates import CertificateAuthority
from activities.kube_annotations import CHANGE_CAUSE
from runtime.astra_config import AstraEndpoints
from sandbox.kube.cluster import FakeCluster

ASTRA_NAMESPACE = "astra"
CONFIG_MAP = "astra-config"
VAULT_SECRET = "astra-vault"
# name -> replicas; the pod name of an astra-worker pod is its worker id.
DEPLOYMENTS: dict[str, int] = {
    "astra-scheduler": 1,
    "astra-worker": 3,
    "agent-service": 2,
    "goal-service": 2,
    "gateway": 2,
}
TLS_SERVICES = ("agent-service", "goal-service", "gateway")
"""The services that serve TLS with the certificate of their ``<name>-tls`` Secret."""
CERT_LIFETIME = timedelta(days=90)
CERT_AGE = timedelta(days=30)
"""How old the seeded certificates are: a third of their life, outside the renewal window."""
RELEASE = "1.0.0"
ASTRA_CONFIG: dict[str, str] = {"TASK_SHARD_COUNT": "8"}
VAULT_SETTINGS: dict[str, str] = {
    "ASTRA_VAULT_ADDR": "http://127.0.0.1:8200",
    "ASTRA_VAULT_TOKEN": "sandbox-not-a-real-token",
    "ASTRA_VAULT_PATH": "secret/astra",
}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def tls_secret(service: str) -> str:
    return f"{service}-tls"


def service_names(service: str, namespace: str) -> list[str]:
    """The DNS names a service's certificate is for, as its clients address it."""
    return [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local", service]


def tls_secret_manifest(service: str, cert_pem: str, key_pem: str) -> dict[str, Any]:
    return {
        "metadata": {"name": tls_secret(service), "labels": {"app": service, "part-of": "astra"}},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": _b64(cert_pem), "tls.key": _b64(key_pem)},
    }


def deployment_manifest(
    name: str, replicas: int, namespace: str = ASTRA_NAMESPACE
) -> dict[str, Any]:
    """A Deployment as Astra ships it: ``app: <name>`` labels, config from ``astra-config``, its
    TLS Secret mounted where it serves TLS, and a change cause, so its first revision reads well
    in ``kubectl rollout history``."""
    labels = {"app": name}
    serves_tls = name in TLS_SERVICES
    mounts = [{"name": "tls", "mountPath": "/etc/astra/tls", "readOnly": True}]
    volumes = [{"name": "tls", "secret": {"secretName": tls_secret(name)}}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**labels, "part-of": "astra"},
            "annotations": {CHANGE_CAUSE: f"release {RELEASE}"},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": name,
                            "image": f"registry.sandbox.local/astra/{name}:{RELEASE}",
                            "envFrom": [
                                {"configMapRef": {"name": CONFIG_MAP}},
                                {"secretRef": {"name": VAULT_SECRET}},
                            ],
                            **({"volumeMounts": mounts} if serves_tls else {}),
                        }
                    ],
                    **({"volumes": volumes} if serves_tls else {}),
                },
            },
        },
    }


def service_port(name: str) -> dict[str, Any]:
    """The one port a Deployment's Service exposes: HTTPS where the service serves TLS."""
    if name in TLS_SERVICES:
        return {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"}
    return {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}


def service_manifest(name: str, namespace: str = ASTRA_NAMESPACE) -> dict[str, Any]:
    """The Service in front of a Deployment, named like it and selecting its pods by ``app``:
    switching its selector to another Deployment's pods is a blue/green switch, and pods of a
    canary Deployment that carry the same ``app`` label take their share of its work."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": name, "part-of": "astra"},
        },
        "spec": {"type": "ClusterIP", "selector": {"app": name}, "ports": [service_port(name)]},
    }


def seed_astra(
    cluster: FakeCluster,
    namespace: str = ASTRA_NAMESPACE,
    endpoints: AstraEndpoints | None = None,
    ca: CertificateAuthority | None = None,
) -> CertificateAuthority:
    """Create Astra's namespace, config, secrets, and Deployments each behind its Service, with
    every pod already Running; returns the CA that signed the services' certificates (``ca``,
    or a new one).

    ``endpoints`` are the database and Redis the sandbox's Astra really uses (the dev stack's
    settings); the simulated platform connects to what ``astra-config`` names, so a seed with
    made-up endpoints would send it nowhere. Without them the config names none, and the load
    generator's pods use the endpoints it was started with.
    """
    cluster.create("namespaces", None, {"metadata": {"name": namespace}})
    cluster.create(
        "configmaps",
        namespace,
        {
            "metadata": {"name": CONFIG_MAP, "labels": {"part-of": "astra"}},
            "data": {**ASTRA_CONFIG, **(endpoints.config_data() if endpoints else {})},
        },
    )
    cluster.create(
        "secrets",
        namespace,
        {
            "metadata": {"name": VAULT_SECRET, "labels": {"part-of": "astra"}},
            "type": "Opaque",
            "data": {key: _b64(value) for key, value in VAULT_SETTINGS.items()},
        },
    )
    now = datetime.now(UTC)
    ca = ca or CertificateAuthority.create("astra sandbox CA", now, timedelta(days=3650))
    for service in TLS_SERVICES:
        cert, key = ca.issue(
            service_names(service, namespace), now - CERT_AGE, now - CERT_AGE + CERT_LIFETIME
        )
        cluster.create("secrets", namespace, tls_secret_manifest(service, cert, key))
    for name, replicas in DEPLOYMENTS.items():
        cluster.create("deployments", namespace, deployment_manifest(name, replicas, namespace))
        cluster.create("services", namespace, service_manifest(name, namespace))
    cluster.settle()
    return ca
