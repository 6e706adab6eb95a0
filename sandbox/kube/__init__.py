"""A stand-in Kubernetes API server for the sandbox, driven by the real ``kubernetes`` client.

No kube-apiserver can run here, so this package is the one fake: an in-memory cluster
(``FakeCluster``: an object store and the controllers that roll Deployments), served over the
real REST paths by ``FakeKubeServer``, and seeded with Astra's objects by ``seed_astra``.
"""

from __future__ import annotations

from sandbox.kube.cluster import FakeCluster
from sandbox.kube.replicasets import template_hash
from sandbox.kube.seed import seed_astra
from sandbox.kube.server import FakeKubeServer

__all__ = ["FakeCluster", "FakeKubeServer", "seed_astra", "template_hash"]
