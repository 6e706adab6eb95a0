"""The sandbox API server, driven by the real kubernetes client as runbooks drive a cluster."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from kubernetes.client import ApiException, AppsV1Api, CoreV1Api

from activities.kube_annotations import REVISION, REVISION_HISTORY
from activities.kube_models import DeploymentRef
from activities.kubernetes import KubernetesActivities
from runtime.astra_config import AstraEndpoints
from sandbox.kube import seed_astra, template_hash
from tests import conftest_kube
from tests.conftest_kube import KubeSandbox, canary_manifest, eventually

kube = conftest_kube.kube  # tests/conftest.py registers it too; this keeps the module standalone

NS = "astra"


# Typed as Any: these tests read optional response fields freely and let a None fail the test.
def core(kube: KubeSandbox) -> Any:
    return CoreV1Api(kube.api)


def apps(kube: KubeSandbox) -> Any:
    return AppsV1Api(kube.api)


def status_of(err: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(err.value.body or "")
    return body


def raw(kube: KubeSandbox, method: str, path: str, body: Any = None) -> Any:
    """A request the typed client refuses to build (its own validation would stop it)."""
    params = kube.api.param_serialize(
        method, path, body=body, header_params={"Content-Type": "application/json"}
    )
    response = kube.api.call_api(*params)
    response.read()  # type: ignore[no-untyped-call]
    return kube.api.response_deserialize(response, {"2XX": "object"}).data


def config_map(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def pod_names(kube: KubeSandbox, app: str) -> set[str]:
    return {p["metadata"]["name"] for p in kube.cluster.pods(NS, {"app": app})}


def rolled_out(kube: KubeSandbox, name: str, generation: int | None = None) -> bool:
    dep = apps(kube).read_namespaced_deployment_status(name, NS)
    status, replicas = dep.status, dep.spec.replicas
    return bool(
        status.observed_generation == (generation or dep.metadata.generation)
        and status.replicas
        == replicas
        == status.updated_replicas
        == status.ready_replicas
        == status.available_replicas
        and any(
            c.type == "Progressing" and c.reason == "NewReplicaSetAvailable"
            for c in status.conditions
        )
    )


def test_seeded_astra_is_running(kube: KubeSandbox) -> None:
    deployments = {d.metadata.name: d for d in apps(kube).list_namespaced_deployment(NS).items}
    assert {n: d.spec.replicas for n, d in deployments.items()} == {
        "astra-scheduler": 1,
        "astra-worker": 3,
        "agent-service": 2,
        "goal-service": 2,
        "gateway": 2,
    }
    for name, dep in deployments.items():
        assert dep.spec.selector.match_labels == {"app": name}
        assert dep.status.ready_replicas == dep.spec.replicas
        pods = core(kube).list_namespaced_pod(NS, label_selector=f"app={name}").items
        assert len(pods) == dep.spec.replicas
        assert all(p.status.phase == "Running" for p in pods)
        assert all(p.metadata.name.startswith(f"{name}-") for p in pods)
    config = core(kube).read_namespaced_config_map("astra-config", NS).data
    assert config == {"TASK_SHARD_COUNT": "8"}  # seeded without a data plane: no endpoints
    vault = core(kube).read_namespaced_secret("astra-vault", NS).data
    assert set(vault) == {"ASTRA_VAULT_ADDR", "ASTRA_VAULT_TOKEN", "ASTRA_VAULT_PATH"}
    assert base64.b64decode(vault["ASTRA_VAULT_TOKEN"]) == b"sandbox-not-a-real-token"
    for service in ("agent-service", "goal-service", "gateway"):
        tls = core(kube).read_namespaced_secret(f"{service}-tls", NS)
        assert tls.type == "kubernetes.io/tls"
        assert set(tls.data) == {"tls.crt", "tls.key"}
    assert "astra" in {n.metadata.name for n in core(kube).list_namespace().items}
    assert core(kube).read_namespace("astra").status.phase == "Active"


def test_a_seed_given_a_data_plane_names_its_endpoints_in_the_config(kube: KubeSandbox) -> None:
    endpoints = AstraEndpoints(
        database_url="postgresql://postgres@127.0.0.1:5432/astra_elsewhere",
        redis_url="redis://127.0.0.1:6390/2",
    )
    seed_astra(kube.cluster, namespace="astra-given", endpoints=endpoints)
    config = core(kube).read_namespaced_config_map("astra-config", "astra-given").data
    assert config == {
        "TASK_SHARD_COUNT": "8",
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/astra_elsewhere",
        "REDIS_URL": "redis://127.0.0.1:6390/2",
    }


def test_config_map_crud_and_resource_versions(kube: KubeSandbox) -> None:
    api = core(kube)
    created = api.create_namespaced_config_map(NS, config_map("demo", {"a": "1", "b": "2"}))
    assert created.metadata.uid and created.metadata.creation_timestamp
    first_version = int(created.metadata.resource_version)

    with pytest.raises(ApiException) as exists:
        api.create_namespaced_config_map(NS, config_map("demo", {}))
    assert exists.value.status == 409
    assert status_of(exists)["reason"] == "AlreadyExists"

    replaced = api.replace_namespaced_config_map(
        "demo",
        NS,
        {
            **config_map("demo", {"a": "10"}),
            "metadata": {"name": "demo", "resourceVersion": str(first_version)},
        },
    )
    assert replaced.data == {"a": "10"}
    assert int(replaced.metadata.resource_version) > first_version
    assert replaced.metadata.uid == created.metadata.uid

    with pytest.raises(ApiException) as stale:
        api.replace_namespaced_config_map(
            "demo",
            NS,
            {
                **config_map("demo", {"a": "11"}),
                "metadata": {"name": "demo", "resourceVersion": str(first_version)},
            },
        )
    assert stale.value.status == 409
    assert status_of(stale)["reason"] == "Conflict"

    merged = api.patch_namespaced_config_map("demo", NS, {"data": {"a": None, "c": "3"}})
    assert merged.data == {"c": "3"}
    patched = api.patch_namespaced_config_map(
        "demo",
        NS,
        [
            {"op": "add", "path": "/data/d", "value": "4"},
            {"op": "replace", "path": "/data/c", "value": "30"},
        ],
    )
    assert patched.data == {"c": "30", "d": "4"}
    assert int(patched.metadata.resource_version) > int(merged.metadata.resource_version)

    noop = api.patch_namespaced_config_map("demo", NS, {"data": {"d": "4"}})
    assert noop.metadata.resource_version == patched.metadata.resource_version

    selected = api.list_namespaced_config_map(NS, field_selector="metadata.name=demo").items
    assert [c.metadata.name for c in selected] == ["demo"]

    api.delete_namespaced_config_map("demo", NS)
    with pytest.raises(ApiException) as gone:
        api.read_namespaced_config_map("demo", NS)
    assert gone.value.status == 404
    assert status_of(gone) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'configmaps "demo" not found',
        "reason": "NotFound",
        "code": 404,
    }


def test_merge_patch_content_type_and_json_patch_test_failure(kube: KubeSandbox) -> None:
    api = core(kube)
    api.create_namespaced_config_map(NS, config_map("demo", {"a": "1"}))
    merged = api.patch_namespaced_config_map(
        "demo", NS, {"data": {"b": "2"}}, _content_type="application/merge-patch+json"
    )
    assert merged.data == {"a": "1", "b": "2"}
    with pytest.raises(ApiException) as failed:
        api.patch_namespaced_config_map(
            "demo", NS, [{"op": "test", "path": "/data/a", "value": "9"}]
        )
    assert failed.value.status == 422
    assert core(kube).read_namespaced_config_map("demo", NS).data == {"a": "1", "b": "2"}


def test_invalid_objects_are_rejected_with_422(kube: KubeSandbox) -> None:
    for body in (config_map("numbers", {"a": 1}), {"kind": "ConfigMap", "metadata": {}}):
        with pytest.raises(ApiException) as invalid:
            raw(kube, "POST", f"/api/v1/namespaces/{NS}/configmaps", body)
        assert invalid.value.status == 422
        assert status_of(invalid)["reason"] == "Invalid"
    with pytest.raises(ApiException) as negative:
        apps(kube).patch_namespaced_deployment("gateway", NS, {"spec": {"replicas": -1}})
    assert negative.value.status == 422
    assert "spec.replicas" in status_of(negative)["message"]
    assert apps(kube).read_namespaced_deployment("gateway", NS).spec.replicas == 2
    with pytest.raises(ApiException) as no_namespace:
        core(kube).create_namespaced_config_map("nowhere", config_map("x", {}))
    assert no_namespace.value.status == 404


def test_secret_string_data_is_stored_base64(kube: KubeSandbox) -> None:
    secret = core(kube).create_namespaced_secret(
        NS, {"metadata": {"name": "demo"}, "stringData": {"password": "hunter2"}}
    )
    assert secret.type == "Opaque"
    assert secret.data == {"password": base64.b64encode(b"hunter2").decode()}
    assert secret.string_data is None


def test_generation_moves_only_with_spec(kube: KubeSandbox) -> None:
    api = apps(kube)
    before = api.read_namespaced_deployment("goal-service", NS)
    labelled = api.patch_namespaced_deployment(
        "goal-service", NS, {"metadata": {"labels": {"team": "goals"}}}
    )
    assert labelled.metadata.generation == before.metadata.generation
    assert int(labelled.metadata.resource_version) > int(before.metadata.resource_version)
    scaled = api.patch_namespaced_deployment("goal-service", NS, {"spec": {"replicas": 3}})
    assert scaled.metadata.generation == before.metadata.generation + 1


async def test_deployment_replace_with_stale_version_conflicts(kube: KubeSandbox) -> None:
    api = apps(kube)
    dep = api.read_namespaced_deployment("gateway", NS)
    stale_version = dep.metadata.resource_version
    api.patch_namespaced_deployment("gateway", NS, {"metadata": {"labels": {"x": "1"}}})
    body = api.api_client.sanitize_for_serialization(dep)
    body["spec"]["replicas"] = 4
    with pytest.raises(ApiException) as conflict:
        api.replace_namespaced_deployment("gateway", NS, body)
    assert conflict.value.status == 409
    body["metadata"]["resourceVersion"] = api.read_namespaced_deployment(
        "gateway", NS
    ).metadata.resource_version
    replaced = api.replace_namespaced_deployment("gateway", NS, body)
    assert replaced.spec.replicas == 4
    assert stale_version != replaced.metadata.resource_version
    await eventually(lambda: len(pod_names(kube, "gateway")) == 4, message="gateway scaled to 4")


async def test_pods_crud_and_label_selectors(kube: KubeSandbox) -> None:
    api = core(kube)
    api.create_namespaced_pod(
        NS,
        {
            "metadata": {"name": "debug", "labels": {"app": "debug", "tier": "tools"}},
            "spec": {"containers": [{"name": "sh", "image": "busybox"}]},
        },
    )
    await eventually(
        lambda: api.read_namespaced_pod("debug", NS).status.phase == "Running",
        message="debug pod running",
    )

    def names(selector: str) -> set[str]:
        return {p.metadata.name for p in api.list_namespaced_pod(NS, label_selector=selector).items}

    assert names("app=debug,tier=tools") == {"debug"}
    assert names("app in (debug, nothing)") == {"debug"}
    assert names("tier") == {"debug"}
    assert "debug" not in names("app!=debug")
    assert names("app notin (debug),!tier") == {
        p.metadata.name for p in api.list_namespaced_pod(NS).items
    } - {"debug"}
    with pytest.raises(ApiException) as bad_selector:
        names("app in debug")
    assert bad_selector.value.status == 400

    relabelled = api.patch_namespaced_pod("debug", NS, {"metadata": {"labels": {"tier": None}}})
    assert relabelled.metadata.labels == {"app": "debug"}
    deleted = api.delete_namespaced_pod("debug", NS)
    assert deleted.metadata.name == "debug"
    with pytest.raises(ApiException) as gone:
        api.delete_namespaced_pod("debug", NS)
    assert gone.value.status == 404
    with pytest.raises(ApiException) as invalid:
        raw(
            kube,
            "POST",
            f"/api/v1/namespaces/{NS}/pods",
            {"metadata": {"name": "empty"}, "spec": {"containers": []}},
        )
    assert invalid.value.status == 422


async def test_template_change_rolls_every_pod(kube: KubeSandbox) -> None:
    old_pods = pod_names(kube, "astra-worker")
    patched = apps(kube).patch_namespaced_deployment(
        "astra-worker",
        NS,
        {"spec": {"template": {"metadata": {"annotations": {"astra-ops/restarted-by": "t1"}}}}},
    )
    assert patched.metadata.generation == 2
    await eventually(lambda: rolled_out(kube, "astra-worker", 2), message="worker rollout")
    pods = kube.cluster.pods(NS, {"app": "astra-worker"})
    assert len(pods) == 3
    assert not {p["metadata"]["name"] for p in pods} & old_pods
    for pod in pods:
        assert pod["metadata"]["annotations"] == {"astra-ops/restarted-by": "t1"}
        assert pod["status"]["phase"] == "Running"
        pod_hash = pod["metadata"]["labels"]["pod-template-hash"]
        assert pod["metadata"]["name"].startswith(f"astra-worker-{pod_hash}-")
    status = apps(kube).read_namespaced_deployment_status("astra-worker", NS).status
    assert status.unavailable_replicas is None
    assert {c.type: c.status for c in status.conditions} == {
        "Available": "True",
        "Progressing": "True",
    }


async def test_deleted_pod_is_replaced(kube: KubeSandbox) -> None:
    victim = sorted(pod_names(kube, "agent-service"))[0]
    core(kube).delete_namespaced_pod(victim, NS)
    await eventually(
        lambda: (
            len(pod_names(kube, "agent-service")) == 2
            and victim not in pod_names(kube, "agent-service")
            and rolled_out(kube, "agent-service")
        ),
        message="agent-service pod replaced",
    )


async def test_stalled_rollout_exceeds_its_progress_deadline(kube: KubeSandbox) -> None:
    api = apps(kube)
    kube.cluster.stall("astra-scheduler")
    old_pods = pod_names(kube, "astra-scheduler")
    api.patch_namespaced_deployment(
        "astra-scheduler",
        NS,
        {
            "spec": {
                "progressDeadlineSeconds": 1,
                "template": {"metadata": {"annotations": {"astra-ops/restarted-by": "stuck"}}},
            }
        },
    )

    def progressing_reason() -> str | None:
        status = api.read_namespaced_deployment_status("astra-scheduler", NS).status
        return next((c.reason for c in status.conditions or [] if c.type == "Progressing"), None)

    await eventually(
        lambda: progressing_reason() == "ProgressDeadlineExceeded",
        timeout=5,
        message="progress deadline exceeded",
    )
    assert old_pods <= pod_names(kube, "astra-scheduler")  # the old pod keeps serving
    kube.cluster.unstall("astra-scheduler")
    await eventually(lambda: rolled_out(kube, "astra-scheduler"), message="rollout resumed")
    assert not pod_names(kube, "astra-scheduler") & old_pods


def test_unknown_paths_and_subresources_are_404(kube: KubeSandbox) -> None:
    with pytest.raises(ApiException) as missing:
        apps(kube).read_namespaced_deployment("nope", NS)
    assert missing.value.status == 404
    assert status_of(missing)["reason"] == "NotFound"
    with pytest.raises(ApiException) as wrong_group:
        raw(kube, "GET", f"/apis/apps/v1/namespaces/{NS}/configmaps")
    assert wrong_group.value.status == 404
    with pytest.raises(ApiException) as no_subresource:
        raw(kube, "GET", f"/api/v1/namespaces/{NS}/configmaps/astra-config/status")
    assert no_subresource.value.status == 404
    assert (
        raw(kube, "GET", f"/apis/apps/v1/namespaces/{NS}/deployments/gateway/status")["status"][
            "readyReplicas"
        ]
        == 2
    )


def revisions(kube: KubeSandbox, app: str) -> dict[str, str]:
    """ReplicaSet name -> revision, listed through the real client as kubectl reads history."""
    listed = apps(kube).list_namespaced_replica_set(NS, label_selector=f"app={app}").items
    return {rs.metadata.name: rs.metadata.annotations[REVISION] for rs in listed}


def current_hash(kube: KubeSandbox, name: str) -> str:
    deployment = kube.cluster.get("deployments", NS, name)
    assert deployment is not None
    return template_hash(deployment["spec"]["template"])


def roll_image(kube: KubeSandbox, name: str, image: str, cause: str) -> None:
    apps(kube).patch_namespaced_deployment(
        name,
        NS,
        {
            "metadata": {"annotations": {"kubernetes.io/change-cause": cause}},
            "spec": {"template": {"spec": {"containers": [{"name": name, "image": image}]}}},
        },
    )


async def test_each_template_gets_an_owned_replica_set_and_revision(kube: KubeSandbox) -> None:
    deployment = apps(kube).read_namespaced_deployment("gateway", NS)
    seeded_hash = current_hash(kube, "gateway")
    first = apps(kube).read_namespaced_replica_set(f"gateway-{seeded_hash}", NS)
    assert first.metadata.annotations[REVISION] == "1"
    assert first.metadata.annotations["kubernetes.io/change-cause"] == "release 1.0.0"
    assert deployment.metadata.annotations[REVISION] == "1"
    owner = first.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid, owner.controller) == (
        "Deployment",
        "gateway",
        deployment.metadata.uid,
        True,
    )
    assert first.metadata.creation_timestamp is not None
    assert first.spec.selector.match_labels == {"app": "gateway", "pod-template-hash": seeded_hash}
    assert first.spec.template.metadata.labels["pod-template-hash"] == seeded_hash
    assert first.status.replicas == first.spec.replicas == 2

    roll_image(kube, "gateway", "registry.sandbox.local/astra/gateway:1.1.0", "release 1.1.0")
    await eventually(lambda: rolled_out(kube, "gateway"), message="gateway on 1.1.0")
    second_hash = current_hash(kube, "gateway")
    assert revisions(kube, "gateway") == {
        f"gateway-{seeded_hash}": "1",
        f"gateway-{second_hash}": "2",
    }
    assert (
        apps(kube).read_namespaced_deployment("gateway", NS).metadata.annotations[REVISION] == "2"
    )
    retired = apps(kube).read_namespaced_replica_set(f"gateway-{seeded_hash}", NS)
    assert retired.spec.replicas == retired.status.replicas == 0
    assert set(revisions(kube, "astra-worker").values()) == {"1"}  # untouched: one revision


async def test_an_older_template_reuses_its_replica_set_under_the_next_revision(
    kube: KubeSandbox,
) -> None:
    seeded = apps(kube).read_namespaced_deployment("gateway", NS)
    seeded_hash = current_hash(kube, "gateway")
    roll_image(kube, "gateway", "registry.sandbox.local/astra/gateway:bad", "bad build")
    await eventually(lambda: rolled_out(kube, "gateway"), message="gateway on the bad build")
    # What kubectl rollout undo sends: the old template back onto the Deployment.
    template = kube.api.sanitize_for_serialization(seeded.spec.template)  # type: ignore[no-untyped-call]
    apps(kube).patch_namespaced_deployment(
        "gateway", NS, [{"op": "replace", "path": "/spec/template", "value": template}]
    )
    await eventually(lambda: rolled_out(kube, "gateway"), message="gateway rolled back")
    reused = apps(kube).read_namespaced_replica_set(f"gateway-{seeded_hash}", NS)
    assert reused.metadata.annotations[REVISION] == "3"
    assert reused.metadata.annotations[REVISION_HISTORY] == "1"
    assert sorted(revisions(kube, "gateway").values()) == ["2", "3"]
    assert (
        apps(kube).read_namespaced_deployment("gateway", NS).metadata.annotations[REVISION] == "3"
    )
    assert {
        p["metadata"]["labels"]["pod-template-hash"]
        for p in kube.cluster.pods(NS, {"app": "gateway"})
    } == {seeded_hash}


async def test_replica_sets_go_with_their_deployment(kube: KubeSandbox) -> None:
    assert revisions(kube, "goal-service")
    apps(kube).delete_namespaced_deployment("goal-service", NS)
    await eventually(lambda: not revisions(kube, "goal-service"), message="replica sets collected")
    with pytest.raises(ApiException) as gone:
        apps(kube).list_namespaced_replica_set(NS, label_selector="app in (")
    assert gone.value.status == 400


def service(name: str, selector: dict[str, str], ports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"selector": selector, "ports": ports},
    }


def test_every_seeded_deployment_has_its_service(kube: KubeSandbox) -> None:
    services = {s.metadata.name: s for s in core(kube).list_namespaced_service(NS).items}
    deployments = {d.metadata.name for d in apps(kube).list_namespaced_deployment(NS).items}
    assert set(services) == deployments
    for name, svc in services.items():
        assert svc.spec.selector == {"app": name}
        assert svc.spec.type == "ClusterIP"
        assert svc.spec.cluster_ip and svc.spec.cluster_ips == [svc.spec.cluster_ip]
        assert len(svc.spec.ports) == 1
    assert services["gateway"].spec.ports[0].port == 443
    assert services["astra-worker"].spec.ports[0].port == 80


def test_service_crud_through_the_client(kube: KubeSandbox) -> None:
    api = core(kube)
    created = api.create_namespaced_service(
        NS, service("demo", {"app": "demo"}, [{"name": "http", "port": 80}])
    )
    assert created.metadata.uid and created.metadata.resource_version
    assert created.spec.cluster_ip.startswith("10.96.")
    assert created.spec.cluster_ips == [created.spec.cluster_ip]
    assert (created.spec.ports[0].protocol, created.spec.ports[0].target_port) == ("TCP", 80)
    assert created.spec.session_affinity == "None"
    assert created.status.load_balancer is not None
    cluster_ip = created.spec.cluster_ip
    assert api.read_namespaced_service("demo", NS).spec.selector == {"app": "demo"}
    with pytest.raises(ApiException) as exists:
        api.create_namespaced_service(NS, service("demo", {"app": "demo"}, [{"port": 80}]))
    assert exists.value.status == 409

    # What patch_namespaced_service sends for a dict: a strategic merge patch. A selector merges
    # key by key; ports merge on their port number, as Kubernetes' patch strategy says.
    switched = api.patch_namespaced_service(
        "demo",
        NS,
        {
            "spec": {
                "selector": {"app": "demo-green", "track": "stable"},
                "ports": [{"port": 80, "targetPort": 8080}],
            }
        },
    )
    assert switched.spec.selector == {"app": "demo-green", "track": "stable"}
    assert [(p.name, p.port, p.target_port) for p in switched.spec.ports] == [("http", 80, 8080)]
    assert switched.spec.cluster_ip == cluster_ip
    assert int(switched.metadata.resource_version) > int(created.metadata.resource_version)
    merged = api.patch_namespaced_service(
        "demo",
        NS,
        {"spec": {"selector": {"track": None}, "ports": [{"name": "web", "port": 8000}]}},
        _content_type="application/merge-patch+json",
    )
    assert merged.spec.selector == {"app": "demo-green"}
    assert [(p.name, p.port, p.target_port) for p in merged.spec.ports] == [("web", 8000, 8000)]
    noop = api.patch_namespaced_service("demo", NS, {"spec": {"selector": {"app": "demo-green"}}})
    assert noop.metadata.resource_version == merged.metadata.resource_version
    json_patched = api.patch_namespaced_service(
        "demo", NS, [{"op": "replace", "path": "/spec/selector", "value": {"app": "demo"}}]
    )
    assert json_patched.spec.selector == {"app": "demo"}

    # A replace built from scratch keeps the allocated cluster IP; one that changes it is refused.
    body = service("demo", {"app": "demo-blue"}, [{"name": "http", "port": 80}])
    replaced = api.replace_namespaced_service("demo", NS, body)
    assert replaced.spec.selector == {"app": "demo-blue"}
    assert replaced.spec.cluster_ip == cluster_ip
    stale = {
        **body,
        "metadata": {"name": "demo", "resourceVersion": created.metadata.resource_version},
    }
    with pytest.raises(ApiException) as conflict:
        api.replace_namespaced_service("demo", NS, stale)
    assert conflict.value.status == 409
    moved = {**body, "spec": {**body["spec"], "clusterIP": "10.96.0.1"}}
    with pytest.raises(ApiException) as immutable:
        api.replace_namespaced_service("demo", NS, moved)
    assert immutable.value.status == 422
    assert "spec.clusterIP" in status_of(immutable)["message"]
    assert api.read_namespaced_service_status("demo", NS).spec.cluster_ip == cluster_ip

    listed = api.list_namespaced_service(NS, label_selector="app=demo").items
    assert [s.metadata.name for s in listed] == ["demo"]
    api.delete_namespaced_service("demo", NS)
    with pytest.raises(ApiException) as gone:
        api.read_namespaced_service("demo", NS)
    assert gone.value.status == 404


def test_invalid_services_are_rejected_with_422(kube: KubeSandbox) -> None:
    path = f"/api/v1/namespaces/{NS}/services"
    cases: list[tuple[str, list[dict[str, Any]]]] = [
        ("spec.ports", []),
        ("spec.ports[0].port", [{"port": 0}]),
        ("spec.ports[1].name", [{"name": "a", "port": 80}, {"port": 81}]),
        ("spec.ports[0].protocol", [{"port": 80, "protocol": "HTTP"}]),
    ]
    for problem, ports in cases:
        with pytest.raises(ApiException) as invalid:
            raw(kube, "POST", path, service("bad", {"app": "x"}, ports))
        assert invalid.value.status == 422, problem
        assert f"{problem}:" in status_of(invalid)["message"]
    with pytest.raises(ApiException) as bad_selector:
        core(kube).patch_namespaced_service(
            "gateway", NS, {"spec": {"selector": {"app": "not a label"}}}
        )
    assert bad_selector.value.status == 422
    assert core(kube).read_namespaced_service("gateway", NS).spec.selector == {"app": "gateway"}


def pods_of(kube: KubeSandbox, deployment: str) -> dict[str, str]:
    """Pod name -> uid of the pods a Deployment's ReplicaSets control, by owner reference."""
    replica_sets = {
        rs.metadata.uid
        for rs in apps(kube).list_namespaced_replica_set(NS).items
        if rs.metadata.owner_references[0].name == deployment
    }
    return {
        p.metadata.name: p.metadata.uid
        for p in core(kube).list_namespaced_pod(NS).items
        if p.metadata.owner_references and p.metadata.owner_references[0].uid in replica_sets
    }


async def test_deployments_with_overlapping_selectors_manage_only_the_pods_they_own(
    kube: KubeSandbox,
) -> None:
    stable = pods_of(kube, "astra-worker")
    apps(kube).create_namespaced_deployment(
        NS, canary_manifest("registry.sandbox.local/astra/astra-worker:1.1.0")
    )
    await eventually(lambda: rolled_out(kube, "astra-worker-canary"), message="canary up")
    canary = pods_of(kube, "astra-worker-canary")
    assert len(canary) == 1
    assert len(pod_names(kube, "astra-worker")) == 4  # the stable selector matches all four
    assert pods_of(kube, "astra-worker") == stable  # and the stable Deployment adopted none
    assert rolled_out(kube, "astra-worker")
    history = KubernetesActivities(kube.api).rollout_history
    assert [
        r.revision for r in history(DeploymentRef(namespace=NS, name="astra-worker")).revisions
    ] == [1]

    # Rolling the stable Deployment replaces its pods only; the canary's pod keeps running.
    rolling = apps(kube).patch_namespaced_deployment(
        "astra-worker",
        NS,
        {"spec": {"template": {"metadata": {"annotations": {"astra-ops/restarted-by": "t"}}}}},
    )
    await eventually(
        lambda: rolled_out(kube, "astra-worker", rolling.metadata.generation),
        message="stable rolled",
    )
    assert len(pods_of(kube, "astra-worker")) == 3
    assert not pods_of(kube, "astra-worker").keys() & stable.keys()
    assert pods_of(kube, "astra-worker-canary") == canary

    # Scaling the canary to 0, then deleting it, takes its pod only.
    apps(kube).patch_namespaced_deployment("astra-worker-canary", NS, {"spec": {"replicas": 0}})
    await eventually(lambda: not pods_of(kube, "astra-worker-canary"), message="canary scaled to 0")
    after_roll = pods_of(kube, "astra-worker")
    assert len(after_roll) == 3 and rolled_out(kube, "astra-worker")
    apps(kube).patch_namespaced_deployment("astra-worker-canary", NS, {"spec": {"replicas": 2}})
    await eventually(lambda: rolled_out(kube, "astra-worker-canary"), message="canary back")
    apps(kube).delete_namespaced_deployment("astra-worker-canary", NS)
    await eventually(
        lambda: len(pod_names(kube, "astra-worker")) == 3, message="canary's pods collected"
    )
    assert pods_of(kube, "astra-worker") == after_roll
