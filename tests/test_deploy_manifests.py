"""The deployment manifests agree with the code: settings they set exist, commands they run
exist, files the kustomization names exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from runtime.settings import ENV_PREFIX, REPO_ROOT, Settings
from starters.cli import app

DEPLOY = REPO_ROOT / "deploy"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in documents(DEPLOY / name)]


def test_kustomization_names_files_that_exist() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        assert (DEPLOY / name).is_file(), name
    for generator in kustomization["configMapGenerator"]:
        for name in generator["files"]:
            assert (DEPLOY / name).is_file(), name


def test_settings_configmap_only_sets_real_settings() -> None:
    [settings] = [m for m in manifests() if m["metadata"]["name"] == "astra-ops-settings"]
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(settings["data"]) <= fields, set(settings["data"]) - fields


def test_containers_run_real_commands_and_mount_the_access_policy() -> None:
    commands = {
        command.name or getattr(command.callback, "__name__", "")
        for command in app.registered_commands
    }
    deployments = [m for m in manifests() if m["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"astra-ops-worker", "astra-ops-api"}
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["args"][0] in commands
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["access-policy"]["configMap"]["name"] == "astra-ops-access-policy"


def test_worker_rbac_is_namespaced_and_never_touches_secrets() -> None:
    roles = [m for m in manifests() if m["kind"] in ("Role", "ClusterRole")]
    assert [r["kind"] for r in roles] == ["Role"]
    resources = {res for rule in roles[0]["rules"] for res in rule["resources"]}
    assert "secrets" not in resources
