"""The worker: a :class:`~plcsense.worker.pipeline.Pipeline` (the message path) behind a
:class:`~plcsense.worker.transport.Transport` (MQTT), with the metrics and health endpoints beside them."""

from __future__ import annotations

import json
import logging
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from plcsense.quiet import LITERT_STARTUP, without_lines
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
        control = self.control if settings.models.control else None
        self.transport = Transport(settings.mqtt, self.metrics, self.pipeline, control)
        self._http: ThreadingHTTPServer | None = None
        self._stopping = threading.Event()
        self._poller: threading.Thread | None = None

    def control(self, payload: bytes) -> dict[str, Any]:
        """One command from the control topic: ``{"command": "reload" | "promote" | "rollback" | "end_trial",
        "route": ...}``."""
        try:
            doc = json.loads(payload)
            command, route = doc["command"], doc.get("route")
            if command == "reload":
                self.pipeline.reload()
                detail = "reloaded"
            elif command == "promote":
                detail = f"serving version {self.pipeline.promote(route)}"
            elif command == "rollback":
                detail = f"serving version {self.pipeline.rollback(route)}"
            elif command == "end_trial":
                detail = f"candidate dropped, serving version {self.pipeline.end_trial(route)}"
            else:
                raise ValueError(f"unknown command {command!r}; use reload, promote, rollback or end_trial")
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            log.warning("control: refused %r: %s", payload[:200], exc)
            return {"ok": False, "detail": str(exc)}
        except Exception as exc:  # an unreadable repository...: the command is answered, serving goes on
            log.exception("control: %r failed", payload[:200])
            return {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        log.warning("control: %s", detail)
        return {"ok": True, "command": command, "route": route, "detail": detail}

    def reload(self) -> None:
        """Look for new model versions now (SIGHUP); a failure is logged and serving goes on with what it has."""
        try:
            self.pipeline.reload()
        except Exception:
            log.exception("looking for new model versions failed")

    def _poll(self, every_s: float) -> None:
        while not self._stopping.wait(every_s):
            try:
                self.pipeline.reload()
            except Exception:  # the next poll tries again; serving goes on with what it has
                log.exception("model repository poll failed")

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
        with without_lines(LITERT_STARTUP):  # LiteRT announces its CPU delegate at the first interpreter only
            self.pipeline.load_models()
        m = self.settings.metrics
        if m.port:
            self._http = serve_http(m.host, m.port, self.metrics, self.ready, self.healthy)
            log.info("metrics on http://%s:%d/metrics", m.host, m.port)
        self.transport.start()
        if self.settings.models.poll_s:
            self._poller = threading.Thread(
                target=self._poll, args=(self.settings.models.poll_s,), name="model-poll", daemon=True
            )
            self._poller.start()

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop taking messages, answer what is in flight, go offline. Returns False if the drain timed out."""
        self._stopping.set()
        drained = self.transport.stop(timeout)
        self.pipeline.close(timeout=5)
        if self._http:
            self._http.shutdown()
            self._http.server_close()
        return drained
