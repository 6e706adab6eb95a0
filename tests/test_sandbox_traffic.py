"""Which pods do the simulated Astra's work: the ones its Kubernetes Services select.

What makes an upgrade in the sandbox real: a green Deployment does nothing until the Service's
selector is switched to it, and then the blue pods stop; a canary's pods matching the stable
selector take their share of the leases; and an image marked as a bad build fails only on the
pods that run it. The load generator is driven tick by tick (``step()``) against a real
PostgreSQL and Redis and the sandbox cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from kubernetes.client import AppsV1Api, CoreV1Api

from sandbox.faults import BAD_BUILD_ERROR, SandboxTarget, bad_canary, clear_bad_build
from sandbox.faults import bad_canary_image as default_bad_canary_image
from sandbox.kube.seed import deployment_manifest
from sandbox.loadgen import LoadConfig, LoadGenerator, StepReport
from sandbox.platform import ClusterView
from tests.conftest_kube import KubeSandbox, canary_manifest

NS = "astra"
WORKERS = "astra-worker"
STABLE_IMAGE = "registry.sandbox.local/astra/astra-worker:1.0.0"
CANARY_IMAGE = "registry.sandbox.local/astra/astra-worker:1.1.0"


@pytest.fixture
async def generator(data_plane: SandboxTarget, kube: KubeSandbox) -> AsyncIterator[LoadGenerator]:
    """Astra played on the sandbox cluster at its steady rate: four tasks a tick, up to two per
    worker, so the workers have room to spare and take turns; a failed task waits for its retry
    past the test, so it keeps the id of the worker that failed it."""
    generator = LoadGenerator(
        data_plane.dsn,
        data_plane.redis_url,
        [],
        LoadConfig(seed=7, tasks_per_step=4, lease_per_worker=2, retry_delay_seconds=3600),
        key_prefix=data_plane.key_prefix,
        cluster=ClusterView(kube.api),
    )
    try:
        yield generator
    finally:
        await generator.aclose()


def pods(kube: KubeSandbox, **labels: str) -> set[str]:
    return {p["metadata"]["name"] for p in kube.cluster.pods(NS, labels)}


# Typed as Any, as in test_fake_kube: the tests read optional fields freely.
def apps(kube: KubeSandbox) -> Any:
    return AppsV1Api(kube.api)


def deploy(kube: KubeSandbox, manifest: dict[str, Any]) -> None:
    """Create a Deployment and let its pods start at once."""
    apps(kube).create_namespaced_deployment(NS, manifest)
    kube.cluster.settle()


def select(kube: KubeSandbox, selector: dict[str, str]) -> None:
    """Switch the workers' Service, as a blue/green switch does: a JSON patch replaces the
    selector whole (a strategic merge patch would merge it key by key)."""
    CoreV1Api(kube.api).patch_namespaced_service(
        WORKERS, NS, [{"op": "replace", "path": "/spec/selector", "value": selector}]
    )


async def ticks(generator: LoadGenerator, count: int) -> list[StepReport]:
    return [await generator.step() for _ in range(count)]


def leasing(reports: list[StepReport]) -> set[str]:
    """The workers that leased tasks in any of these ticks."""
    return {worker for r in reports for worker, tasks in r.leased.items() if tasks}


def beating(reports: list[StepReport]) -> set[str]:
    """The workers that heartbeat in every one of these ticks."""
    return set.intersection(*(set(r.heartbeats) for r in reports))


async def failures_by_worker(dsn: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        rows = await (
            await conn.execute(
                "SELECT worker_id, count(*) FROM tasks"
                " WHERE status IN ('failed', 'dead_letter') GROUP BY worker_id"
            )
        ).fetchall()
    return {str(worker): int(count) for worker, count in rows}


async def test_switching_the_service_selector_moves_the_work_to_the_green_pods(
    kube: KubeSandbox, generator: LoadGenerator
) -> None:
    deploy(kube, deployment_manifest("astra-worker-green", 3))
    blue, green = pods(kube, app=WORKERS), pods(kube, app="astra-worker-green")
    assert len(blue) == len(green) == 3

    before = await ticks(generator, 3)
    assert leasing(before) == beating(before) == blue
    held_by_blue = {task for worker in blue for task in before[-1].leased[worker]}
    assert held_by_blue

    select(kube, {"app": "astra-worker-green"})
    after = await ticks(generator, 3)
    assert leasing(after) == beating(after) == green
    assert not held_by_blue & {task for r in after for task in r.succeeded}  # blue is idle

    select(kube, {"app": WORKERS})  # the instant switch back
    [back] = await ticks(generator, 1)
    assert leasing([back]) <= blue and beating([back]) == blue
    assert held_by_blue <= set(back.succeeded)  # blue finishes what it held


async def test_canary_pods_matching_the_stable_selector_take_their_share_of_the_leases(
    kube: KubeSandbox, generator: LoadGenerator
) -> None:
    deploy(kube, canary_manifest(CANARY_IMAGE))
    canary = pods(kube, app=WORKERS, track="canary")
    assert len(canary) == 1 and len(pods(kube, app=WORKERS)) == 4

    view = await ClusterView(kube.api).observe()
    assert set(view.workers) == pods(kube, app=WORKERS)
    assert {view.images[pod] for pod in canary} == {CANARY_IMAGE}
    assert {view.images[pod] for pod in set(view.workers) - canary} == {STABLE_IMAGE}

    # Four tasks a tick for four workers that could take eight: each takes its turn.
    reports = await ticks(generator, 4)
    leases = sum(len(tasks) for r in reports for tasks in r.leased.values())
    canary_leases = sum(len(r.leased[pod]) for r in reports for pod in canary)
    assert leases == 16
    assert canary_leases / leases == 0.25  # one pod of four

    select(kube, {"app": WORKERS, "track": "stable"})  # a selector the canary does not match
    assert not leasing(await ticks(generator, 1))  # nor does the stable pod, unlabelled


async def test_a_bad_canary_fails_only_the_tasks_its_canary_pods_run(
    kube: KubeSandbox, generator: LoadGenerator, data_plane: SandboxTarget
) -> None:
    image = await default_bad_canary_image(kube.api)
    assert image == "registry.sandbox.local/astra/astra-worker:bad-canary"
    before = apps(kube).read_namespaced_deployment(WORKERS, NS)
    fault = await bad_canary(data_plane, image, share=1.0)
    assert (fault.image, fault.share, fault.error) == (image, 1.0, BAD_BUILD_ERROR)
    after = apps(kube).read_namespaced_deployment(WORKERS, NS)
    assert after.metadata.generation == before.metadata.generation  # nothing was rolled out
    assert after.spec.template.spec.containers[0].image == STABLE_IMAGE

    assert not any(r.failed for r in await ticks(generator, 3))  # no pod runs it yet

    deploy(kube, canary_manifest(image))
    canary = pods(kube, app=WORKERS, track="canary")
    await ticks(generator, 5)
    failed = await failures_by_worker(data_plane.dsn)
    assert set(failed) == canary and failed[next(iter(canary))] > 0

    cleared = await clear_bad_build(data_plane, image)
    assert cleared.was_bad
    after = await ticks(generator, 4)
    assert not any(r.failed for r in after)
    assert canary & leasing(after)  # the canary still works, now without failing
    assert not (await clear_bad_build(data_plane, image)).was_bad
