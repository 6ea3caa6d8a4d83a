"""Capture for retraining: inputs whose answer is uncertain, or a sampled share of all, written where an engineer
labels them (by moving files between class folders) and runs ``plcsense train`` on the folder as it is.

Layout: ``<dir>/<predicted label>/<time>-<n>.<png|jpg|bmp|tif|webp|pnm|csv>`` (anomaly routes: ``normal/`` and
``anomaly/``; inputs flagged unknown: ``unknown/``),
plus one ``results.jsonl`` line per file with the answer it got. Bounded in files and bytes; writing happens on a
thread of its own behind a bounded queue, so a slow disk drops captures (counted) instead of slowing answers.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import random
import threading
import time
from typing import Any

import numpy as np

from plcsense.worker.metrics import Metrics
from plcsense.worker.settings import CaptureSettings

log = logging.getLogger("plcsense.worker")

_IMAGE_TYPES = {
    b"\x89PNG": "png", b"\xff\xd8\xff": "jpg", b"BM": "bmp", b"II*\x00": "tif", b"MM\x00*": "tif",
    **{f"P{n}".encode(): "pnm" for n in range(1, 7)},
}  # fmt: skip


def _image_suffix(payload: bytes) -> str:
    """The file suffix ``plcsense train images`` reads this image by (every format the worker decodes)."""
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        return "webp"
    for magic, suffix in _IMAGE_TYPES.items():
        if payload.startswith(magic):
            return suffix
    return "img"


def _folder(doc: dict[str, Any]) -> str:
    """Where an answer's input goes: its predicted class (the folder a retrain reads it from)."""
    if doc.get("unknown"):
        return "unknown"
    if "is_anomaly" in doc:
        return "anomaly" if doc["is_anomaly"] else "normal"
    name = str(doc.get("label", "unlabelled")).replace("/", "_").replace("\x00", "_")
    return name if name not in ("", ".", "..") else "unlabelled"


def _csv(window: np.ndarray, channels: list[str]) -> bytes:
    buffer = io.StringIO()
    np.savetxt(buffer, window, delimiter=",", header=",".join(channels), comments="", fmt="%.6g")
    return buffer.getvalue().encode()


class Capture:
    """One route's capture directory."""

    def __init__(self, route: str, settings: CaptureSettings, metrics: Metrics, worker: str) -> None:
        self.route = route
        self._worker = worker  # in file names: replicas sharing one capture folder never overwrite each other
        self.settings = settings
        self._outcomes = {o: metrics.captures.labels(route, o) for o in ("written", "full", "dropped")}
        self._queue: queue.Queue[tuple[str, str, bytes, dict[str, Any]]] = queue.Queue(maxsize=256)
        self._random = random.Random()
        self._n = 0
        settings.dir.mkdir(parents=True, exist_ok=True)
        existing = [p for p in settings.dir.rglob("*") if p.is_file() and p.name != "results.jsonl"]
        self._files, self._bytes = len(existing), sum(p.stat().st_size for p in existing)
        threading.Thread(target=self._write, name=f"capture-{route}", daemon=True).start()

    def wanted(self, doc: dict[str, Any]) -> bool:
        """Uncertain answers (low top-1 score, near the anomaly threshold, unknown) and the sampled share."""
        s = self.settings
        if doc.get("unknown"):
            return True
        if s.below_score is not None and "label" in doc and doc["score"] < s.below_score:
            return True
        threshold = doc.get("threshold")
        if s.near_threshold is not None and threshold and abs(doc["score"] - threshold) <= s.near_threshold * threshold:
            return True
        return s.sample_percent > 0 and self._random.random() * 100 < s.sample_percent

    def offer(self, doc: dict[str, Any], payload: bytes, window: np.ndarray | None, channels: list[str] | None) -> None:
        """Queue one input for writing if wanted and there is room; never blocks."""
        if not self.wanted(doc):
            return
        s = self.settings
        if self._files >= s.max_files or self._bytes >= s.max_bytes:
            self._outcomes["full"].inc()
            return
        if channels is not None and window is not None:
            data, suffix = _csv(window, channels), "csv"
        else:
            data, suffix = payload, _image_suffix(payload)
        folder = _folder(doc)
        if self._bytes + len(data) > s.max_bytes:
            self._outcomes["full"].inc()
            return
        self._n += 1
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{self._worker}-{self._n:06d}.{suffix}"
        try:
            self._queue.put_nowait((folder, name, data, doc))
        except queue.Full:
            self._outcomes["dropped"].inc()
            return
        self._files += 1
        self._bytes += len(data)

    def failed(self) -> None:
        """Count a capture that could not be offered (an unexpected error) as dropped."""
        self._outcomes["dropped"].inc()

    def _write(self) -> None:
        while True:
            folder, name, data, doc = self._queue.get()
            try:
                target = self.settings.dir / folder
                target.mkdir(exist_ok=True)
                (target / name).write_bytes(data)
                with (self.settings.dir / "results.jsonl").open("a") as results:
                    results.write(json.dumps({"file": f"{target.name}/{name}", **doc}) + "\n")
                self._outcomes["written"].inc()
            except Exception as exc:  # the writer thread must outlive any one capture
                self._outcomes["dropped"].inc()
                log.error("route %s: cannot write a capture to %s: %s", self.route, self.settings.dir, exc)
