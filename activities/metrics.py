"""Where the task-health runbooks read their numbers: SQL over the contract tables, or Prometheus.

Both sources answer the same two questions with the same models, so a runbook's thresholds and
decisions do not depend on which one a deployment configures (``metrics_source``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeats import heartbeating
from activities.postgres import (
    FAILED_STATUSES,
    OUTCOME_STATUSES,
    CostComparison,
    CostShare,
    FailureRate,
    FailureRateRequest,
    LlmCostRequest,
    connect,
    query_failure_rate,
    query_llm_cost,
)

if TYPE_CHECKING:
    import httpx


class MetricsSource(Protocol):
    """Answers the runbooks' metric questions over a window that ends now."""

    async def failure_rate(self, window_seconds: float) -> FailureRate: ...

    async def llm_cost(self, req: LlmCostRequest) -> CostComparison: ...


class SqlMetrics:
    """Reads the numbers straight from Astra's PostgreSQL: the default, and the ground truth."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    async def failure_rate(self, window_seconds: float) -> FailureRate:
        async with await connect(self._dsn) as conn:
            return await query_failure_rate(conn, window_seconds)

    async def llm_cost(self, req: LlmCostRequest) -> CostComparison:
        async with await connect(self._dsn) as conn:
            return await query_llm_cost(conn, req)


def _duration(seconds: float) -> str:
    """A PromQL range; milliseconds, since Prometheus rejects fractional durations like 0.5s."""
    return f"{round(seconds * 1000)}ms"


def _status_selector(statuses: tuple[str, ...]) -> str:
    return f'astra_tasks_total{{status=~"{"|".join(statuses)}"}}'


class PrometheusMetrics:
    """Reads the same numbers from Prometheus' HTTP API (``/api/v1/query``).

    The queries assume ``astra_tasks_total`` and ``astra_llm_cost_usd_total`` grow with each
    outcome and each LLM call, so ``increase`` over the window counts what happened in it.
    """

    def __init__(self, url: str, client: httpx.AsyncClient | None = None) -> None:
        import httpx  # here, not above: the workflows (and the CLI) import this module

        self._url = url.rstrip("/")
        self._client = client or httpx.AsyncClient(timeout=10.0)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def failure_rate(self, window_seconds: float) -> FailureRate:
        window = _duration(window_seconds)
        failed = await self._scalar(f"sum(increase({_status_selector(FAILED_STATUSES)}[{window}]))")
        total = await self._scalar(f"sum(increase({_status_selector(OUTCOME_STATUSES)}[{window}]))")
        return FailureRate(
            window_seconds=window_seconds,
            total=round(total),
            failed=round(failed),
            rate=failed / total if total > 0 else 0.0,
        )

    async def llm_cost(self, req: LlmCostRequest) -> CostComparison:
        window, baseline = _duration(req.window_seconds), _duration(req.baseline_seconds)
        window_cost = await self._scalar(f"sum(increase(astra_llm_cost_usd_total[{window}]))")
        # As in SQL, the baseline ends where the window starts.
        baseline_cost = await self._scalar(
            f"sum(increase(astra_llm_cost_usd_total[{baseline}] offset {window}))"
        )
        tops = [
            await self._top(label, window, req.top) for label in ("tenant", "agent_id", "model")
        ]
        return CostComparison.of(req, window_cost, baseline_cost, (tops[0], tops[1], tops[2]))

    async def _top(self, label: str, window: str, top: int) -> list[CostShare]:
        result = await self._query(
            f"topk({top}, sum by ({label}) (increase(astra_llm_cost_usd_total[{window}])))"
        )
        shares = [
            CostShare(key=sample["metric"].get(label, ""), cost_usd=float(sample["value"][1]))
            for sample in result
        ]
        return sorted(shares, key=lambda s: (-s.cost_usd, s.key))

    async def _scalar(self, promql: str) -> float:
        """A query's single value; an empty result means no samples, which counts as zero."""
        result = await self._query(promql)
        return float(result[0]["value"][1]) if result else 0.0

    async def _query(self, promql: str) -> list[dict[str, Any]]:
        import httpx

        endpoint = f"{self._url}/api/v1/query"
        try:
            response = await self._client.get(endpoint, params={"query": promql})
        except httpx.HTTPError as err:
            # Retryable: Prometheus restarting or a network blip passes.
            raise ApplicationError(
                f"Prometheus is not reachable at {endpoint} ({err!r}); check the Prometheus URL "
                "in the settings, or unset it to read metrics from SQL"
            ) from err
        body: dict[str, Any] = response.json() if response.content else {}
        if response.status_code != 200 or body.get("status") != "success":
            raise ApplicationError(
                f"Prometheus rejected {promql!r}: HTTP {response.status_code}, "
                f"{body.get('errorType', '')} {body.get('error', response.text[:200])}",
                non_retryable=response.status_code == 400,
            )
        data: dict[str, Any] = body["data"]
        if data.get("resultType") != "vector":
            raise ApplicationError(
                f"Prometheus answered {promql!r} with a {data.get('resultType')}, not a vector",
                non_retryable=True,
            )
        result: list[dict[str, Any]] = data["result"]
        return result


def metrics_source(dsn: str, prometheus_url: str | None) -> MetricsSource:
    """Prometheus when a URL is configured, SQL otherwise: the one place this choice is made."""
    return PrometheusMetrics(prometheus_url) if prometheus_url else SqlMetrics(dsn)


class MetricsActivities:
    """The metric reads the runbooks decide on, from whichever source the worker was given."""

    def __init__(self, source: MetricsSource) -> None:
        self._source = source

    @activity.defn
    async def failure_rate(self, req: FailureRateRequest) -> FailureRate:
        """Task failure rate over the window (high-error-rate: > 5 % over 5 min)."""
        async with heartbeating("reading the task failure rate"):
            return await self._source.failure_rate(req.window_seconds)

    @activity.defn
    async def cost_comparison(self, req: LlmCostRequest) -> CostComparison:
        """Last window's LLM cost against the trailing daily average (llm-cost-spike: > 2x)."""
        async with heartbeating("reading the LLM cost"):
            return await self._source.llm_cost(req)
