"""What the API server does to a body before it stores it: check its kind, fill the defaults a
real server adds (so reads look like a real cluster's), and refuse invalid objects with 422.

Validation covers the mistakes runbooks could make, not the whole OpenAPI schema.
"""

from __future__ import annotations

import base64
import binascii
import random
import re
from collections.abc import Callable
from typing import Any

from sandbox.kube.objects import KubeError, Obj, Resource, bad_request, invalid
from sandbox.kube.selectors import SelectorError, label_selector_requirements, matches_labels

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
_PROTOCOLS = ("TCP", "UDP", "SCTP")
_HEADLESS = "None"
"""The ``clusterIP`` of a headless Service: it gets no virtual IP, and may have no ports."""
Refusal = Callable[[str, str], KubeError]
"""Makes the 422 for a field of the object being validated and what is wrong with it."""


def check_type(resource: Resource, obj: Obj) -> None:
    """400 when the body names another kind or API version than the path it was sent to."""
    kind, api_version = obj.get("kind"), obj.get("apiVersion")
    if kind not in (None, resource.kind) or api_version not in (None, resource.api_version):
        raise bad_request(
            f"the API version in the data ({api_version}) and kind ({kind}) "
            f"do not match {resource.api_version} {resource.kind}"
        )


def normalise(resource: Resource, obj: Obj) -> None:
    """Fill the defaults the API server adds, so reads look like a real cluster's."""
    obj["kind"], obj["apiVersion"] = resource.kind, resource.api_version
    if resource.plural == "secrets":
        string_data = obj.pop("stringData", None)
        if isinstance(string_data, dict):
            data = obj.setdefault("data", {})
            for key, value in string_data.items():
                if not isinstance(value, str):
                    raise invalid(
                        resource,
                        obj["metadata"].get("name", ""),
                        f"stringData[{key}]",
                        "must be a string",
                    )
                data[key] = base64.b64encode(value.encode()).decode()
        obj.setdefault("type", "Opaque")
    if resource.plural == "services":
        _default_service(obj.setdefault("spec", {}))
    if resource.plural == "deployments":
        spec = obj.setdefault("spec", {})
        if isinstance(spec, dict):
            spec.setdefault("replicas", 1)
            spec.setdefault("progressDeadlineSeconds", 600)
            spec.setdefault("revisionHistoryLimit", 10)
            spec.setdefault(
                "strategy",
                {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
                },
            )


def _default_service(spec: Any) -> None:
    if not isinstance(spec, dict):
        return  # validate() refuses it
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    if spec["type"] != "ExternalName":
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
    ports = spec.get("ports")
    for port in ports if isinstance(ports, list) else []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
            if "port" in port:
                port.setdefault("targetPort", port["port"])


def assign(resource: Resource, obj: Obj, current: Obj | None, rng: random.Random) -> None:
    """The fields the API server allocates once and keeps: a Service's cluster IP, chosen at
    create (unless the body names one), carried over by an update that leaves it out (as
    ``replace_namespaced_service`` with a body built from scratch does), and refused as
    immutable when an update changes it."""
    spec = obj.get("spec")
    if resource.plural != "services" or not isinstance(spec, dict):
        return
    if spec.get("type") == "ExternalName":
        return
    if current is None:
        if not spec.get("clusterIP"):
            spec["clusterIP"] = f"10.96.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    else:
        kept = current["spec"].get("clusterIP")
        if not spec.get("clusterIP"):
            spec["clusterIP"] = kept
        elif spec["clusterIP"] != kept:
            raise invalid(
                resource,
                obj["metadata"].get("name", ""),
                "spec.clusterIP",
                f"Invalid value: {spec['clusterIP']!r}: field is immutable",
            )
    spec["clusterIPs"] = [spec["clusterIP"]]


def validate(resource: Resource, obj: Obj) -> None:
    """The 422 checks that catch the mistakes runbooks could make."""
    meta = obj["metadata"]
    name = meta.get("name", "")

    def refuse(field: str, problem: str) -> KubeError:
        return invalid(resource, name, field, problem)

    if not isinstance(name, str) or len(name) > 253 or not _NAME.match(name):
        raise refuse(
            "metadata.name",
            f"Invalid value: {name!r}: a lowercase RFC 1123 "
            "subdomain must consist of lower case alphanumeric characters, '-' "
            "or '.'",
        )
    for field in ("labels", "annotations"):
        values = meta.get(field)
        if values is not None and (
            not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values())
        ):
            raise refuse(f"metadata.{field}", "Invalid value: values must be strings")
    if resource.plural == "configmaps":
        for field in ("data", "binaryData"):
            data = obj.get(field)
            if data is None:
                continue
            if not isinstance(data, dict):
                raise refuse(field, "Invalid value: must be an object of strings")
            for key, value in data.items():
                if not isinstance(value, str):
                    raise refuse(f"{field}[{key}]", f"Invalid value: {value!r}: must be a string")
    if resource.plural == "secrets":
        data = obj.get("data") or {}
        if not isinstance(data, dict):
            raise refuse("data", "Invalid value: must be an object of base64 strings")
        for key, value in data.items():
            try:
                base64.b64decode(value, validate=True)
            except (TypeError, binascii.Error) as err:
                raise refuse(f"data[{key}]", "Invalid value: must be base64") from err
    if resource.plural == "pods":
        _validate_pod_spec(obj.get("spec"), "spec", refuse)
    if resource.plural == "services":
        _validate_service(obj.get("spec"), refuse)
    if resource.plural == "deployments":
        _validate_deployment(obj, refuse)


def _validate_pod_spec(spec: Any, path: str, refuse: Refusal) -> None:
    if not isinstance(spec, dict):
        raise refuse(path, "Required value")
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise refuse(f"{path}.containers", "Required value")
    for number, container in enumerate(containers):
        for field in ("name", "image"):
            if not isinstance(container, dict) or not isinstance(container.get(field), str):
                raise refuse(f"{path}.containers[{number}].{field}", "Required value")


def _validate_deployment(obj: Obj, refuse: Refusal) -> None:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise refuse("spec", "Required value")
    replicas = spec.get("replicas")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise refuse(
            "spec.replicas", f"Invalid value: {replicas!r}: must be greater than or equal to 0"
        )
    deadline = spec.get("progressDeadlineSeconds")
    if not isinstance(deadline, int) or deadline <= 0:
        raise refuse(
            "spec.progressDeadlineSeconds",
            f"Invalid value: {deadline!r}: must be greater than 0",
        )
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (
        selector.get("matchLabels") or selector.get("matchExpressions")
    ):
        raise refuse("spec.selector", "Required value")
    template = spec.get("template")
    if not isinstance(template, dict):
        raise refuse("spec.template", "Required value")
    labels = (template.get("metadata") or {}).get("labels") or {}
    try:
        requirements = label_selector_requirements(selector)
    except SelectorError as err:
        raise refuse("spec.selector", str(err)) from err
    if not matches_labels(requirements, labels):
        raise refuse(
            "spec.template.metadata.labels",
            f"Invalid value: {labels!r}: `selector` does not match template `labels`",
        )
    _validate_pod_spec(template.get("spec"), "spec.template.spec", refuse)


def _validate_service(spec: Any, refuse: Refusal) -> None:
    if not isinstance(spec, dict):
        raise refuse("spec", "Required value")
    kind = spec.get("type")
    if kind not in _SERVICE_TYPES:
        raise refuse("spec.type", f"Unsupported value: {kind!r}: supported: {_SERVICE_TYPES}")
    selector = spec.get("selector")
    if selector is not None and (
        not isinstance(selector, dict)
        or not all(
            isinstance(v, str) and len(v) <= 63 and _LABEL_VALUE.match(v) for v in selector.values()
        )
    ):
        raise refuse(
            "spec.selector", f"Invalid value: {selector!r}: values must be valid label values"
        )
    ports = spec.get("ports")
    if ports is None:
        ports = []
    if not isinstance(ports, list):
        raise refuse("spec.ports", "Invalid value: must be a list")
    if not ports and kind != "ExternalName" and spec.get("clusterIP") != _HEADLESS:
        raise refuse("spec.ports", "Required value")
    names: set[str] = set()
    for number, port in enumerate(ports):
        path = f"spec.ports[{number}]"
        if not isinstance(port, dict):
            raise refuse(path, "Invalid value: must be an object")
        if not _is_port(port.get("port")):
            raise refuse(
                f"{path}.port",
                f"Invalid value: {port.get('port')!r}: must be between 1 and 65535, inclusive",
            )
        target = port.get("targetPort")
        if not (_is_port(target) or (isinstance(target, str) and target)):
            raise refuse(
                f"{path}.targetPort", f"Invalid value: {target!r}: must be a port number or name"
            )
        if port.get("protocol") not in _PROTOCOLS:
            raise refuse(
                f"{path}.protocol",
                f"Unsupported value: {port.get('protocol')!r}: supported: {_PROTOCOLS}",
            )
        name = port.get("name")
        if len(ports) > 1 and not name:
            raise refuse(f"{path}.name", "Required value")
        if name in names:
            raise refuse(f"{path}.name", f"Duplicate value: {name!r}")
        if name:
            names.add(name)


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535
