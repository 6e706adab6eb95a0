"""The inputs and results of the Kubernetes activities: one pydantic model per activity input.

Workflows build and read these, so this module imports no Kubernetes client; the activities that
act on them are in ``activities/kubernetes.py``.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from activities.mutation import Mutation

DEFAULT_NAMESPACE = "astra"
DEFAULT_CONFIG_MAP = "astra-config"
DEFAULT_VAULT_SECRET = "astra-vault"


class ConfigRef(BaseModel):
    """One key of a ConfigMap."""

    namespace: str = DEFAULT_NAMESPACE
    name: str = DEFAULT_CONFIG_MAP
    key: str


class ConfigValue(BaseModel):
    """A ConfigMap key's value (None when the key is absent) and the version it was read at."""

    value: str | None
    resource_version: str
    config_hash: str
    key: str = ""

    def summary(self) -> str:
        """One line for the step's record."""
        name = self.key or "the key"
        return f"{name} is not set" if self.value is None else f"{name}={self.value}"


class ConfigPatch(Mutation):
    """Set one ConfigMap key to a value."""

    namespace: str = DEFAULT_NAMESPACE
    name: str = DEFAULT_CONFIG_MAP
    key: str
    value: str
    expected: str | None = Field(
        default=None,
        description="only change a key that holds this value (what the run wrote, when putting "
        "an old value back); None changes whatever it holds",
    )


class DeploymentRef(BaseModel):
    """A Deployment."""

    namespace: str = DEFAULT_NAMESPACE
    name: str


class RolloutStatus(BaseModel):
    """Where a Deployment's rollout stands, as ``kubectl rollout status`` judges it."""

    name: str
    generation: int
    observed_generation: int
    replicas: int = Field(description="desired replicas (spec.replicas)")
    updated: int
    ready: int
    available: int
    complete: bool
    failed_reason: str | None = None
    failed_message: str | None = None
    restart_token: str | None = None
    config_hash: str | None = None
    image: str | None = None
    """The image of the pod template's first container: what the rollout rolls out."""

    def summary(self) -> str:
        """One line for heartbeats and error messages."""
        return (
            f"generation {self.observed_generation}/{self.generation}, updated "
            f"{self.updated}/{self.replicas}, ready {self.ready}, available {self.available}"
        )


class RolloutRestart(Mutation):
    """Restart a Deployment's pods once per token, optionally recording a ConfigMap's hash."""

    namespace: str = DEFAULT_NAMESPACE
    name: str
    config_map: str | None = None


class RolloutWait(BaseModel):
    """Wait for a Deployment's rollout to complete."""

    namespace: str = DEFAULT_NAMESPACE
    name: str
    timeout_seconds: float = 600
    poll_seconds: float = 1.0


class Revision(BaseModel):
    """One revision of a Deployment: the ReplicaSet that holds its pod template."""

    revision: int
    replica_set: str
    created: datetime | None = None
    template_hash: str
    change_cause: str | None = None
    images: list[str] = []


class RolloutHistory(BaseModel):
    """A Deployment's revisions, oldest first, as ``kubectl rollout history`` lists them."""

    name: str
    current_revision: int | None = None
    revisions: list[Revision]

    def summary(self) -> str:
        newest = self.newest
        if newest is None:
            return f"{self.name}: no rollout history"
        return (
            f"{self.name}: {len(self.revisions)} revisions, current {self.current_revision}, "
            f"newest {newest.revision}"
        )

    @property
    def newest(self) -> Revision | None:
        return self.revisions[-1] if self.revisions else None

    @property
    def previous(self) -> Revision | None:
        """The revision ``kubectl rollout undo`` would go back to."""
        return self.revisions[-2] if len(self.revisions) > 1 else None


class RolloutUndo(Mutation):
    """Put a Deployment back on an earlier revision's pod template (default: the previous)."""

    namespace: str = DEFAULT_NAMESPACE
    name: str
    to_revision: int | None = Field(default=None, gt=0)


class PodSelector(BaseModel):
    """Pods in a namespace carrying all of these labels."""

    namespace: str = DEFAULT_NAMESPACE
    labels: dict[str, str]


class PodInfo(BaseModel):
    """What a runbook needs to know about one pod."""

    name: str
    phase: str
    ready: bool
    annotations: dict[str, str] = Field(default_factory=dict)
    created: datetime | None = None


class PodList(BaseModel):
    """Pods, oldest first."""

    pods: list[PodInfo]

    def summary(self) -> str:
        return f"{len(self.pods)} pods: {', '.join(p.name for p in self.pods) or 'none'}"


class PodDelete(Mutation):
    """Delete one pod (its controller replaces it)."""

    namespace: str = DEFAULT_NAMESPACE
    name: str


class ConfigRollout(BaseModel):
    """Which Deployment should be running which ConfigMap."""

    namespace: str = DEFAULT_NAMESPACE
    deployment: str
    config_map: str = DEFAULT_CONFIG_MAP


class ConfigVerification(BaseModel):
    """Whether every pod of a Deployment runs the ConfigMap's current content."""

    ok: bool
    expected_hash: str
    pods_total: int
    pods_current: int
    stale: list[str]

    def summary(self) -> str:
        stale = f"; stale: {', '.join(self.stale)}" if self.stale else ""
        return (
            f"{self.pods_current} of {self.pods_total} pods run config {self.expected_hash}{stale}"
        )


class SecretRef(BaseModel):
    """A Secret, by name: what reads it, never what it holds."""

    namespace: str = DEFAULT_NAMESPACE
    name: str = DEFAULT_VAULT_SECRET


class SecretReaders(BaseModel):
    """The Deployments whose pods read a Secret (env, envFrom or a volume): those to restart
    after it changes, since pods read it when they start."""

    secret: str
    deployments: list[str]

    def summary(self) -> str:
        return f"{', '.join(self.deployments) or 'no Deployment'} read {self.secret}"


def canary_name(stable: str) -> str:
    """The canary Deployment of ``stable``: one per Deployment, so a run and its retries and the
    rollback all find the same one."""
    return f"{stable}-canary"


class CanaryScale(Mutation):
    """Run ``replicas`` pods of ``image`` beside a Deployment's own (the stable ones): its canary,
    which takes that share of the work because the Service selects both."""

    namespace: str = DEFAULT_NAMESPACE
    stable: str
    image: str
    replicas: int = Field(ge=0, le=10_000)


class CanaryRef(Mutation):
    """The canary of a Deployment, to remove."""

    namespace: str = DEFAULT_NAMESPACE
    stable: str


class ImageChange(Mutation):
    """Roll a Deployment's first container onto ``image``."""

    namespace: str = DEFAULT_NAMESPACE
    name: str
    image: str
    expected: str | None = None
    """Change it only while it runs this image: a rollback leaves an image someone else set."""


class ImageCheck(BaseModel):
    """Which image every pod of a Deployment should run."""

    namespace: str = DEFAULT_NAMESPACE
    name: str
    image: str


class ImageVerification(BaseModel):
    """Whether every pod the Deployment owns is ready and runs the image."""

    ok: bool
    image: str
    pods_total: int
    pods_current: int
    stale: list[str]

    def summary(self) -> str:
        stale = f"; not yet: {', '.join(self.stale)}" if self.stale else ""
        return f"{self.pods_current} of {self.pods_total} pods run {self.image}{stale}"


def green_name(service: str) -> str:
    """The second colour of a service's Deployment: blue is the Deployment named like the
    service, green ``<service>-green``; a release moves the Service between the two."""
    return f"{service}-green"


class ServiceRef(BaseModel):
    """A Service, and the Deployments of its two colours."""

    namespace: str = DEFAULT_NAMESPACE
    name: str


class Slots(BaseModel):
    """Which of a service's two Deployments its Service sends the work to (live), and which is
    the other (idle): where a blue/green release brings up the new image."""

    service: str
    live: str
    idle: str
    idle_exists: bool

    def summary(self) -> str:
        spare = "exists" if self.idle_exists else "does not exist yet"
        return f"Service {self.service} selects {self.live}; {self.idle} {spare}"


class SlotDeploy(Mutation):
    """Run ``replicas`` pods of ``image`` in the idle Deployment, from the live one's template."""

    namespace: str = DEFAULT_NAMESPACE
    service: str
    name: str
    source: str
    image: str
    replicas: int = Field(ge=1, le=10_000)


class ServicePoint(Mutation):
    """Point a Service at a Deployment's pods: its selector becomes the Deployment's."""

    namespace: str = DEFAULT_NAMESPACE
    service: str
    deployment: str
    expected: str | None = None
    """Switch only while it selects this Deployment's pods: never over someone else's switch."""


class DeploymentScale(Mutation):
    namespace: str = DEFAULT_NAMESPACE
    name: str
    replicas: int = Field(ge=0, le=10_000)
