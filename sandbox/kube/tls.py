"""The sandbox's services serving TLS: a loopback listener per service, with the certificate its
pods loaded from the service's ``kubernetes.io/tls`` Secret when they started.

A pod reads its Secret once, at start, as a server that loads its key pair at boot does: a new
certificate in the Secret is served only once the Deployment is rolled and its new pods run. The
listener serves the certificate of the newest running pod, so during a rollout it switches as
the first new pod starts. Each listener's ``host:port`` is written on its Deployment
(``astra-ops/tls-endpoint``), where the worker finds it, as a cluster's owner would annotate a
Service. ``pin`` plays a server that never reloads (a proxy caching its old certificate): the
certificate it serves stays, whatever the pods do.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass

from activities.kube_annotations import TLS_ENDPOINT
from sandbox.kube.cluster import FakeCluster
from sandbox.kube.objects import Obj, Resource, owner_deployment
from sandbox.kube.seed import ASTRA_NAMESPACE, TLS_SERVICES

ACCEPT_POLL_SECONDS = 0.1
HANDSHAKE_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class KeyPair:
    cert_pem: str
    key_pem: str


def _context(pair: KeyPair) -> ssl.SSLContext:
    """A server context for the pair (``load_cert_chain`` reads files only: a private temporary
    one, removed at once)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    fd, path = tempfile.mkstemp(prefix="sandbox-tls-", suffix=".pem")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(pair.key_pem + pair.cert_pem)
        context.load_cert_chain(path)
    finally:
        os.unlink(path)
    return context


class _Listener:
    """One service's endpoint: accepts, handshakes with the served pair, answers, closes."""

    def __init__(self, service: str, host: str) -> None:
        self.service = service
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(ACCEPT_POLL_SECONDS)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.pods: dict[str, tuple[int, KeyPair]] = {}
        """Running pods by name: the order they started in, and the pair each loaded."""
        self.pinned: KeyPair | None = None
        self._contexts: dict[KeyPair, ssl.SSLContext] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(
            target=self._serve, name=f"sandbox-tls:{service}", daemon=True
        )

    def served(self) -> KeyPair | None:
        if self.pinned is not None:
            return self.pinned
        newest = max(self.pods.values(), default=None, key=lambda started: started[0])
        return newest[1] if newest is not None else None

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        pair = self.served()
        if pair is None:
            return  # no pod runs: the connection is closed unanswered
        try:
            context = self._contexts.get(pair) or self._contexts.setdefault(pair, _context(pair))
        except (ssl.SSLError, OSError):
            return  # a pod cannot load a broken pair: nothing serves
        conn.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        except (ssl.SSLError, OSError):
            pass  # a client that only looked at the certificate hangs up mid-way

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):  # never accepted anything: nothing to wake
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept at once
        self.sock.close()
        if self.thread.is_alive():
            self.thread.join(timeout=5)


class TlsEndpoints:
    """Serves the TLS services of a sandbox cluster on loopback, from ``start`` to ``stop``."""

    def __init__(
        self,
        cluster: FakeCluster,
        namespace: str = ASTRA_NAMESPACE,
        services: tuple[str, ...] = TLS_SERVICES,
        host: str = "127.0.0.1",
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.host = host
        self.services = services
        self._listeners: dict[str, _Listener] = {}
        self._order = itertools.count()
        self._lock = threading.Lock()

    def __enter__(self) -> TlsEndpoints:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def address(self, service: str) -> str:
        return self._listeners[service].address

    def served(self, service: str) -> KeyPair | None:
        """The pair the service's endpoint serves now."""
        return self._listeners[service].served()

    def pin(self, service: str) -> None:
        """Keep serving the current certificate, whatever restarts (until ``unpin``)."""
        listener = self._listeners[service]
        listener.pinned = listener.served()

    def unpin(self, service: str) -> None:
        self._listeners[service].pinned = None

    def start(self) -> None:
        for service in self.services:
            listener = _Listener(service, self.host)
            self._listeners[service] = listener
            self.cluster.patch(
                "deployments",
                self.namespace,
                service,
                {"metadata": {"annotations": {TLS_ENDPOINT: listener.address}}},
            )
        self.cluster.watch(self._on_change)
        for pod in self.cluster.list_objects("pods", self.namespace):
            self._on_change("MODIFIED", None, pod)
        for listener in self._listeners.values():
            listener.thread.start()

    def stop(self) -> None:
        for listener in self._listeners.values():
            listener.stop()
        self._listeners.clear()

    def _on_change(self, event: str, resource: Resource | None, obj: Obj) -> None:
        """A pod of a TLS service that starts loads its Secret's pair; one that goes is
        forgotten. Called under the store's lock, so the Secret read is the one at its start."""
        if resource is not None and resource.plural != "pods":
            return
        if obj["metadata"].get("namespace") != self.namespace:
            return
        listener = self._listeners.get(owner_deployment(obj) or "")
        if listener is None:
            return
        name = obj["metadata"]["name"]
        running = (obj.get("status") or {}).get("phase") == "Running"
        with self._lock:
            if event == "DELETED" or not running:
                listener.pods.pop(name, None)
            elif name not in listener.pods:
                pair = self._mounted_pair(obj)
                if pair is not None:
                    listener.pods[name] = (next(self._order), pair)

    def _mounted_pair(self, pod: Obj) -> KeyPair | None:
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            name = (volume.get("secret") or {}).get("secretName")
            secret = self.cluster.get("secrets", self.namespace, name) if name else None
            if secret is not None and secret.get("type") == "kubernetes.io/tls":
                data = secret.get("data") or {}
                return KeyPair(
                    cert_pem=base64.b64decode(data.get("tls.crt", "")).decode(),
                    key_pem=base64.b64decode(data.get("tls.key", "")).decode(),
                )
        return None
