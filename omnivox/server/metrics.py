"""Prometheus metrics, one registry per app so tests can run several servers in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions_active = Gauge(
            "omnivox_sessions_active", "Open realtime sessions", ["door"], registry=self.registry
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
        self.sessions_ended = Counter(
            "omnivox_sessions_ended_by_server_total",
            "Realtime sessions the server ended: idle, write_timeout (client stopped reading), shutdown",
            ["door", "reason"],
            registry=self.registry,
        )
        self.protocol_errors = Counter(
            "omnivox_protocol_errors_total", "Error events sent to clients", ["door", "code"], registry=self.registry
        )
        self.engine_ready = Gauge("omnivox_engine_ready", "1 once the engine has loaded", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
