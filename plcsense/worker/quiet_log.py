"""Warnings that a misbehaving PLC repeats many times a second are logged once, then summarised with a count."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """Logs the first message of each key, then at most one per ``interval_s`` saying how many were held back."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, int]] = {}  # key -> (last logged at, suppressed since)

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._state.get(key, (-self._interval_s, 0))
            if now - last < self._interval_s:
                self._state[key] = (last, suppressed + 1)
                return
            self._state[key] = (now, 0)
            if len(self._state) > 1000:  # keys come from topics and codes: keep the table small
                self._state = {k: v for k, v in self._state.items() if now - v[0] < self._interval_s}
        if suppressed:
            msg += " (%d more like this in the last %.0f s)"
            args = (*args, suppressed, now - last)
        self._logger.log(level, msg, *args, exc_info=exc_info)
