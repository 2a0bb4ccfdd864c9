"""What a generation service has made: totals for its health endpoint, and Prometheus metrics.

Both services, the model in this process (:class:`~.service.GenerationService`) and an upstream
engine (:class:`~.upstream.UpstreamService`), end each generation with the same summary (see
:mod:`.rows`); :class:`GenerationTally` counts it the same way for both.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..metrics import LLMMetrics

__all__ = ["GenerationTally", "record_metrics"]


class GenerationTally:
    """Generations ended per finish reason, tokens made, the last summary (a service's mixin).

    The service sets ``logger`` and ``metrics`` (``None``: no Prometheus metrics).
    """

    logger: logging.Logger
    metrics: LLMMetrics | None

    def reset_tally(self) -> None:
        """Start counting from zero (a service does when its model process starts)."""
        self.finished: Counter[str] = Counter()
        self.tokens_generated = 0
        self.last_generation: dict[str, Any] | None = None

    def tally(self, summary: dict[str, Any]) -> None:
        """Count one ended generation, and record it in the metrics."""
        self.finished[summary["finish_reason"]] += 1
        self.tokens_generated += summary["generated_tokens"]
        self.last_generation = summary
        if self.metrics is not None:
            try:
                record_metrics(self.metrics, summary)
            except Exception:  # the stream's end must not fail for its metrics
                self.logger.exception("a generation's metrics could not be recorded")

    def totals(self) -> dict[str, Any]:
        """The counts, for a health endpoint."""
        return {
            "finished": dict(self.finished),
            "tokens_generated": self.tokens_generated,
            "last_generation": self.last_generation,
        }


def record_metrics(metrics: LLMMetrics, summary: dict[str, Any]) -> None:
    """Record one ended generation (its ``on_finish`` summary) in ``metrics``.

    Called on the streams' side (the hub under gevent), where prometheus_client's locks belong.
    A generation that never had a token records its tokens only.
    """
    metrics.tokens.inc(summary["generated_tokens"])
    if summary.get("tokens_after_cancel"):
        metrics.tokens_after_cancel.inc(summary["tokens_after_cancel"])
    if summary.get("queue_ms") is not None:
        metrics.queue.observe(summary["queue_ms"] / 1000)
    if summary.get("time_to_first_token_ms") is not None:
        metrics.time_to_first_token.observe(summary["time_to_first_token_ms"] / 1000)
    if summary.get("time_per_output_token_ms") is not None:
        metrics.time_per_output_token.observe(summary["time_per_output_token_ms"] / 1000)
