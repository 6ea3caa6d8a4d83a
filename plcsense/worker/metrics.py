"""Prometheus metrics and the small HTTP server for /metrics, /healthz and /readyz.

Names follow client_python's conventions: units in the name, counters exposed with ``_total``. Histograms of
inference carry ``route``, ``model`` and ``version`` so they join ``plcsense_model_info`` without relabelling.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import MetricsHandler

from plcsense.errors import ErrorCode

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MODEL = ["route", "model", "version"]


def _version() -> str:
    try:
        return version("plcsense")
    except PackageNotFoundError:
        return "unknown"


class Metrics:
    """The worker's metrics, on a registry of its own so several workers can share a process in tests."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # memory, CPU, open files, start time
        PlatformCollector(registry=r)
        Info("plcsense_build", "plcsense version", registry=r).info({"version": _version()})
        self.messages = Counter("plcsense_messages", "Messages received, good or bad", ["route"], registry=r)
        self.results = Counter("plcsense_results", "Results published", ["route"], registry=r)
        self.errors = Counter("plcsense_errors", "Inputs answered with an error", ["route", "reason"], registry=r)
        self.anomalies = Counter("plcsense_anomalies", "Results flagged as anomalies", ["route"], registry=r)
        self.unknown_inputs = Counter(
            "plcsense_unknown_inputs",
            "Classification results flagged unknown (unlike the model's training data)",
            ["route"],
            registry=r,
        )
        self.ignored = Counter(
            "plcsense_ignored_messages",
            "Messages acknowledged without an answer (answers, status)",
            ["reason"],
            registry=r,
        )
        self.answers_dropped = Counter(
            "plcsense_answers_dropped",
            "Answers that could not be delivered (refused by the broker, unusable response topic, lost QoS 0)",
            ["route", "reason"],
            registry=r,
        )
        self.connect_failures = Counter(
            "plcsense_mqtt_connect_failures", "Failed connection attempts, by cause", ["reason"], registry=r
        )
        self.inference = Histogram(
            "plcsense_inference_seconds", "LiteRT invoke time per batch", _MODEL, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "plcsense_message_latency_seconds",
            "Receipt to result, per message (taken when the result is built, just before it is handed to MQTT)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "plcsense_batch_size", "Inputs per LiteRT invoke", _MODEL, buckets=_BATCH_BUCKETS, registry=r
        )
        self.inflight = Gauge("plcsense_inflight_messages", "Messages received but not yet acknowledged", registry=r)
        self.saturated = Gauge(
            "plcsense_intake_saturated",
            "1 while intake waits for room (max_inflight or a route's max_pending)",
            registry=r,
        )
        self.saturations = Counter("plcsense_intake_saturations", "Times intake had to wait for room", registry=r)
        self.connected = Gauge("plcsense_mqtt_connected", "1 while connected to the broker", registry=r)
        self.model_info = Gauge("plcsense_model_info", "Model versions serving, per route", _MODEL, registry=r)
        self.model_loads = Counter(
            "plcsense_model_loads",
            "Model versions loaded or refused (failed a check)",
            ["route", "outcome"],
            registry=r,
        )
        self.shadow_inputs = Counter(
            "plcsense_shadow_inputs",
            "Inputs a shadow candidate answered beside the model",
            ["route", "version"],
            registry=r,
        )
        self.shadow_agreements = Counter(
            "plcsense_shadow_agreements",
            "Shadow answers that agree with the served one (top-1 label, or anomaly verdict)",
            ["route", "version"],
            registry=r,
        )
        self.shadow_score_difference = Histogram(
            "plcsense_shadow_score_difference",
            "Absolute difference of the candidate's score to the served score",
            ["route", "version"],
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=r,
        )
        self.captures = Counter(
            "plcsense_captures",
            "Inputs offered to capture, by outcome (written, full, dropped)",
            ["route", "outcome"],
            registry=r,
        )
        self.canary_inputs = Counter(
            "plcsense_canary_inputs", "Inputs answered by a canary candidate", ["route", "version"], registry=r
        )
        for reason in CONNECT_FAILURES:
            self.connect_failures.labels(reason)
        self.ignored.labels("output_topic")
        self.windows = Gauge(
            "plcsense_tracked_windows", "Devices with a sliding window in memory", ["route"], registry=r
        )
        self.evictions = Counter(
            "plcsense_window_evictions", "Device windows dropped to stay within max_devices", ["route"], registry=r
        )


@dataclass(frozen=True, slots=True)
class RouteMetrics:
    """One route's labelled series, resolved once: ``labels()`` per message is a measurable cost at 4,000 msg/s.
    Creating them also starts every series at 0, so the first burst of errors shows in ``increase()``."""

    messages: Counter
    results: Counter
    anomalies: Counter
    unknown: Counter
    latency: Histogram
    windows: Gauge
    evictions: Counter
    errors: dict[ErrorCode, Counter]


CONNECT_FAILURES = (
    "tls_hostname",
    "tls_untrusted",
    "tls_handshake",
    "refused",
    "dns",
    "timeout",
    "closed",
    "rejected",
    "other",
)
DROP_REASONS = ("bad_topic", "not_queued", "refused", "connection_lost")


def route_metrics(metrics: Metrics, route: str) -> RouteMetrics:
    for reason in DROP_REASONS:  # every series from 0: an alert sees the first one in increase()
        metrics.answers_dropped.labels(route, reason)
    for outcome in ("loaded", "refused"):
        metrics.model_loads.labels(route, outcome)
    return RouteMetrics(
        messages=metrics.messages.labels(route),
        results=metrics.results.labels(route),
        anomalies=metrics.anomalies.labels(route),
        unknown=metrics.unknown_inputs.labels(route),
        latency=metrics.latency.labels(route),
        windows=metrics.windows.labels(route),
        evictions=metrics.evictions.labels(route),
        errors={code: metrics.errors.labels(route, code.value) for code in ErrorCode},
    )


def serve_http(
    host: str,
    port: int,
    metrics: Metrics,
    ready: Callable[[], tuple[bool, str]],
    healthy: Callable[[], tuple[bool, str]],
) -> ThreadingHTTPServer:
    """Start the HTTP server on a daemon thread; ``ready`` and ``healthy`` return (ok, reason).

    /metrics is client_python's own handler (content negotiation for OpenMetrics, gzip).
    """

    class Handler(MetricsHandler):
        registry = metrics.registry

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                super().do_GET()
            elif path == "/healthz":
                ok, reason = healthy()
                self._reply(200 if ok else 503, (reason + "\n").encode())
            elif path == "/readyz":
                ok, reason = ready()
                self._reply(200 if ok else 503, (reason + "\n").encode())
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: keep logs quiet
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
