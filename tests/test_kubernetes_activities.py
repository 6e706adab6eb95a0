"""The Kubernetes activities against the sandbox cluster, run as Temporal runs them."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client import AppsV1Api
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.kube_annotations import CONFIG_HASH, config_hash
from activities.kube_models import (
    ConfigPatch,
    ConfigRef,
    ConfigRollout,
    DeploymentRef,
    PodDelete,
    PodSelector,
    RolloutRestart,
    RolloutUndo,
    RolloutWait,
)
from activities.kubernetes import KubernetesActivities
from tests import conftest_kube
from tests.conftest_kube import KubeSandbox, eventually

kube = conftest_kube.kube  # tests/conftest.py registers it too; this keeps the module standalone

NS = "astra"


@pytest.fixture
def k8s(kube: KubeSandbox) -> KubernetesActivities:
    return KubernetesActivities(kube.api)


@pytest.fixture
def env() -> ActivityEnvironment:
    return ActivityEnvironment()


def generation(kube: KubeSandbox, name: str) -> int:
    dep = kube.cluster.get("deployments", NS, name)
    assert dep is not None
    return int(dep["metadata"]["generation"])


def pod_names(kube: KubeSandbox, app: str) -> set[str]:
    return {p["metadata"]["name"] for p in kube.cluster.pods(NS, {"app": app})}


def astra_config(kube: KubeSandbox) -> dict[str, Any]:
    config = kube.cluster.get("configmaps", NS, "astra-config")
    assert config is not None
    return config


def test_read_config_reports_value_and_fingerprint(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    value = env.run(k8s.read_config, ConfigRef(key="TASK_SHARD_COUNT"))
    config = kube.cluster.get("configmaps", NS, "astra-config")
    assert config is not None
    assert value.value == "8"
    assert value.resource_version == config["metadata"]["resourceVersion"]
    assert value.config_hash == config_hash(config["data"])
    assert env.run(k8s.read_config, ConfigRef(key="NOT_THERE")).value is None


def test_read_config_of_missing_map_fails_without_retry(
    k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    with pytest.raises(ApplicationError, match="does not exist") as failure:
        env.run(k8s.read_config, ConfigRef(name="no-such-config", key="X"))
    assert failure.value.non_retryable
    assert failure.value.type == "KubernetesNotFound"


def test_patch_config_dry_run_writes_nothing(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    before = kube.cluster.get("configmaps", NS, "astra-config")
    result = env.run(
        k8s.patch_config,
        ConfigPatch(key="TASK_SHARD_COUNT", value="12", dry_run=True, token="shard-scaling/x/set"),
    )
    assert not result.changed
    assert "would set TASK_SHARD_COUNT=12 (currently 8)" in result.detail
    assert kube.cluster.get("configmaps", NS, "astra-config") == before


def test_patch_config_is_idempotent(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    request = ConfigPatch(key="TASK_SHARD_COUNT", value="12", token="shard-scaling/x/set")
    first = env.run(k8s.patch_config, request)
    assert first.changed
    written = astra_config(kube)
    assert written["data"]["TASK_SHARD_COUNT"] == "12"
    second = env.run(k8s.patch_config, request)
    assert not second.changed
    assert "already 12" in second.detail
    assert astra_config(kube) == written


def test_putting_a_value_back_leaves_a_value_someone_else_set(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    env.run(k8s.patch_config, ConfigPatch(key="TASK_SHARD_COUNT", value="12", token="run/set"))
    kube.cluster.patch("configmaps", NS, "astra-config", {"data": {"TASK_SHARD_COUNT": "16"}})
    restore = ConfigPatch(key="TASK_SHARD_COUNT", value="8", expected="12", token="run/restore")

    with pytest.raises(ApplicationError) as failure:
        env.run(k8s.patch_config, restore)

    assert failure.value.type == "ConfigChangedByOthers" and failure.value.non_retryable
    assert "TASK_SHARD_COUNT in astra/astra-config is '16', not '12'" in str(failure.value)
    assert "a person must decide" in str(failure.value).lower()
    assert astra_config(kube)["data"]["TASK_SHARD_COUNT"] == "16"


def test_putting_a_value_back_is_idempotent(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    env.run(k8s.patch_config, ConfigPatch(key="TASK_SHARD_COUNT", value="12", token="run/set"))
    restore = ConfigPatch(key="TASK_SHARD_COUNT", value="8", expected="12", token="run/restore")

    assert env.run(k8s.patch_config, restore).changed
    # A retry after the restore succeeded finds its own value, not a stranger's.
    again = env.run(k8s.patch_config, restore)
    assert not again.changed and astra_config(kube)["data"]["TASK_SHARD_COUNT"] == "8"


async def test_restart_with_the_same_token_rolls_once(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    start_generation = generation(kube, "astra-worker")
    seeded_pods = pod_names(kube, "astra-worker")
    restart = RolloutRestart(name="astra-worker", token="shard-scaling/x/restart-workers")
    assert env.run(k8s.rollout_restart, restart).changed
    status = env.run(k8s.wait_rollout, RolloutWait(name="astra-worker", poll_seconds=0.02))
    assert status.complete and status.restart_token == restart.token
    restarted_pods = pod_names(kube, "astra-worker")
    assert not restarted_pods & seeded_pods

    retried = env.run(k8s.rollout_restart, restart)
    assert not retried.changed
    assert generation(kube, "astra-worker") == start_generation + 1
    assert env.run(k8s.rollout_health, DeploymentRef(name="astra-worker")).complete
    assert pod_names(kube, "astra-worker") == restarted_pods

    again = env.run(k8s.rollout_restart, restart.model_copy(update={"token": "other/run/step"}))
    assert again.changed
    assert generation(kube, "astra-worker") == start_generation + 2
    await eventually(
        lambda: not pod_names(kube, "astra-worker") & restarted_pods,
        message="a new token restarts the workers again",
    )


def test_restart_dry_run_and_missing_token(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    before = kube.cluster.get("deployments", NS, "gateway")
    dry = env.run(
        k8s.rollout_restart,
        RolloutRestart(name="gateway", token="t", dry_run=True, config_map="astra-config"),
    )
    assert not dry.changed
    assert dry.detail.startswith("would restart astra/gateway")
    assert kube.cluster.get("deployments", NS, "gateway") == before
    with pytest.raises(ApplicationError, match="without an idempotency token") as failure:
        env.run(k8s.rollout_restart, RolloutRestart(name="gateway"))
    assert failure.value.non_retryable


def test_wait_rollout_fails_clearly_past_the_progress_deadline(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    AppsV1Api(kube.api).patch_namespaced_deployment(
        "astra-scheduler", NS, {"spec": {"progressDeadlineSeconds": 1}}
    )
    kube.cluster.stall("astra-scheduler")
    heartbeats: list[Any] = []
    env.on_heartbeat = lambda *details: heartbeats.append(details)
    env.run(k8s.rollout_restart, RolloutRestart(name="astra-scheduler", token="t"))
    with pytest.raises(ApplicationError, match="exceeded its progress deadline") as failure:
        env.run(
            k8s.wait_rollout,
            RolloutWait(name="astra-scheduler", timeout_seconds=10, poll_seconds=0.05),
        )
    assert failure.value.non_retryable
    assert failure.value.type == "RolloutDeadlineExceeded"
    assert "rollout of astra/astra-scheduler" in failure.value.message
    assert "kubectl -n astra describe deployment astra-scheduler" in failure.value.message
    assert heartbeats


def test_wait_rollout_times_out(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    kube.cluster.stall("gateway")
    env.run(k8s.rollout_restart, RolloutRestart(name="gateway", token="t"))
    with pytest.raises(ApplicationError, match=r"did not complete within 0\.3s") as failure:
        env.run(
            k8s.wait_rollout, RolloutWait(name="gateway", timeout_seconds=0.3, poll_seconds=0.05)
        )
    assert failure.value.non_retryable
    assert failure.value.type == "RolloutTimeout"
    health = env.run(k8s.rollout_health, DeploymentRef(name="gateway"))
    assert not health.complete and health.failed_reason is None


async def test_delete_pod_is_idempotent(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    pods = env.run(k8s.list_pods, PodSelector(labels={"app": "astra-worker"})).pods
    assert len(pods) == 3 and all(p.ready and p.phase == "Running" for p in pods)
    victim = pods[0].name
    dry = env.run(k8s.delete_pod, PodDelete(name=victim, dry_run=True, token="t"))
    assert not dry.changed and victim in pod_names(kube, "astra-worker")
    assert env.run(k8s.delete_pod, PodDelete(name=victim, token="t")).changed
    again = env.run(k8s.delete_pod, PodDelete(name=victim, token="t"))
    assert not again.changed and "already gone" in again.detail
    await eventually(
        lambda: len(pod_names(kube, "astra-worker")) == 3, message="the deleted worker is replaced"
    )
    assert victim not in pod_names(kube, "astra-worker")


def test_verify_config_follows_the_stamped_hash(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    check = ConfigRollout(deployment="astra-scheduler", config_map="astra-config")
    before = env.run(k8s.verify_config, check)
    assert not before.ok
    assert before.stale == sorted(pod_names(kube, "astra-scheduler"))
    assert before.pods_total == 1 and before.pods_current == 0

    restart = RolloutRestart(name="astra-scheduler", token="t", config_map="astra-config")
    assert env.run(k8s.rollout_restart, restart).changed
    env.run(k8s.wait_rollout, RolloutWait(name="astra-scheduler", poll_seconds=0.02))
    after = env.run(k8s.verify_config, check)
    assert after.ok and after.stale == [] and after.pods_current == 1
    pod = kube.cluster.pods(NS, {"app": "astra-scheduler"})[0]
    assert pod["metadata"]["annotations"][CONFIG_HASH] == after.expected_hash

    env.run(k8s.patch_config, ConfigPatch(key="TASK_SHARD_COUNT", value="16", token="t2"))
    changed = env.run(k8s.verify_config, check)
    assert not changed.ok and changed.expected_hash != after.expected_hash
    # Same token, new config: the restart is due again, so it is not skipped.
    assert env.run(k8s.rollout_restart, restart).changed


def release(kube: KubeSandbox, name: str, tag: str) -> None:
    """Roll a Deployment to another image tag, recording why, as a CI deploy would."""
    AppsV1Api(kube.api).patch_namespaced_deployment(
        name,
        NS,
        {
            "metadata": {"annotations": {"kubernetes.io/change-cause": f"release {tag}"}},
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {"name": name, "image": f"registry.sandbox.local/astra/{name}:{tag}"}
                        ]
                    }
                }
            },
        },
    )


def test_rollout_history_lists_revisions_oldest_first(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    seeded = env.run(k8s.rollout_history, DeploymentRef(name="astra-worker"))
    assert seeded.current_revision == 1 and seeded.previous is None
    [first] = seeded.revisions
    assert first.revision == 1 and first.change_cause == "release 1.0.0"
    assert first.replica_set == f"astra-worker-{first.template_hash}"
    assert first.images == ["registry.sandbox.local/astra/astra-worker:1.0.0"]
    assert first.created is not None

    release(kube, "astra-worker", "2.0.0")
    env.run(k8s.wait_rollout, RolloutWait(name="astra-worker", poll_seconds=0.02))
    history = env.run(k8s.rollout_history, DeploymentRef(name="astra-worker"))
    assert [r.revision for r in history.revisions] == [1, 2] and history.current_revision == 2
    assert history.newest is not None and history.newest.change_cause == "release 2.0.0"
    assert history.previous == first


def test_rollout_undo_restores_the_previous_template_once(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    seeded = env.run(k8s.rollout_history, DeploymentRef(name="astra-worker")).revisions[0]
    release(kube, "astra-worker", "bad")
    env.run(k8s.wait_rollout, RolloutWait(name="astra-worker", poll_seconds=0.02))
    undo = RolloutUndo(name="astra-worker", token="high-error-rate/x/roll back")

    first = env.run(k8s.rollout_undo, undo)
    assert first.changed
    assert first.detail.startswith("rolled back astra/astra-worker from revision 2 to 1")
    env.run(k8s.wait_rollout, RolloutWait(name="astra-worker", poll_seconds=0.02))
    after = kube.cluster.get("deployments", NS, "astra-worker")
    assert after is not None
    assert after["metadata"]["annotations"]["kubernetes.io/change-cause"] == "release 1.0.0"
    history = env.run(k8s.rollout_history, DeploymentRef(name="astra-worker"))
    assert history.current_revision == 3 and [r.revision for r in history.revisions] == [2, 3]
    assert history.newest is not None and history.newest.template_hash == seeded.template_hash
    assert {
        p["spec"]["containers"][0]["image"] for p in kube.cluster.pods(NS, {"app": "astra-worker"})
    } == set(seeded.images)

    # A retry of the same step, and an undo to the revision it now runs, change nothing.
    assert not env.run(k8s.rollout_undo, undo).changed
    by_number = env.run(
        k8s.rollout_undo, RolloutUndo(name="astra-worker", to_revision=1, token="t")
    )
    assert not by_number.changed and "already runs the template of revision" in by_number.detail
    assert kube.cluster.get("deployments", NS, "astra-worker") == after


def test_rollout_undo_dry_run_and_bad_requests_change_nothing(
    kube: KubeSandbox, k8s: KubernetesActivities, env: ActivityEnvironment
) -> None:
    with pytest.raises(ApplicationError, match="no revision before 1") as nothing_to_undo:
        env.run(k8s.rollout_undo, RolloutUndo(name="gateway", token="t"))
    assert nothing_to_undo.value.non_retryable
    release(kube, "gateway", "bad")
    env.run(k8s.wait_rollout, RolloutWait(name="gateway", poll_seconds=0.02))
    before = kube.cluster.get("deployments", NS, "gateway")

    dry = env.run(k8s.rollout_undo, RolloutUndo(name="gateway", token="t", dry_run=True))
    assert not dry.changed
    assert dry.detail == "would roll back astra/gateway from revision 2 to 1"
    with pytest.raises(
        ApplicationError, match="revision 7 is not in the rollout history"
    ) as unknown:
        env.run(k8s.rollout_undo, RolloutUndo(name="gateway", to_revision=7, token="t"))
    assert unknown.value.type == "RevisionNotFound" and unknown.value.non_retryable
    with pytest.raises(ApplicationError, match="without an idempotency token"):
        env.run(k8s.rollout_undo, RolloutUndo(name="gateway"))
    assert kube.cluster.get("deployments", NS, "gateway") == before
