"""The worker: a :class:`~plcsense.worker.pipeline.Pipeline` (the message path) behind a
:class:`~plcsense.worker.transport.Transport` (MQTT), with the metrics and health endpoints beside them."""

from __future__ import annotations

import logging
from http.server import ThreadingHTTPServer

from plcsense.worker.metrics import Metrics, serve_http
from plcsense.worker.pipeline import Answer, Inbound, Pipeline
from plcsense.worker.settings import Settings
from plcsense.worker.transport import Transport

log = logging.getLogger("plcsense.worker")


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.pipeline = Pipeline(settings, self.metrics, self._answer)
        self.transport = Transport(settings.mqtt, self.metrics, self.pipeline)
        self._http: ThreadingHTTPServer | None = None

    def _answer(self, inbound: Inbound, answer: Answer) -> None:
        self.transport.settle(inbound, answer)

    def ready(self) -> tuple[bool, str]:
        broken = self.pipeline.broken_routes
        if broken:
            return False, "models not loaded: " + "; ".join(broken)
        return self.transport.ready()

    def healthy(self) -> tuple[bool, str]:
        """Liveness: fails when the message path is stuck, so the orchestrator restarts the process."""
        dead = [r.name for r in self.pipeline.routes if r.batcher is not None and not r.batcher.alive]
        if dead:
            return False, "inference thread ended for routes " + ", ".join(dead)
        return self.transport.healthy()

    def start(self) -> None:
        self.pipeline.load_models()
        m = self.settings.metrics
        if m.port:
            self._http = serve_http(m.host, m.port, self.metrics, self.ready, self.healthy)
            log.info("metrics on http://%s:%d/metrics", m.host, m.port)
        self.transport.start()

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop taking messages, answer what is in flight, go offline. Returns False if the drain timed out."""
        drained = self.transport.stop(timeout)
        self.pipeline.close(timeout=5)
        if self._http:
            self._http.shutdown()
            self._http.server_close()
        return drained
