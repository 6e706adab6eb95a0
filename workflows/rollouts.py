"""Rolling a Deployment as two named steps, ``restart D`` then ``wait for D``: how every runbook
that moves services onto a new endpoint, credential or certificate restarts them, kept once.

Pods read their config, Secrets and endpoints when they start, so the change a runbook made
takes effect only once the rollout completes; the wait is its own step so the UI shows which
service a run is waiting on. A dry-run reports the restart and has nothing to wait for.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

from workflows.steps import StepRunner

with workflow.unsafe.imports_passed_through():
    from activities.kube_models import RolloutRestart, RolloutStatus, RolloutWait
    from activities.kubernetes import KubernetesActivities
    from activities.mutation import MutationResult


def roll_steps(*deployments: str) -> list[str]:
    """The steps :func:`roll` takes for each Deployment, in order: for a runbook's catalogue
    entry, and for the steps a run skips."""
    return [step for d in deployments for step in (f"restart {d}", f"wait for {d}")]


async def roll(
    steps: StepRunner,
    namespace: str,
    deployment: str,
    timeout_seconds: float,
    *,
    config_map: str | None = None,
) -> MutationResult:
    """Restart ``deployment`` (stamped with ``config_map``'s hash when given) and wait up to
    ``timeout_seconds`` for its rollout; what the restart did."""
    restarted = await steps.act(
        f"restart {deployment}",
        KubernetesActivities.rollout_restart,
        RolloutRestart(namespace=namespace, name=deployment, config_map=config_map),
    )
    if steps.request.dry_run:
        steps.skip(f"wait for {deployment}", "dry-run: nothing restarted")
        return restarted
    await wait_for(steps, f"wait for {deployment}", namespace, deployment, timeout_seconds)
    return restarted


async def wait_for(
    steps: StepRunner, name: str, namespace: str, deployment: str, timeout_seconds: float
) -> RolloutStatus:
    """The step ``name``: wait up to ``timeout_seconds`` for ``deployment``'s rollout to
    complete, heartbeating, so a worker lost mid-wait is noticed soon."""
    return await steps.check(
        name,
        KubernetesActivities.wait_rollout,
        RolloutWait(namespace=namespace, name=deployment, timeout_seconds=timeout_seconds),
        start_to_close_timeout=timedelta(seconds=timeout_seconds + 60),
    )
