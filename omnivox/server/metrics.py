"""Prometheus metrics, one registry per app so tests can run several servers in one process.

With `omnivox serve --workers N` every worker writes its values to files in `PROMETHEUS_MULTIPROC_DIR` and any
worker's `/metrics` renders the sum over all of them (prometheus_client's multiprocess mode): counters and
histograms add up, `sessions_active` and outstanding requests are summed over live workers, readiness and host
health take the lowest value.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from omnivox.pipeline.engines.base import Engine, engine_failure

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions_active = Gauge(
            "omnivox_sessions_active",
            "Open realtime sessions",
            ["door"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.sessions_total = Counter(
            "omnivox_sessions_total", "Realtime sessions opened", ["door"], registry=self.registry
        )
        self.sessions_rejected = Counter(
            "omnivox_sessions_rejected_total",
            "Sessions refused (limit or auth)",
            ["door", "reason"],
            registry=self.registry,
        )
        self.responses = Counter(
            "omnivox_responses_total", "Responses finished, by final status", ["door", "status"], registry=self.registry
        )
        self.first_audio = Histogram(
            "omnivox_response_first_audio_seconds",
            "Response start -> first audio frame sent (engine + pacing)",
            ["door"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.barge_ins = Counter(
            "omnivox_barge_ins_total", "Responses cancelled because the caller spoke", ["door"], registry=self.registry
        )
        self.tool_calls = Counter(
            "omnivox_tool_calls_total",
            "Function calls the model made: completed (sent to the client) or invalid (the response failed)",
            ["door", "outcome"],
            registry=self.registry,
        )
        self.false_interruptions = Counter(
            "omnivox_false_interruptions_total",
            "Answers paused for speech too short to be an interruption (backchannel, noise, echo), then resumed",
            ["door"],
            registry=self.registry,
        )
        self.end_of_turn_seconds = Histogram(
            "omnivox_end_of_turn_prediction_seconds",
            "semantic_vad: end-of-turn model request -> answer (features, batch, ONNX)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.sessions_ended = Counter(
            "omnivox_sessions_ended_by_server_total",
            "Realtime sessions the server ended: idle, write_timeout (client stopped reading), shutdown",
            ["door", "reason"],
            registry=self.registry,
        )
        self.protocol_errors = Counter(
            "omnivox_protocol_errors_total", "Error events sent to clients", ["door", "code"], registry=self.registry
        )
        self.engine_ready = Gauge(
            "omnivox_engine_ready", "1 once the engine has loaded", registry=self.registry, multiprocess_mode="livemin"
        )
        self.engine_host_up = Gauge(
            "omnivox_engine_host_up",
            "1 while a remote engine host passes its health checks",
            ["url"],
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.engine_host_outstanding = Gauge(
            "omnivox_engine_host_outstanding",
            "Requests in flight to a remote engine host",
            ["url"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )

    def observe_engine_host(self, url: str, healthy: bool, outstanding: int) -> None:
        """A remote engine host's health or load changed."""
        self.engine_host_up.labels(url).set(1 if healthy else 0)
        self.engine_host_outstanding.labels(url).set(outstanding)

    def watch_engine(self, engine: Engine) -> None:
        """Report what the engine counts itself, read at each scrape."""
        self.registry.register(EngineCollector(engine))

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """The engine's own state: whether its device failed for good, and why sequences left the shared decode slots
    (`static_cache`) for growing caches (an engine without slots reports none)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        failed = GaugeMetricFamily(
            "omnivox_engine_failed", "1 once the engine's device failed and the process must be restarted"
        )
        failed.add_metric([], float(engine_failure(self._engine) is not None))
        yield failed
        fallbacks = CounterMetricFamily(
            "omnivox_static_cache_fallbacks",
            "Sequences decoded on growing caches instead of the shared slots, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(dict(getattr(self._engine, "static_cache_fallbacks", {})).items()):
            fallbacks.add_metric([reason], count)
        yield fallbacks
