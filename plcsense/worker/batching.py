"""Micro-batching: inputs for one model are gathered for a few milliseconds and run in one LiteRT invoke."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
log = logging.getLogger("plcsense.worker")


class MicroBatcher(Generic[Item]):
    """Feeds ``handle`` lists of up to ``max_batch`` items; the first item waits at most ``max_wait_s``.

    One thread per batcher keeps the interpreter single-threaded per model and the MQTT network thread free.
    """

    def __init__(self, name: str, handle: Callable[[Sequence[Item]], None], max_batch: int, max_wait_s: float) -> None:
        self._handle = handle
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"batch-{name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, item: Item) -> None:
        self._queue.put(item)

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, closing = [first], False
            deadline = time.monotonic() + self._max_wait_s
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                batch.append(item)
            try:
                self._handle(batch)
            except Exception:  # the thread must outlive one bad batch, or the route stalls for good
                log.exception("batch of %d failed", len(batch))
            if closing:
                return
