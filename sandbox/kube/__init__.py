"""A stand-in Kubernetes API server for the sandbox, driven by the real ``kubernetes`` client.

No kube-apiserver can run here, so this package is the one fake: an in-memory cluster
(``FakeCluster``) with a controller that rolls Deployments, served over the real REST paths by
``FakeKubeServer``, and seeded with Astra's objects by ``seed_astra``.
"""

from __future__ import annotations

from sandbox.kube.cluster import FakeCluster, KubeError, template_hash
from sandbox.kube.seed import ASTRA_NAMESPACE, DEPLOYMENTS, deployment_manifest, seed_astra
from sandbox.kube.server import FakeKubeServer

__all__ = [
    "ASTRA_NAMESPACE",
    "DEPLOYMENTS",
    "FakeCluster",
    "FakeKubeServer",
    "KubeError",
    "deployment_manifest",
    "seed_astra",
    "template_hash",
]
