"""``plcsense serve``: settings, signals and the worker's life from start to a clean exit."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from plcsense.worker.service import Worker
from plcsense.worker.settings import Settings, load_settings

log = logging.getLogger("plcsense.worker")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the standard library has none and this is all a log shipper needs."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def _explain(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "settings"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)


def read_settings(config: Path | None) -> Settings | None:
    """Settings, or None after printing what is wrong and how to set it."""
    try:
        return load_settings(config)
    except FileNotFoundError as exc:
        print(f"plcsense serve: {exc}", file=sys.stderr)
    except ValidationError as exc:
        print(
            f"plcsense serve: invalid settings in {config or 'the environment'}:\n{_explain(exc)}\n"
            "Fix the YAML file or the PLCSENSE_... environment variable (nested keys use __, "
            "e.g. PLCSENSE_MQTT__URL).",
            file=sys.stderr,
        )
    except Exception as exc:  # YAML syntax errors and the like
        print(f"plcsense serve: cannot read settings from {config}: {exc}", file=sys.stderr)
    return None


def serve(config: Path | None) -> int:
    settings = read_settings(config)
    if settings is None:
        return 2
    root = logging.getLogger()
    if root.level != logging.DEBUG:  # plcsense -v wins over the file's log_level
        root.setLevel(settings.log_level)
    if settings.log_format == "json":
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():  # a second Ctrl-C / SIGTERM: stop waiting for the drain
            log.warning("second signal: exiting without waiting for in-flight messages (the broker keeps them)")
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    reload = threading.Event()
    signal.signal(signal.SIGHUP, lambda signum, frame: reload.set())
    try:
        worker = Worker(settings)
        worker.start()
    except (OSError, ValueError) as exc:  # a taken metrics port, unreadable TLS files...
        print(f"plcsense serve: cannot start: {exc}", file=sys.stderr)
        return 2
    while not stop.wait(0.5):
        if reload.is_set():  # SIGHUP: look for new model versions now (not in the handler: it may take seconds)
            reload.clear()
            log.info("SIGHUP: looking for new model versions")
            worker.reload()
    log.info("stopping: answering in-flight messages")
    drained = worker.stop()
    log.info("stopped%s", "" if drained else " (some messages left for redelivery)")
    return 0
