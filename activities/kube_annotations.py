"""The annotations and labels astra-ops and Kubernetes write on Deployments, ReplicaSets and pods.

One module for both writers: the activities stamp and read them on real clusters, and the
sandbox's Deployment controller keeps rollout history with the same names, so the two cannot
drift apart. It imports nothing heavy: the sandbox, tests and the CLI's catalogue load it.
"""

from __future__ import annotations

import hashlib
import json

# astra-ops' own: each is stamped with the step's idempotency token (or the config's hash), so a
# retried activity recognises its own earlier work.
RESTARTED_BY = "astra-ops/restarted-by"
CONFIG_HASH = "astra-ops/config-hash"
CONFIG_PATCHED_BY = "astra-ops/patched-by"
ROLLED_BACK_BY = "astra-ops/rolled-back-by"
CERT_RENEWED_BY = "astra-ops/cert-renewed-by"
"""On a TLS Secret: the step that last wrote its certificate (renewal or rollback)."""
CANARY_OF = "astra-ops/canary-of"
"""On a canary Deployment: the Deployment it is the canary of. astra-ops changes or deletes a
``<name>-canary`` Deployment only when it carries this, so it never touches one it did not make."""
BLUE_GREEN_OF = "astra-ops/blue-green-of"
"""On a ``<service>-green`` Deployment: the service it is the second colour of. astra-ops changes
one only when it carries this."""
IMAGE_SET_BY = "astra-ops/image-set-by"
"""On a Deployment: the step that last changed its image (a full rollout, or its rollback)."""
TRACK_LABEL = "track"
"""The label that tells a canary's pods (``track: canary``) from the stable ones: the Kubernetes
docs' canary pattern, where the Service selects both by their shared labels."""
TLS_ENDPOINT = "astra-ops/tls-endpoint"
"""On a Deployment: ``host:port`` where its service serves TLS, when not its Service's DNS name
(the cluster's owner sets it; a request never names an endpoint)."""

# Kubernetes': what the Deployment controller and kubectl write to keep rollout history.
REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
CHANGE_CAUSE = "kubernetes.io/change-cause"
TEMPLATE_HASH_LABEL = "pod-template-hash"
# The Deployment controller's bookkeeping: never copied from a Deployment to its ReplicaSets, and
# kept (not restored from the ReplicaSet) by ``kubectl rollout undo``.
CONTROLLER_ANNOTATIONS = frozenset(
    {
        REVISION,
        REVISION_HISTORY,
        "deployment.kubernetes.io/desired-replicas",
        "deployment.kubernetes.io/max-replicas",
        "kubectl.kubernetes.io/last-applied-configuration",
    }
)


def config_hash(data: dict[str, str] | None) -> str:
    """The value of ``CONFIG_HASH`` for a ConfigMap's data: sha256 of its sorted JSON."""
    canonical = json.dumps(data or {}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
