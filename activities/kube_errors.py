"""Kubernetes API errors as the ApplicationErrors a runbook shows: what failed, why, what to do.

Which errors a retry can cure decides ``non_retryable``: a missing object, refused credentials and
a rejected request stay wrong however often they are sent; a conflict, throttling, a server error
or an unreachable API server may not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from temporalio.exceptions import ApplicationError

if TYPE_CHECKING:
    from kubernetes.client.exceptions import ApiException


def _status_reason(err: ApiException) -> str:
    """The reason and message of the ``Status`` body the API server answered with."""
    try:
        body = json.loads(err.body or "{}")
        return f"{body.get('reason', err.reason)}: {body.get('message', '')}".rstrip(": ")
    except (TypeError, ValueError):
        return str(err.reason)


@contextmanager
def kube_errors(action: str, target: str) -> Iterator[None]:
    """Turn API errors raised inside into ApplicationErrors about ``action`` on ``target``."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError, MaxRetryError
    from urllib3.exceptions import TimeoutError as HTTPTimeout

    try:
        yield
    except ApiException as err:
        why = _status_reason(err)
        if err.status == 404:
            raise ApplicationError(
                f"cannot {action} {target}: it does not exist ({why}); check the name and "
                "namespace in the runbook input",
                type="KubernetesNotFound",
                non_retryable=True,
            ) from None
        if err.status in (401, 403):
            raise ApplicationError(
                f"cannot {action} {target}: the API server refused our credentials ({why}); "
                "grant astra-ops' ServiceAccount this verb in its RBAC Role",
                type="KubernetesForbidden",
                non_retryable=True,
            ) from None
        if err.status in (400, 422):
            raise ApplicationError(
                f"cannot {action} {target}: the API server rejected the request ({why}); "
                "this is a bug in the runbook input or in astra-ops",
                type="KubernetesInvalid",
                non_retryable=True,
            ) from None
        # 409 (a concurrent write), 429 and 5xx: a retry reads fresh state and can succeed.
        raise ApplicationError(
            f"cannot {action} {target}: {err.status} {why}", type="KubernetesUnavailable"
        ) from None
    except HTTPError as err:
        cause = err.reason if isinstance(err, MaxRetryError) else err
        if isinstance(cause, HTTPTimeout):
            raise ApplicationError(
                f"cannot {action} {target}: the Kubernetes API server did not answer in time "
                f"({cause}); it may be overloaded, and a write sent may still land: the retry "
                "reads the object afresh",
                type="KubernetesUnavailable",
            ) from None
        raise ApplicationError(
            f"cannot {action} {target}: the Kubernetes API server is not reachable ({err}); is "
            "the cluster up (or `astra-ops dev`'s sandbox running)?",
            type="KubernetesUnavailable",
        ) from None
