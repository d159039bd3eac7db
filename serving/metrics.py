"""Prometheus metrics of one server process (``GET /metrics``), in a registry of its own.

| metric | type | labels |
|---|---|---|
| ``maven_http_requests_total`` | counter | ``path``, ``status`` (``499``: the client went away) |
| ``maven_generations_total`` | counter | ``outcome``: completed, cancelled, timeout, error |
| ``maven_queue_depth`` | gauge | requests waiting for a generation slot |
| ``maven_active_generations`` | gauge | generations holding a slot |
| ``maven_model_ready`` | gauge | 1 once the model is loaded |
| ``maven_stage_seconds`` | histogram | ``stage``: preprocess, vision, discrete, h_eos, selector, assemble, prefill, decode |
| ``maven_queue_wait_seconds`` | histogram | time from admission to a slot |
| ``maven_ttft_seconds`` | histogram | time to first token (from the start of the generation) |
| ``maven_request_seconds`` | histogram | whole generation (without the queue wait) |
| ``maven_decode_tokens_per_second`` | histogram | decode speed of each generation |
| ``maven_prompt_tokens_total`` / ``maven_completion_tokens_total`` | counter | |
| ``maven_pipeline_cache`` | gauge | ``part`` (visual_cache, prefix_cache, batching), ``stat``: the runtime's
  ``MavenPipeline.cache_stats()`` counters (hits, misses, bytes, batch occupancy, ...) at scrape time |

With Ray Serve each replica keeps its own registry; ``/metrics`` answers for the replica that
served the scrape (Ray's own metrics cover the cluster).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from maven_edge.runtime.pipeline import STAGES, GenerationResult

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

__all__ = ["CONTENT_TYPE", "ServerMetrics"]


class _PipelineStats:
    """The runtime's cache and batching counters, read when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]):
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("maven_pipeline_cache", "Runtime cache and batching counters",
                                   labels=["part", "stat"])
        for part, values in (self.stats() or {}).items():
            for stat, value in (values or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    family.add_metric([part, stat], float(value))
        yield family


class ServerMetrics:
    def __init__(self, pipeline_stats: Callable[[], dict[str, Any] | None] | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.http = Counter("maven_http_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.generations = Counter("maven_generations", "Generations by outcome", ["outcome"], registry=r)
        self.queue_depth = Gauge("maven_queue_depth", "Requests waiting for a generation slot", registry=r)
        self.active = Gauge("maven_active_generations", "Generations holding a slot", registry=r)
        self.ready = Gauge("maven_model_ready", "1 once the model is loaded", registry=r)
        self.stage = Histogram("maven_stage_seconds", "Pipeline stage latency", ["stage"], buckets=_FAST, registry=r)
        self.queue_wait = Histogram("maven_queue_wait_seconds", "Wait for a generation slot", buckets=_SLOW,
                                    registry=r)
        self.ttft = Histogram("maven_ttft_seconds", "Time to first token", buckets=_SLOW, registry=r)
        self.latency = Histogram("maven_request_seconds", "Generation time", buckets=_SLOW, registry=r)
        self.tokens_per_s = Histogram("maven_decode_tokens_per_second", "Decode speed per generation",
                                      buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500), registry=r)
        self.prompt_tokens = Counter("maven_prompt_tokens", "Prompt tokens (text + visual)", registry=r)
        self.completion_tokens = Counter("maven_completion_tokens", "Generated tokens", registry=r)
        if pipeline_stats is not None:
            r.register(_PipelineStats(pipeline_stats))
        for stage in STAGES:  # every stage shows up in the first scrape, at zero
            self.stage.labels(stage=stage)
        for outcome in ("completed", "cancelled", "timeout", "error"):
            self.generations.labels(outcome=outcome)

    def observe(self, result: GenerationResult) -> None:
        t = result.timings
        for stage, ms in t.stages().items():
            self.stage.labels(stage=stage).observe(ms / 1e3)
        if result.token_ids:
            self.ttft.observe(t.ttft_ms / 1e3)
        self.latency.observe(t.total_ms / 1e3)
        if t.decode_tokens_per_s > 0:
            self.tokens_per_s.observe(t.decode_tokens_per_s)
        self.prompt_tokens.inc(result.prompt_tokens)
        self.completion_tokens.inc(len(result.token_ids))

    def render(self) -> bytes:
        return generate_latest(self.registry)
