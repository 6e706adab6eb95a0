"""The HTTP front of the sandbox cluster: the REST paths and JSON the ``kubernetes`` client uses.

The server runs uvicorn and the cluster's controller in a thread with its own event loop. The
kubernetes client is synchronous, so a test that calls it directly from its event loop would
deadlock a server sharing that loop; a separate thread makes ``start()`` safe from anywhere.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sandbox.kube.cluster import FakeCluster
from sandbox.kube.faults import ApiFaults
from sandbox.kube.objects import RESOURCES, KubeError, Resource

_CORE_PREFIX = "/api/v1"
_APPS_PREFIX = "/apis/apps/v1"
_GROUP_OF = {
    prefix: {p for p, r in RESOURCES.items() if r.api_version == version}
    for prefix, version in ((_CORE_PREFIX, "v1"), (_APPS_PREFIX, "apps/v1"))
}
_STARTUP_TIMEOUT_SECONDS = 10.0

RequestObserver = Callable[[str, str, Mapping[str, str]], None]
"""Told each request's method, path and query before it is served: what a test needs to see
which calls reach the API server (and so which RBAC verbs they need), without a proxy."""


def _error(err: KubeError) -> JSONResponse:
    return JSONResponse(err.status(), status_code=err.code)


def _resource(prefix: str, plural: str) -> Resource:
    if plural not in _GROUP_OF[prefix]:
        raise KubeError(404, "NotFound", "the server could not find the requested resource")
    return RESOURCES[plural]


def build_app(
    cluster: FakeCluster, observer: RequestObserver | None = None, faults: ApiFaults | None = None
) -> FastAPI:
    """The ASGI app: one generic handler per path shape, dispatching to the cluster; a request
    a fault of ``faults`` matches gets the fault instead (or first)."""
    app = FastAPI(
        title="astra sandbox kube-apiserver", docs_url=None, redoc_url=None, openapi_url=None
    )
    if observer is not None:

        @app.middleware("http")
        async def observe(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            observer(request.method, request.url.path, request.query_params)
            return await call_next(request)

    if faults is not None:

        @app.middleware("http")
        async def inject(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            fault = faults.take(request.method, request.url.path)
            if fault is None:
                return await call_next(request)
            if fault.stall_seconds:
                # Read the body first: a write held past the client's patience still lands.
                await request.body()
                await asyncio.sleep(fault.stall_seconds)  # the stall is the fault itself
            error = faults.error(fault, request.url.path)
            return _error(error) if error is not None else await call_next(request)

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw or b"null")
        except json.JSONDecodeError as err:
            raise KubeError(400, "BadRequest", f"the request body is not JSON: {err}") from err

    async def handle(
        request: Request,
        prefix: str,
        namespace: str | None,
        plural: str,
        name: str | None = None,
        subresource: str | None = None,
    ) -> Response:
        try:
            resource = _resource(prefix, plural)
            if resource.namespaced != (namespace is not None) and (name or request.method != "GET"):
                raise KubeError(404, "NotFound", "the server could not find the requested resource")
            if request.query_params.get("watch") in ("true", "1"):
                raise KubeError(
                    400,
                    "BadRequest",
                    "the sandbox API server does not serve watches; poll with list/get instead",
                )
            dry_run = request.query_params.get("dryRun") == "All"
            method = request.method
            if name is None:
                if method == "GET":
                    return _list(cluster, resource, namespace, request)
                if method == "POST":
                    created = cluster.create(
                        plural, namespace, await body_of(request), dry_run=dry_run
                    )
                    return JSONResponse(created, status_code=201)
            elif subresource not in (None, "status") or (subresource and not resource.has_status):
                raise KubeError(404, "NotFound", "the server could not find the requested resource")
            elif method == "GET":
                obj = cluster.get(plural, namespace, name)
                if obj is None:
                    raise KubeError(404, "NotFound", f'{plural} "{name}" not found')
                return JSONResponse(obj)
            elif method == "PUT":
                return JSONResponse(
                    cluster.replace(
                        plural,
                        namespace,
                        name,
                        await body_of(request),
                        subresource=subresource,
                        dry_run=dry_run,
                    )
                )
            elif method == "PATCH":
                content_type = request.headers.get("content-type", "")
                return JSONResponse(
                    cluster.patch(
                        plural,
                        namespace,
                        name,
                        await body_of(request),
                        content_type,
                        subresource=subresource,
                        dry_run=dry_run,
                    )
                )
            elif method == "DELETE" and subresource is None:
                deleted = cluster.delete(plural, namespace, name, dry_run=dry_run)
                if plural in ("pods", "services"):  # their stores return what they deleted
                    return JSONResponse(deleted)
                return JSONResponse(
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": {
                            "name": name,
                            "kind": plural,
                            "uid": deleted["metadata"].get("uid"),
                        },
                    }
                )
            raise KubeError(
                405, "MethodNotAllowed", f"the sandbox does not allow {method} on this path"
            )
        except KubeError as err:
            return _error(err)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {
            "major": "1",
            "minor": "33",
            "gitVersion": "v1.33.0-astra-sandbox",
            "platform": "linux/amd64",
        }

    @app.get("/healthz")
    @app.get("/readyz")
    @app.get("/livez")
    async def healthz() -> Response:
        return Response("ok", media_type="text/plain")

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    for prefix in (_CORE_PREFIX, _APPS_PREFIX):

        def routes(prefix: str) -> None:
            # A factory per prefix, so each route's closure keeps its own group.
            async def cluster_scoped(request: Request, plural: str) -> Response:
                return await handle(request, prefix, None, plural)

            async def cluster_object(request: Request, plural: str, name: str) -> Response:
                return await handle(request, prefix, None, plural, name)

            async def collection(request: Request, namespace: str, plural: str) -> Response:
                return await handle(request, prefix, namespace, plural)

            async def item(request: Request, namespace: str, plural: str, name: str) -> Response:
                return await handle(request, prefix, namespace, plural, name)

            async def sub(
                request: Request, namespace: str, plural: str, name: str, subresource: str
            ) -> Response:
                return await handle(request, prefix, namespace, plural, name, subresource)

            app.add_api_route(f"{prefix}/{{plural}}", cluster_scoped, methods=methods)
            app.add_api_route(f"{prefix}/{{plural}}/{{name}}", cluster_object, methods=methods)
            app.add_api_route(
                f"{prefix}/namespaces/{{namespace}}/{{plural}}", collection, methods=methods
            )
            app.add_api_route(
                f"{prefix}/namespaces/{{namespace}}/{{plural}}/{{name}}", item, methods=methods
            )
            app.add_api_route(
                f"{prefix}/namespaces/{{namespace}}/{{plural}}/{{name}}/{{subresource}}",
                sub,
                methods=methods,
            )

        routes(prefix)
    return app


def _list(
    cluster: FakeCluster, resource: Resource, namespace: str | None, request: Request
) -> JSONResponse:
    items = cluster.list_objects(
        resource.plural,
        namespace,
        label_selector=request.query_params.get("labelSelector"),
        field_selector=request.query_params.get("fieldSelector"),
    )
    return JSONResponse(
        {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": cluster.resource_version},
            "items": items,
        }
    )


class FakeKubeServer:
    """Serves a ``FakeCluster`` over HTTP and runs its controller, on a private thread and loop."""

    def __init__(
        self,
        cluster: FakeCluster,
        host: str = "127.0.0.1",
        port: int = 0,
        observer: RequestObserver | None = None,
        faults: ApiFaults | None = None,
    ) -> None:
        self.cluster = cluster
        self.observer = observer
        self.faults = faults if faults is not None else ApiFaults()
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        """The base URL to configure the kubernetes client with (``http://host:port``)."""
        if self._port is None:
            raise RuntimeError("the sandbox API server is not started; call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        """Bind (port 0 picks a free port), start serving and reconciling; return when ready."""
        await asyncio.to_thread(self.start_blocking)

    async def stop(self) -> None:
        """Stop serving and reconciling; returns when the thread has finished."""
        await asyncio.to_thread(self.stop_blocking)

    async def serve_forever(self) -> None:
        """Run until cancelled (``astra-ops sandbox serve``); stops cleanly on cancellation."""
        await self.start()
        try:
            assert self._thread is not None
            await asyncio.to_thread(self._thread.join)
        finally:
            await self.stop()

    def start_blocking(self) -> None:
        """``start()`` for synchronous callers (sync fixtures, scripts)."""
        if self._thread is not None:
            raise RuntimeError("the sandbox API server is already running")
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when proto says
        # TCP, and without it keep-alive requests wait ~40 ms on delayed ACKs.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._requested_port))
        except OSError as err:
            sock.close()
            raise RuntimeError(
                f"the sandbox API server cannot listen on {self.host}:"
                f"{self._requested_port}: {err}; is another sandbox running?"
            ) from err
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            build_app(self.cluster, self.observer, self.faults),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._failure = None
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"sandbox-kube:{self._port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _STARTUP_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive():
                self._thread = None
                raise RuntimeError(f"the sandbox API server failed to start: {self._failure!r}")
            if time.monotonic() > deadline:
                self.stop_blocking()
                raise RuntimeError(
                    f"the sandbox API server did not start within {_STARTUP_TIMEOUT_SECONDS:.0f}s"
                )
            time.sleep(0.005)

    def stop_blocking(self) -> None:
        """``stop()`` for synchronous callers."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._thread = None
        self._server = None

    def _run(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._serve(sock))
        except BaseException as err:  # reported by start_blocking(), which is waiting on us
            self._failure = err
        finally:
            sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        controller = asyncio.create_task(self.cluster.run_controller(), name="sandbox-controller")
        try:
            await self._server.serve(sockets=[sock])
        finally:
            controller.cancel()
            await asyncio.gather(controller, return_exceptions=True)
