"""Faults the sandbox API server answers with: what a real kube-apiserver does on a bad day.

A real API server answers 500 while etcd elects a leader, 409 when another writer got to an
object first, and sometimes holds a request past any client's patience (an overloaded server, a
connection black-holed by a load balancer). ``ApiFault`` names the requests it hits (a namespace,
methods, resources, an object's name) and what they get, a given number of ``times``; after
that the server serves them again. ``ApiFaults`` is the server's list of them and records each
one it injected, so a test or a proof can tell a fault that happened from one that never did.
"""

from __future__ import annotations

import threading

from pydantic import BaseModel, Field, model_validator

from sandbox.kube.objects import KubeError

WRITES = ("POST", "PUT", "PATCH", "DELETE")

_REASONS = {
    409: (
        "Conflict",
        'Operation cannot be fulfilled on {plural} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
    ),
    429: (
        "TooManyRequests",
        "the server has received too many requests and has asked us to try again later",
    ),
    500: (
        "InternalError",
        'an error on the server ("etcdserver: leader changed") has '
        "prevented the request from succeeding",
    ),
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
}


class ApiFault(BaseModel):
    """Requests it matches get ``status`` (after ``stall_seconds``, if any) or, without a status,
    are held ``stall_seconds`` and then served: the client that gave up meanwhile never learns
    that its write landed late."""

    namespace: str
    methods: tuple[str, ...] = WRITES
    resources: tuple[str, ...] = ()
    """Plurals (``configmaps``, ``deployments``); none: any."""
    name: str | None = None
    status: int | None = Field(default=None, ge=400, le=599)
    stall_seconds: float = Field(default=0.0, ge=0)
    times: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _does_something(self) -> ApiFault:
        if self.status is None and not self.stall_seconds:
            raise ValueError("a fault needs a status to answer or stall_seconds to hold requests")
        return self

    def matches(self, method: str, namespace: str, plural: str, name: str | None) -> bool:
        return (
            method in self.methods
            and namespace == self.namespace
            and (not self.resources or plural in self.resources)
            and (self.name is None or name == self.name)
        )

    def describe(self) -> str:
        held = f"held {self.stall_seconds:g} s" if self.stall_seconds else ""
        answered = f"answered {self.status}" if self.status is not None else "then served"
        return " and ".join(p for p in (held, answered) if p)


class Injected(BaseModel):
    """One request a fault hit."""

    method: str
    path: str
    fault: str


def _target(path: str) -> tuple[str, str, str | None] | None:
    """A namespaced path's namespace, resource and object name (None for a collection)."""
    parts = path.strip("/").split("/")
    if "namespaces" not in parts:
        return None
    rest = parts[parts.index("namespaces") + 1 :]
    if len(rest) < 2:
        return None
    return rest[0], rest[1], rest[2] if len(rest) > 2 else None


class ApiFaults:
    """The faults a server injects, each spent as it hits; safe to add to from another thread
    while the server runs."""

    def __init__(self, faults: list[ApiFault] | None = None) -> None:
        self._lock = threading.Lock()
        self._left: list[tuple[ApiFault, int]] = [(f, f.times) for f in faults or []]
        self.injected: list[Injected] = []

    def add(self, fault: ApiFault) -> None:
        with self._lock:
            self._left.append((fault, fault.times))

    def take(self, method: str, path: str) -> ApiFault | None:
        """The fault this request gets, if one matches; spent and recorded."""
        target = _target(path)
        if target is None:
            return None
        with self._lock:
            for index, (fault, left) in enumerate(self._left):
                if left and fault.matches(method, *target):
                    self._left[index] = (fault, left - 1)
                    self.injected.append(Injected(method=method, path=path, fault=fault.describe()))
                    return fault
        return None

    @staticmethod
    def error(fault: ApiFault, path: str) -> KubeError | None:
        """What the server answers a request ``fault`` hit with, once it held it (None: serve
        it)."""
        if fault.status is None:
            return None
        target = _target(path)
        assert target is not None
        _, plural, name = target
        reason, message = _REASONS.get(fault.status, ("InternalError", "injected by the sandbox"))
        return KubeError(fault.status, reason, message.format(plural=plural, name=name or ""))
