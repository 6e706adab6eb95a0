"""The deployment manifests work on a real cluster and agree with the code.

``deploy/`` is rendered with ``kubectl kustomize``, as ``kubectl apply -k deploy/`` renders it.
Every object must pass the Kubernetes schemas, land in its namespace and refer only to objects
that exist there. The worker's Role is compared with what the Kubernetes activities really send:
each activity runs against the sandbox API server, which records every request, and the RBAC
verbs of those requests must be exactly the Role's grants. So an activity call the Role does not
grant (a 403 in production), or a grant no activity uses (Secrets included), fails here. Only
the privileged worker holds that Role; the other worker, the API and the setup Job carry no token.

The components in ``deploy/temporal/`` (mTLS, Temporal Cloud) are rendered the way their README
says to use them, from an overlay outside the repository, and checked the same way, plus: every
file a setting names is mounted in every pod that reads the settings, and every secret comes
from a Secret made out of band, never from a value in the manifests.
"""

from __future__ import annotations

import ast
import inspect
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, get_args

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import typer
import yaml
from pydantic import SecretStr
from temporalio import activity
from temporalio.testing import ActivityEnvironment
from typer._click import Context
from typer.core import TyperGroup

import activities.kubernetes as kubernetes_activities
from activities.kube_models import (
    DEFAULT_CONFIG_MAP,
    DEFAULT_NAMESPACE,
    DEFAULT_VAULT_SECRET,
    CanaryRef,
    CanaryScale,
    ConfigPatch,
    ConfigRef,
    ConfigRollout,
    DeploymentRef,
    DeploymentScale,
    ImageChange,
    ImageCheck,
    PodDelete,
    PodSelector,
    RolloutRestart,
    RolloutUndo,
    RolloutWait,
    SecretRef,
    ServicePoint,
    ServiceRef,
    SlotDeploy,
    canary_name,
)
from activities.kubernetes import KubernetesActivities, unauthenticated_client
from activities.mutation import Mutation, MutationResult
from runtime.settings import ENV_PREFIX, REPO_ROOT, Settings
from sandbox.kube import FakeCluster, FakeKubeServer, seed_astra
from sandbox.kube.seed import TLS_SERVICES
from starters.cli import app
from tests.conftest_kube import TEST_ROLLOUT_SECONDS

DEPLOY = REPO_ROOT / "deploy"
TEMPORAL_COMPONENTS = DEPLOY / "temporal"
OWN_NAMESPACE = "astra-ops"
# Astra's namespace: where its Deployments and config live, so where the worker's Role must be.
ASTRA_NAMESPACE = DEFAULT_NAMESPACE
# Made out of band (from Vault, cert-manager), never rendered from this repository.
SECRETS = "astra-ops-secrets"  # every pod
PRIVILEGED_SECRETS = "astra-ops-privileged-secrets"  # the privileged worker's alone
TEMPORAL_SECRETS = {"astra-ops-temporal-tls", "astra-ops-temporal-api-key"}  # deploy/temporal/
WORKER, PRIVILEGED_WORKER = "astra-ops-worker", "astra-ops-worker-privileged"

_Request = TypeVar("_Request")
_Result = TypeVar("_Result")
_Change = TypeVar("_Change", bound=Mutation)

Obj = dict[str, Any]


# ----- rendering ------------------------------------------------------------------------------


def kustomize(directory: Path) -> list[Obj]:
    """A kustomization as ``kubectl apply -k`` would send it to the cluster."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is not installed, so deploy/ cannot be rendered: `apt-get install "
            "kubernetes-client` (.ci/run installs it where kubectl is missing)"
        )
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, f"`kubectl kustomize {directory}` failed: {done.stderr.strip()}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def temporal_components() -> list[str]:
    return sorted(p.parent.name for p in TEMPORAL_COMPONENTS.glob("*/kustomization.yaml"))


def overlay_example() -> str:
    """The overlay deploy/temporal/README.md tells people to write."""
    readme = (TEMPORAL_COMPONENTS / "README.md").read_text()
    [example] = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    return str(example)


def with_component(component: str, root: Path) -> list[Obj]:
    """``deploy/`` with one Temporal component, through the README's overlay, laid out as it
    says: the overlay beside a checkout of astra-ops."""
    (root / "astra-ops").symlink_to(REPO_ROOT)
    overlay = root / "my-astra-ops"
    overlay.mkdir()
    example = overlay_example()
    assert "deploy/temporal/cloud-api-key" in example
    (overlay / "kustomization.yaml").write_text(
        example.replace("deploy/temporal/cloud-api-key", f"deploy/temporal/{component}")
    )
    return kustomize(overlay)


BASE = "deploy/"


@pytest.fixture(scope="module", params=[BASE, *temporal_components()])
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    """What the cluster gets: ``kubectl apply -k deploy/``, and the same with each component of
    deploy/temporal/ through the overlay its README shows. Every check below holds for each."""
    if request.param == BASE:
        return kustomize(DEPLOY)
    return with_component(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    """``deploy/`` alone."""
    return kustomize(DEPLOY)


def where(obj: Obj) -> tuple[str | None, str]:
    """An object's (namespace, name); the namespace is None for cluster-wide objects."""
    return obj["metadata"].get("namespace"), obj["metadata"]["name"]


def of_kind(objects: list[Obj], kind: str) -> dict[tuple[str | None, str], Obj]:
    return {where(o): o for o in objects if o["kind"] == kind}


def settings_data(objects: list[Obj]) -> dict[str, str]:
    settings = of_kind(objects, "ConfigMap")[OWN_NAMESPACE, "astra-ops-settings"]
    data: dict[str, str] = settings["data"]
    return data


def pod_specs(objects: list[Obj]) -> dict[tuple[str | None, str], Obj]:
    """The pod template of every Deployment and Job, by its owner's namespace and name."""
    return {
        key: owner["spec"]["template"]["spec"]
        for kind in ("Deployment", "Job")
        for key, owner in of_kind(objects, kind).items()
    }


# ----- the rendered objects -------------------------------------------------------------------


def test_every_object_passes_the_kubernetes_schemas(rendered: list[Obj]) -> None:
    # Strict: an unknown field (a typo such as readOnlyRootFileSystem) is an error, not ignored.
    version = kubernetes_validate.latest_version()
    problems = []
    for obj in rendered:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            problems.append(f"{obj['kind']} {where(obj)}: {path}: {err.message}")
    assert not problems, f"objects invalid for Kubernetes {version}: {problems}"


def test_objects_land_in_their_namespaces(rendered: list[Obj]) -> None:
    """astra-ops' own objects in its namespace; the RBAC that acts on Astra in Astra's."""
    assert [name for _, name in of_kind(rendered, "Namespace")] == [OWN_NAMESPACE]
    assert settings_data(rendered)[f"{ENV_PREFIX}KUBE_NAMESPACE"] == ASTRA_NAMESPACE
    homes = {"Namespace": None, "Role": ASTRA_NAMESPACE, "RoleBinding": ASTRA_NAMESPACE}
    placed = {(o["kind"], o["metadata"]["name"]): where(o)[0] for o in rendered}
    assert placed == {(kind, name): homes.get(kind, OWN_NAMESPACE) for kind, name in placed}


def test_every_reference_resolves_in_its_namespace(rendered: list[Obj]) -> None:
    accounts = of_kind(rendered, "ServiceAccount")
    config_maps = of_kind(rendered, "ConfigMap")
    assert not of_kind(rendered, "Secret"), "secrets never come from this repository"
    out_of_band = {SECRETS, PRIVILEGED_SECRETS, *TEMPORAL_SECRETS}
    for (namespace, deployment), pod in pod_specs(rendered).items():
        assert (namespace, pod["serviceAccountName"]) in accounts, deployment
        for container in pod["containers"]:
            for source in container["envFrom"]:
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in out_of_band, deployment
                else:
                    assert (namespace, source["configMapRef"]["name"]) in config_maps, deployment
        for volume in pod["volumes"]:
            if "configMap" in volume:
                assert (namespace, volume["configMap"]["name"]) in config_maps, deployment
            if "secret" in volume:
                assert volume["secret"]["secretName"] in out_of_band, deployment
        # Only the privileged worker reads the privileged Secret.
        reads = {
            s["secretRef"]["name"]
            for c in pod["containers"]
            for s in c["envFrom"]
            if "secretRef" in s
        }
        assert (PRIVILEGED_SECRETS in reads) is (deployment == PRIVILEGED_WORKER), deployment
    deployments = of_kind(rendered, "Deployment")
    for (namespace, name), service in of_kind(rendered, "Service").items():
        [backend] = [
            d
            for (ns, _), d in deployments.items()
            if ns == namespace
            and service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = {
            p["name"] for c in backend["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports, name


def test_only_the_privileged_worker_may_act_on_kubernetes(rendered: list[Obj]) -> None:
    roles = of_kind(rendered, "Role")
    [binding] = of_kind(rendered, "RoleBinding").values()
    namespace, _ = where(binding)
    assert (namespace, binding["roleRef"]["name"]) in roles
    [subject] = binding["subjects"]
    assert subject["kind"] == "ServiceAccount"
    pods = pod_specs(rendered)
    privileged = pods[OWN_NAMESPACE, PRIVILEGED_WORKER]
    assert (subject["namespace"], subject["name"]) == (
        OWN_NAMESPACE,
        privileged["serviceAccountName"],
    )
    accounts = of_kind(rendered, "ServiceAccount")
    for key, pod in pods.items():
        account = accounts[OWN_NAMESPACE, pod["serviceAccountName"]]
        if pod is not privileged:  # nothing else calls the Kubernetes API: no token to steal
            assert account["automountServiceAccountToken"] is False, key
        else:  # its own account, which nothing else uses
            assert account.get("automountServiceAccountToken", True) is True
            assert [p for p in pods.values() if p["serviceAccountName"] == subject["name"]] == [
                privileged
            ]


def test_the_two_workers_differ_only_in_their_rights(rendered: list[Obj]) -> None:
    """The same pod but for its name, account, queue (its `--kind`), the privileged
    Secret, and the postmortem drafts only the workflows' worker writes: a change made to one
    and forgotten on the other fails here."""
    deployments = of_kind(rendered, "Deployment")
    plain, privileged = (deployments[OWN_NAMESPACE, name] for name in (WORKER, PRIVILEGED_WORKER))

    def normalized(deployment: Obj, name: str) -> Obj:
        """The Deployment with its name, and what makes it its kind, taken out."""
        copy: Obj = yaml.safe_load(yaml.safe_dump(deployment).replace(name, "worker"))
        pod = copy["spec"]["template"]["spec"]
        [container] = pod["containers"]
        container["args"] = container["args"][:1]
        container["envFrom"] = [
            e
            for e in container["envFrom"]
            if e.get("secretRef", {}).get("name") != PRIVILEGED_SECRETS
        ]
        container["volumeMounts"] = [
            m for m in container["volumeMounts"] if m["name"] != "postmortems"
        ]
        pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "postmortems"]
        return copy

    args = [d["spec"]["template"]["spec"]["containers"][0]["args"] for d in (plain, privileged)]
    assert args == [["worker", "--kind", "standard"], ["worker", "--kind", "privileged"]]
    assert normalized(plain, WORKER) == normalized(privileged, PRIVILEGED_WORKER)


def test_pods_run_locked_down_with_secrets_only_by_reference(rendered: list[Obj]) -> None:
    [namespace] = of_kind(rendered, "Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for (_, deployment), pod in pod_specs(rendered).items():
        assert pod["securityContext"]["runAsNonRoot"] is True, deployment
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, deployment
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, deployment
            assert security["readOnlyRootFilesystem"] is True, deployment
            assert security["capabilities"] == {"drop": ["ALL"]}, deployment
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), deployment
            assert "memory" in container["resources"]["limits"], deployment
            # Settings come from the ConfigMap and secrets from the Secret, never inline.
            assert "env" not in container, deployment
            # Whatever serves HTTP is probed on it; the worker serves nothing to probe.
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe") if ports else ():
                assert container[probe]["httpGet"]["port"] in ports, (deployment, probe)


def test_settings_configmap_only_sets_real_settings(rendered: list[Obj]) -> None:
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    data = settings_data(rendered)
    assert set(data) <= fields, set(data) - fields


def test_containers_run_real_commands_and_mount_the_access_policy(rendered: list[Obj]) -> None:
    commands = {
        command.name or getattr(command.callback, "__name__", "")
        for command in app.registered_commands
    }
    policy_file = settings_data(rendered)[f"{ENV_PREFIX}ACCESS_POLICY"]
    config_maps = of_kind(rendered, "ConfigMap")
    pods = pod_specs(rendered)
    assert {name: pod["containers"][0]["args"] for (_, name), pod in pods.items()} == {
        WORKER: ["worker", "--kind", "standard"],
        PRIVILEGED_WORKER: ["worker", "--kind", "privileged"],
        "astra-ops-api": ["api"],
        "astra-ops-setup": ["setup"],  # astra-ops' migrations, listed in deploy/
    }
    for (namespace, deployment), pod in pods.items():
        [container] = pod["containers"]
        assert container["args"][0] in commands, deployment
        if deployment == "astra-ops-setup":
            continue  # setup reads no access policy
        [mount] = [m for m in container["volumeMounts"] if m["name"] == "access-policy"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        policy = config_maps[namespace, volumes["access-policy"]["configMap"]["name"]]
        [(key, text)] = policy["data"].items()
        assert f"{mount['mountPath']}/{key}" == policy_file, deployment
        assert text == (DEPLOY / "access-policy.yaml").read_text()


def test_every_option_the_containers_pass_is_one_their_command_takes(base: list[Obj]) -> None:
    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)
    for (_, deployment), pod in pod_specs(base).items():
        [container] = pod["containers"]
        command, *arguments = container["args"]
        found = root.get_command(Context(root), command)
        assert found is not None, deployment
        options = {name for param in found.params for name in param.opts}
        assert {a for a in arguments if a.startswith("-")} <= options, deployment


def test_files_the_settings_name_are_mounted_in_every_pod_that_reads_them(
    rendered: list[Obj],
) -> None:
    """A setting naming a file (a TLS certificate, a key) is checked at start: a pod that reads
    the settings without the file mounted there would not start."""
    validated = Settings.__pydantic_decorators__.field_validators["_file_exists"].info.fields
    files = {
        ENV_PREFIX + name.upper(): Path(value)
        for name in validated
        if (value := settings_data(rendered).get(ENV_PREFIX + name.upper()))
    }
    for (_, deployment), pod in pod_specs(rendered).items():
        [container] = pod["containers"]
        mounts = {Path(m["mountPath"]) for m in container["volumeMounts"]}
        for setting, path in files.items():
            assert path.parent in mounts, (deployment, setting, str(path))


def test_no_secret_is_a_value_in_the_manifests(rendered: list[Obj]) -> None:
    """Every setting that is a secret (a SecretStr) comes from a Secret made out of band: none in
    the ConfigMap, no Secret object, no environment variable with a value."""
    secret_settings = {
        ENV_PREFIX + name.upper()
        for name, field in Settings.model_fields.items()
        if SecretStr in get_args(field.annotation)
    }
    assert f"{ENV_PREFIX}TEMPORAL_API_KEY" in secret_settings
    assert not secret_settings & settings_data(rendered).keys()
    assert not of_kind(rendered, "Secret")
    for (_, deployment), pod in pod_specs(rendered).items():
        for container in pod["containers"]:
            assert all("value" not in e for e in container.get("env", [])), deployment
    # The API key's Secret is documented with the one entry name the settings read.
    readme = (TEMPORAL_COMPONENTS / "README.md").read_text()
    documented = set(re.findall(r"--from-file=(ASTRA_OPS_[A-Z_]+)=", readme))
    assert documented and documented <= secret_settings


def test_settings_configmap_values_are_valid_settings(rendered: list[Obj]) -> None:
    """Each value parses as its setting (an address as host:port, a flag as a bool), but the
    files, which exist only in the pods."""
    validated = Settings.__pydantic_decorators__.field_validators["_file_exists"].info.fields
    values = {
        key.removeprefix(ENV_PREFIX).lower(): value
        for key, value in settings_data(rendered).items()
        if key.removeprefix(ENV_PREFIX).lower() not in validated
    }
    Settings.model_validate(values)


# ----- the worker's Role against the activities' real calls -----------------------------------


class ApiCall(NamedTuple):
    """One request the API server authorizes, in RBAC's terms."""

    verb: str
    group: str
    resource: str  # with its subresource, as a Role names it: "deployments/status"
    namespace: str | None
    name: str | None


class Grant(NamedTuple):
    """One (group, resource, verb, object name) a Role allows; name None means any object."""

    group: str
    resource: str
    verb: str
    name: str | None

    def covers(self, call: ApiCall) -> bool:
        return (self.group, self.resource, self.verb) == (
            call.group,
            call.resource,
            call.verb,
        ) and (self.name is None or self.name == call.name)


_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/(?P<namespace>[^/]+))?"
    r"/(?P<resource>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<subresource>[^/]+))?)?$"
)
# (HTTP method, names one object) -> RBAC verb, as the API server's request info derives it.
_VERBS = {
    ("GET", True): "get",
    ("GET", False): "list",
    ("POST", False): "create",
    ("PUT", True): "update",
    ("PATCH", True): "patch",
    ("DELETE", True): "delete",
    ("DELETE", False): "deletecollection",
}


def api_call(method: str, path: str, query: Mapping[str, str]) -> ApiCall:
    """The RBAC request an HTTP request to the API server needs."""
    found = _PATH.match(path)
    assert found is not None, f"{method} {path} is not a Kubernetes resource path"
    name, subresource = found["name"], found["subresource"]
    watch = query.get("watch") in ("true", "1")
    verb = "watch" if watch and method == "GET" else _VERBS[method, name is not None]
    resource = found["resource"] + (f"/{subresource}" if subresource else "")
    return ApiCall(verb, found["group"] or "", resource, found["namespace"], name)


def grants(role: Obj) -> set[Grant]:
    return {
        Grant(group, resource, verb, name)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames") or [None]
    }


class _Noting:
    """A kubernetes API object that notes the name of each API method called through it."""

    def __init__(self, api: object, noted: set[str]) -> None:
        self._api, self._noted = api, noted

    def __getattr__(self, attribute: str) -> Any:
        value = getattr(self._api, attribute)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            self._noted.add(attribute)
            return value(*args, **kwargs)

        return call


def client_apis(k8s: KubernetesActivities) -> dict[str, object]:
    """The activities' kubernetes API objects (``core``, ``apps``...), by attribute name."""
    return {
        attribute: value
        for attribute, value in vars(k8s).items()
        if type(value).__module__.startswith("kubernetes.client.api.")
    }


# Parsed once, at collection: CPython 3.11's parser is not safe while another thread (a worker
# of an earlier test winding down) compiles ("AST constructor recursion depth mismatch").
ACTIVITIES_TREE = ast.parse(inspect.getsource(kubernetes_activities))


def client_methods_in_source(apis: set[str]) -> set[str]:
    """Every kubernetes API method ``activities/kubernetes.py`` calls: ``self.<api>.<method>()``."""
    return {
        node.func.attr
        for node in ast.walk(ACTIVITIES_TREE)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(owner := node.func.value, ast.Attribute)
        and owner.attr in apis
        and isinstance(owner.value, ast.Name)
        and owner.value.id == "self"
    }


def activity_names() -> set[str]:
    return {
        name
        for name, member in inspect.getmembers(KubernetesActivities, inspect.isfunction)
        if activity._Definition.from_callable(member) is not None
    }


def run_every_kubernetes_activity(k8s: KubernetesActivities) -> set[str]:
    """Each activity on Astra's defaults, as a runbook runs it; mutations dry-run, then for real,
    each changing something (so it reaches its write). Returns the names of the activities run."""
    env = ActivityEnvironment()
    ran: set[str] = set()

    def run(activity_fn: Callable[[_Request], _Result], request: _Request) -> _Result:
        ran.add(activity_fn.__name__)
        return env.run(activity_fn, request)

    def change(activity_fn: Callable[[_Change], MutationResult], request: _Change) -> None:
        for dry_run in (True, False):
            result = run(activity_fn, request.model_copy(update={"dry_run": dry_run}))
            assert result.changed is not dry_run, result.detail

    token, worker = "deploy-manifests/run/step", "astra-worker"
    run(k8s.read_config, ConfigRef(key="TASK_SHARD_COUNT"))
    change(k8s.patch_config, ConfigPatch(key="TASK_SHARD_COUNT", value="16", token=token))
    change(
        k8s.rollout_restart,
        RolloutRestart(name=worker, config_map=DEFAULT_CONFIG_MAP, token=token),
    )
    run(k8s.wait_rollout, RolloutWait(name=worker, poll_seconds=0.02))
    run(k8s.rollout_health, DeploymentRef(name=worker))
    run(k8s.verify_config, ConfigRollout(deployment=worker))
    run(k8s.rollout_history, DeploymentRef(name=worker))
    change(k8s.rollout_undo, RolloutUndo(name=worker, token=token))
    oldest = run(k8s.list_pods, PodSelector(labels={"app": worker})).pods[0]
    change(k8s.delete_pod, PodDelete(name=oldest.name, token=token))
    run(k8s.secret_readers, SecretRef())
    # A canary release, then a blue/green one.
    image = "registry.sandbox.local/astra/astra-worker:9.9.9"
    change(k8s.scale_canary, CanaryScale(stable=worker, image=image, replicas=1, token=token))
    run(k8s.deployment_pods, DeploymentRef(name=canary_name(worker)))
    change(k8s.remove_canary, CanaryRef(stable=worker, token=token))
    change(k8s.set_image, ImageChange(name=worker, image=image, token=token))
    run(k8s.verify_image, ImageCheck(name=worker, image=image))
    slots = run(k8s.read_slots, ServiceRef(name=worker))
    change(
        k8s.deploy_slot,
        SlotDeploy(
            service=worker, name=slots.idle, source=slots.live, image=image, replicas=1, token=token
        ),
    )
    change(k8s.point_service, ServicePoint(service=worker, deployment=slots.idle, token=token))
    change(k8s.scale_deployment, DeploymentScale(name=slots.live, replicas=0, token=token))
    # What the Vault activities call to keep the values out of history: not activities.
    _, version = k8s.secret_data(DEFAULT_NAMESPACE, DEFAULT_VAULT_SECRET)
    k8s.put_secret_data(
        DEFAULT_NAMESPACE, DEFAULT_VAULT_SECRET, {"ASTRA_VAULT_PATH": "kv/x"}, version
    )
    # And what the TLS activities call on each service's certificate Secret.
    for service in TLS_SERVICES:
        k8s.read_deployment(DEFAULT_NAMESPACE, service)
        data, version, _ = k8s.secret_object(DEFAULT_NAMESPACE, f"{service}-tls")
        k8s.put_secret_data(DEFAULT_NAMESPACE, f"{service}-tls", data, version, {"a/b": "c"})
    return ran


@dataclass(frozen=True)
class Traffic:
    """What running every Kubernetes activity did."""

    activities: set[str]
    apis: set[str]  # the activities' kubernetes API attributes
    client_methods: set[str]  # the kubernetes API methods they called
    calls: list[ApiCall]  # the requests that reached the API server


@pytest.fixture
def traffic(monkeypatch: pytest.MonkeyPatch) -> Iterator[Traffic]:
    requests: list[tuple[str, str, dict[str, str]]] = []
    cluster = FakeCluster(rollout_seconds=TEST_ROLLOUT_SECONDS)
    seed_astra(cluster)
    server = FakeKubeServer(
        cluster, observer=lambda method, path, query: requests.append((method, path, dict(query)))
    )
    server.start_blocking()
    api = unauthenticated_client(server.url)
    try:
        k8s = KubernetesActivities(api)
        apis = client_apis(k8s)
        called: set[str] = set()
        for attribute, client in apis.items():
            monkeypatch.setattr(k8s, attribute, _Noting(client, called))
        ran = run_every_kubernetes_activity(k8s)
        yield Traffic(ran, set(apis), called, [api_call(*request) for request in requests])
    finally:
        api.close()  # type: ignore[no-untyped-call]
        server.stop_blocking()


def test_worker_role_grants_exactly_what_the_kubernetes_activities_call(
    base: list[Obj], traffic: Traffic
) -> None:
    # The run reached every activity and every API call in the module, so its requests are all
    # the requests a runbook can make.
    assert traffic.activities == activity_names(), (
        "run_every_kubernetes_activity must run every Kubernetes activity; not run: "
        f"{sorted(activity_names() - traffic.activities)}"
    )
    in_source = client_methods_in_source(traffic.apis)
    assert traffic.client_methods == in_source, (
        "run_every_kubernetes_activity must reach every kubernetes API call in "
        f"activities/kubernetes.py; not reached: {sorted(in_source - traffic.client_methods)}"
    )
    [role] = of_kind(base, "Role").values()
    namespace, _ = where(role)
    called_in = {call.namespace for call in traffic.calls}
    assert called_in == {namespace}, (
        f"the worker's Role is in {namespace} but the activities call the API in {called_in}"
    )
    granted = grants(role)
    ungranted = sorted({c for c in traffic.calls if not any(g.covers(c) for g in granted)}, key=str)
    assert not ungranted, (
        f"the worker's Role in {namespace} does not grant these calls of the Kubernetes "
        f"activities, which would fail with 403: {ungranted}; grant them in deploy/k8s/rbac.yaml"
    )
    unused = sorted((g for g in granted if not any(g.covers(c) for c in traffic.calls)), key=str)
    assert not unused, (
        f"the worker's Role in {namespace} grants what no Kubernetes activity calls: {unused}; "
        "remove it from deploy/k8s/rbac.yaml (least privilege: no Secret but those written)"
    )
