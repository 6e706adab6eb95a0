"""The Kubernetes API client the activities use: every request it sends gives up in time.

The ``kubernetes`` client waits for an answer as long as the API server takes, and a server that
holds a request (overloaded, or behind a load balancer that black-holed the connection) holds
the activity's thread with it. Temporal times the activity out and retries it on another thread,
but the first one stays blocked, and a pool of them runs dry. So each request is bounded below a
short activity's start-to-close timeout (``workflows.timeouts.DEFAULT_TIMEOUT``, 10 s): the call
fails by itself, as a retryable ``KubernetesUnavailable`` that says the API server did not answer,
and the activity's retry goes out on a fresh connection.
"""

from __future__ import annotations

from typing import Any

from kubernetes.client import ApiClient, Configuration

REQUEST_TIMEOUT_SECONDS = 4.0
"""The most one attempt of a request may take, connecting included."""
REQUEST_RETRIES = 1
"""urllib3 sends an idempotent request once more on a connection that broke or timed out (a
keep-alive connection the server closed meanwhile is the common case). Two attempts of
``REQUEST_TIMEOUT_SECONDS``: the client's own error, which says what failed, comes before
Temporal's timeout."""


class BoundedApiClient(ApiClient):
    """An ``ApiClient`` whose requests time out after ``request_timeout`` seconds (unless a call
    asks for its own timeout), retried by urllib3 at most ``REQUEST_RETRIES`` times (unless the
    configuration says otherwise)."""

    def __init__(
        self,
        configuration: Configuration | None = None,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        configuration = configuration or Configuration.get_default_copy()
        if configuration.retries is None:
            configuration.retries = REQUEST_RETRIES
        super().__init__(configuration)
        self.request_timeout = request_timeout

    def call_api(
        self,
        method: str,
        url: str,
        header_params: Any = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Any = None,
    ) -> Any:
        return super().call_api(
            method,
            url,
            header_params,
            body,
            post_params,
            _request_timeout=_request_timeout or self.request_timeout,
        )
