"""SKAB benchmark, official protocol, for plcsense's sensor anomaly detector; F1 / FAR / MAR as JSON.

    .venv/bin/python bench/skab.py ../shared/data/skab --anomaly-free-pieces 8 [--out PRED.csv] [--window N]
    .venv/bin/python bench/skab.py ../shared/data/skab --tune-on valve1 --report-on valve2 \
        --anomaly-free-pieces 8 --tune-pieces 0-3
    .venv/bin/python bench/skab.py ../shared/data/skab --via-mqtt [--url mqtt://host:1883]
    .venv/bin/python bench/skab.py ../shared/data/skab --baselines      # the published detectors, recomputed

Protocol (Katser & Kozitsin, SKAB): every CSV file on its own; its first 400 rows are the training part (normal
operation) and the rest the test part; the detector is chosen, fitted and its threshold set on the training part
only, without labels. A row's prediction is the score of the window ending at that row (test rows without a full
window are predicted normal; the window may reach back into the training part). Scores are pooled over the
test rows of all files: F1 = TP / (TP + (FP + FN) / 2), FAR = FP / (FP + TN), MAR = FN / (FN + TP).
``--anomaly-free-pieces N`` cuts ``anomaly-free/anomaly-free.csv`` into N equal pieces and runs each through the
same protocol: every row is normal, so its figure is the false-alarm rate on normal data nobody labelled.

Training and scoring are the product's own: ``plcsense train sensors`` code (``train_anomaly_tables`` with the
default ``SensorTrainConfig``: detector chosen by validation, threshold from held-out normal windows) writes one
bundle per file, its rows are judged by ``plcsense evaluate``'s code (``plcsense.training.anomaly_eval``: that
bundle's LiteRT model and threshold, as the worker would) and the figures are that module's. What stays here is
the protocol: the 400-row split, pooling per folder, the pieces, SKAB's prediction file and the baselines.

``--tune-on A --report-on B`` is the honest development protocol: the settings a developer would pick (the AR
detector's shape, whether channels with persistent levels are judged by their changes, the threshold's risk) are
chosen with A's labels (and the anomaly-free pieces named by ``--tune-pieces``) from a grid, then the product is
trained with them (the chosen detector first among the candidates selection tries) and reported on A (dev) and
on B and the other pieces (held back, never looked at while choosing). The rule: the highest F1 on A among the
settings with FAR <= 0.15 on A and <= 0.05 on the tuning pieces; failing that, the highest F1 minus the excess
of those false-alarm rates over their limits. The grid is scored with the product's calibration in numpy
(``detectors.calibrate``, the same numbers as the exported model) to keep it to seconds.

``--via-mqtt`` then replays every file through the real worker (``plcsense serve`` as its own process, one per
file) on a real Mosquitto (a private one on a free port, or ``--url`` / ``PLCSENSE_MQTT_URL``), one JSON reading
per message, and checks that its ``is_anomaly`` answers equal the offline predictions; it also reports the
worker's per-reading latency and the end-to-end throughput.

DATA_DIR holds sub-folders of CSV files with an ``anomaly`` column (valve1/, valve2/, other/; ``changepoint`` is
not a channel); files without one (anomaly-free/, baseline_predictions/) are skipped. Every test row's offline
prediction is written to ``--out`` as ``file,datetime,pred_anomaly``, the format of SKAB's published predictions.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from plcsense.harness import Broker
from plcsense.training.anomaly_eval import alarm_scores, judge_rows
from plcsense.training.data import SensorTable, read_sensor_csv
from plcsense.training.quiet import import_tensorflow_quietly

LABEL, CHANGEPOINT = "anomaly", "changepoint"
READY_TIMEOUT_S = 60.0
ANOMALY_FREE = "anomaly-free"
MAX_FAR, MAX_FAR_NORMAL = 0.15, 0.05  # the acceptance limits the tuning rule respects


@dataclass
class LabelledFile:
    key: str  # "valve1/0.csv", or "anomaly-free/3" for a piece of the anomaly-free recording
    columns: list[str]  # the sensor channels, in CSV order
    values: np.ndarray  # (rows, C)
    labels: np.ndarray  # (rows,) bool
    times: list[str]  # the datetime column, or row numbers


@dataclass
class FileRun:
    """One file's bundle and offline scoring."""

    key: str
    bundle: Path
    train_rows: int
    window: int
    threshold: float
    first: int  # index of the first row with a full window (the first row that is really scored)
    scores: np.ndarray  # (rows - first,) mean over channels of the LiteRT output
    pred: np.ndarray  # (test rows,) bool; rows before ``first`` are predicted normal
    chosen: str  # the detector training chose


def load_labelled_file(path: Path, key: str | None = None) -> LabelledFile | None:
    """One SKAB CSV read by the product's reader, or None when it has no ``anomaly`` column."""
    table = read_sensor_csv(path, label_column=LABEL, ignore=(CHANGEPOINT,))
    if table.labels is None:
        return None
    times = table.times or [str(i) for i in range(len(table.values))]
    key = key or f"{path.parent.name}/{path.name}"
    return LabelledFile(key, table.columns, table.values, table.labels > 0, times)


def load_labelled(data_dir: Path, folders: list[str] | None = None) -> list[LabelledFile]:
    """Every CSV with an ``anomaly`` column in DATA_DIR's sub-folders (or those named), by folder and number."""
    files = []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        if folders is not None and folder.name not in folders:
            continue
        for path in sorted(folder.glob("*.csv"), key=lambda p: (len(p.stem), p.stem)):
            f = load_labelled_file(path, f"{folder.name}/{path.name}")
            if f is not None:
                files.append(f)
    return files


def load_anomaly_free_pieces(data_dir: Path, pieces: int) -> list[LabelledFile]:
    """``anomaly-free/anomaly-free.csv`` cut into ``pieces`` equal consecutive parts (the remainder dropped)."""
    table = read_sensor_csv(data_dir / ANOMALY_FREE / f"{ANOMALY_FREE}.csv", label_column=LABEL, ignore=(CHANGEPOINT,))
    size = len(table.values) // pieces
    times = table.times or [str(i) for i in range(len(table.values))]
    return [
        LabelledFile(
            f"{ANOMALY_FREE}/{i}",
            table.columns,
            table.values[i * size : (i + 1) * size],
            np.zeros(size, bool),
            times[i * size : (i + 1) * size],
        )
        for i in range(pieces)
    ]


def figures(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """The product's F1 / FAR / MAR, rounded as SKAB's tables are, and the number of rows."""
    scores = alarm_scores(truth, pred)
    if not truth.any():  # normal data only: the false-alarm rate is the figure
        return {"far": round(scores["far"], 4), "rows": len(truth)}
    return {**{k: round(scores[k], 4) for k in ("f1", "far", "mar")}, "rows": len(truth)}


def summarise(per_file: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, object]:
    """Pooled figures over all files and per folder, from per-file (labels, predictions) of the test rows."""
    folders: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for key, pair in per_file.items():
        folders.setdefault(key.split("/")[0], []).append(pair)

    def pooled(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        return figures(np.concatenate([t for t, _ in pairs]), np.concatenate([p for _, p in pairs]))

    labelled = [pair for key, pair in per_file.items() if not key.startswith(ANOMALY_FREE)]
    result: dict[str, object] = {"folders": {k: pooled(v) for k, v in sorted(folders.items())}}
    if labelled:
        result["pooled"] = pooled(labelled)  # the labelled files; the anomaly-free pieces stand apart
    pieces = {key: figures(*pair)["far"] for key, pair in per_file.items() if key.startswith(ANOMALY_FREE)}
    if pieces:
        result["anomaly_free_far_per_piece"] = pieces
    return result


def summarise_predictions(files: list[LabelledFile], predictions: dict[str, np.ndarray], train_rows: int) -> dict:
    return summarise({f.key: (f.labels[train_rows:], predictions[f.key]) for f in files})


# ----------------------------------------------------------------------------- offline: the product's training
def bundle_dir_name(key: str) -> str:
    return key.removesuffix(".csv").replace("/", "-")


def train_and_score(
    f: LabelledFile, out: Path, train_rows: int = 400, window: int | None = None, cfg: object | None = None
) -> tuple[FileRun, dict[str, float]]:
    """Train a bundle on ``f``'s first ``train_rows`` rows with ``plcsense train sensors`` code; score the rest."""
    from plcsense.training.sensors import SensorTrainConfig, train_anomaly_tables

    t0 = time.perf_counter()
    config = cfg or SensorTrainConfig()
    if window is not None:
        config = replace(config, window=window)  # type: ignore[type-var]
    table = SensorTable(f.columns, f.values[:train_rows], None)  # no labels: the protocol trains blind
    bundle = train_anomaly_tables([table], out, config, name=f"skab-{bundle_dir_name(f.key)}")  # type: ignore[arg-type]
    trained = time.perf_counter() - t0

    t0 = time.perf_counter()
    verdicts = judge_rows(bundle, SensorTable(f.columns, f.values, None), f.key, start=train_rows)
    pred = np.zeros(len(f.values) - train_rows, bool)  # test rows without a full window are predicted normal
    pred[verdicts.first - train_rows :] = verdicts.predicted
    scored = time.perf_counter() - t0
    threshold = float(bundle.manifest.threshold)  # type: ignore[arg-type]
    report = json.loads((bundle.path / "report" / "selection.json").read_text())
    chosen = report["selection"]["chosen"] if report["selection"] else report["detector"]["detector"]
    run = FileRun(
        f.key, bundle.path, train_rows, bundle.input_shape[0], threshold, verdicts.first, verdicts.scores, pred, chosen
    )
    return run, {"train_s": trained, "score_s": scored}


def run_offline(
    files: list[LabelledFile],
    bundles: Path,
    train_rows: int = 400,
    window: int | None = None,
    cfg: object | None = None,
) -> tuple[dict[str, object], dict[str, FileRun]]:
    runs: dict[str, FileRun] = {}
    timings = {"train_s": 0.0, "score_s": 0.0}
    for f in files:
        run, t = train_and_score(f, bundles / bundle_dir_name(f.key), train_rows, window, cfg)
        runs[f.key] = run
        for k, v in t.items():
            timings[k] += v
    chosen: dict[str, int] = {}
    for run in runs.values():
        chosen[run.chosen] = chosen.get(run.chosen, 0) + 1
    report = {
        **summarise_predictions(files, {k: r.pred for k, r in runs.items()}, train_rows),
        "chosen_detectors": dict(sorted(chosen.items(), key=lambda kv: -kv[1])),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    return report, runs


# ----------------------------------------------------------------------------- tuning on one fold
def tuning_grid():
    """The settings a developer tunes: the AR shape, the persistence limit, the threshold's risk."""
    from plcsense.training.detectors import ARSettings
    from plcsense.training.sensors import SHAPES

    for (order, mean, smooth), unit_root, risk in itertools.product(SHAPES, (0.5, 0.9), (1e-4, 1e-5, 1e-6)):
        yield ARSettings(ar_order=order, mean_window=mean, smooth=smooth, unit_root=unit_root, risk=risk)


def grid_figures(settings, files: list[LabelledFile], train_rows: int) -> dict[str, object]:
    """One fixed AR setting (no selection) on every file, scored in numpy by the product's calibration."""
    from plcsense.training.detectors import calibrate

    predictions = {}
    for f in files:
        c = calibrate(f.values[:train_rows], settings)
        scores = c.detector.channel_scores(f.values[train_rows - settings.window + 1 :]).mean(axis=1)
        predictions[f.key] = scores > c.threshold
    return summarise_predictions(files, predictions, train_rows)


def tuning_rank(result: dict) -> tuple[int, float]:
    """(feasible, objective): feasible settings first, then the higher F1 (see the module docstring)."""
    valves = result["pooled"]
    pieces = result["folders"].get(ANOMALY_FREE, {"far": 0.0})
    excess = max(0.0, valves["far"] - MAX_FAR) + max(0.0, pieces["far"] - MAX_FAR_NORMAL)
    return (int(excess == 0), valves["f1"] - excess)


def tune(files: list[LabelledFile], train_rows: int) -> tuple[object, list[dict]]:
    """The grid's best setting on ``files`` (labels used) and every grid point's figures, best first."""
    rows = []
    for settings in tuning_grid():
        result = grid_figures(settings, files, train_rows)
        rows.append({"settings": settings, "rank": tuning_rank(result), **result})
    rows.sort(key=lambda r: r["rank"], reverse=True)
    return rows[0]["settings"], rows


def pieces_by_index(spec: str | None, count: int) -> set[int]:
    """``0-3,6`` -> {0, 1, 2, 3, 6}."""
    chosen: set[int] = set()
    for part in (spec or "").split(","):
        if part:
            lo, _, hi = part.partition("-")
            chosen.update(range(int(lo), int(hi or lo) + 1))
    if not chosen <= set(range(count)):
        raise ValueError(f"--tune-pieces {spec}: pieces are numbered 0 to {count - 1}")
    return chosen


# ----------------------------------------------------------------------------- via MQTT: the real worker
class MqttReplayError(RuntimeError):
    """The replay through the worker did not complete; the message says where it stopped and why."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Results:
    """Collects results and errors per input topic from ``<topic>/result`` and ``<topic>/error``."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, dict]] = {}
        self.errors: dict[str, list[dict]] = {}
        self.duplicates = 0
        self._cond = threading.Condition()

    def on_message(self, client: object, userdata: object, msg: object) -> None:
        topic, payload = msg.topic, msg.payload  # type: ignore[attr-defined]
        try:
            doc = json.loads(payload)
        except ValueError:
            doc = {"error": "unparseable", "detail": repr(payload[:200])}
        with self._cond:
            if topic.endswith("/result"):
                got = self.results.setdefault(topic.removesuffix("/result"), {})
                if str(doc.get("id")) in got:
                    self.duplicates += 1  # at-least-once delivery: a repeat must say the same
                    if got[str(doc.get("id"))].get("is_anomaly") != doc.get("is_anomaly"):
                        self.errors.setdefault(topic.removesuffix("/result"), []).append(
                            {"error": "inconsistent_repeat", "detail": f"id {doc.get('id')} answered differently"}
                        )
                got[str(doc.get("id"))] = doc
            else:
                self.errors.setdefault(topic.removesuffix("/error"), []).append(doc)
            self._cond.notify_all()

    def wait(
        self, topic: str, count: int, timeout: float, alive: Callable[[], bool]
    ) -> tuple[dict[str, dict], list[dict]]:
        """Wait for ``count`` distinct results on ``topic``, the first error, ``alive()`` False, or the timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                results, errors = self.results.get(topic, {}), self.errors.get(topic, [])
                if len(results) >= count or errors or not alive() or time.monotonic() >= deadline:
                    return dict(results), list(errors)
                self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))


def _connect(url: str, what: str, timeout: float = 10.0):
    """A connected paho client (network loop running) for ``url``, or a clear error."""
    from plcsense.mqtt_url import client_for, host_port

    client = client_for(url)
    connected = threading.Event()
    client.on_connect = lambda c, u, flags, reason, props: reason.is_failure or connected.set()
    try:
        client.connect(*host_port(url))
    except OSError as exc:
        raise MqttReplayError(f"{what}: cannot connect to {url}: {exc}") from None
    client.loop_start()
    if not connected.wait(timeout):
        client.loop_stop()
        raise MqttReplayError(f"{what}: no CONNACK from {url} within {timeout:.0f} s")
    return client


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else "<no log>"
    return "\n".join(text.splitlines()[-lines:])


class WorkerProcess:
    """``plcsense serve`` as a subprocess with a one-route config; always ``stop()`` it."""

    def __init__(self, workdir: Path, url: str, client_id: str, route: dict) -> None:
        self.port = _free_port()
        self.log_path = workdir / f"{client_id}.log"
        self.config = workdir / f"{client_id}.json"
        mqtt_settings = {"url": url, "client_id": client_id, "session_expiry_s": 0}  # nothing left behind
        self.config.write_text(
            json.dumps({"mqtt": mqtt_settings, "metrics": {"host": "127.0.0.1", "port": self.port}, "routes": [route]})
        )
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "plcsense", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("PLCSENSE_")},  # the config rules
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MqttReplayError(
                    f"worker exited with code {self.proc.returncode} before it was ready; "
                    f"{self.log_path}:\n{_tail(self.log_path)}"
                )
            with contextlib.suppress(OSError):
                if _get(f"http://127.0.0.1:{self.port}/readyz") == 200:
                    return
            time.sleep(0.1)
        raise MqttReplayError(
            f"worker not ready (/readyz on port {self.port}) within {timeout:.0f} s; "
            f"{self.log_path}:\n{_tail(self.log_path)}"
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the worker answers what is in flight and exits 0); SIGKILL if it hangs. Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.returncode = self.proc.returncode
        return self.returncode


def replay_file(
    f: LabelledFile,
    run: FileRun,
    url: str,
    results: _Results,
    workdir: Path,
    topic: str,
    client_id: str,
    timeout: float = 120.0,
) -> tuple[np.ndarray, list[float], dict[str, float]]:
    """Replay ``f`` through a fresh worker; return its predictions per test row, latencies (ms) and timings."""
    route = {"name": "skab", "topic": topic, "model": str(run.bundle), "encoding": "json", "max_batch": 64}
    worker = WorkerProcess(workdir, url, client_id, route)
    publisher = None
    try:
        t0 = time.perf_counter()
        worker.start()
        ready_s = time.perf_counter() - t0
        publisher = _connect(url, f"{f.key}: publisher")
        start = run.first - run.window + 1  # the first window ends at row ``first``
        expected = len(f.values) - run.first
        t0 = time.perf_counter()
        infos = [
            publisher.publish(topic, json.dumps({"data": f.values[i].tolist(), "id": str(i)}), qos=1)
            for i in range(start, len(f.values))
        ]
        for info in infos:
            info.wait_for_publish(max(1.0, timeout - (time.perf_counter() - t0)))
            if not info.is_published():
                raise MqttReplayError(f"{f.key}: the broker did not acknowledge message {info.mid} in time")
        published_s = time.perf_counter() - t0
        got, errors = results.wait(topic, expected, max(1.0, timeout - published_s), lambda: worker.alive)
        answered_s = time.perf_counter() - t0
        if errors:
            raise MqttReplayError(f"{f.key}: the worker answered with errors on {topic}/error: {errors[:3]}")
        if len(got) < expected:
            why = "the worker exited" if not worker.alive else f"no more answers within {timeout:.0f} s"
            raise MqttReplayError(
                f"{f.key}: {len(got)} of {expected} results on {topic}/result ({why}); "
                f"{worker.log_path}:\n{_tail(worker.log_path)}"
            )
    finally:
        if publisher is not None:
            publisher.disconnect()
            publisher.loop_stop()
        code = worker.stop()
    if code != 0:
        raise MqttReplayError(f"{f.key}: worker exited with code {code} after SIGTERM; see {worker.log_path}")

    pred = np.zeros(len(run.pred), bool)
    ids = {str(i) for i in range(run.first, len(f.values))}
    stray = sorted(set(got) - ids, key=int)
    if stray:
        raise MqttReplayError(f"{f.key}: results for readings whose window was not yet full: ids {stray[:5]}")
    for i in range(run.first, len(f.values)):
        pred[i - run.train_rows] = bool(got[str(i)]["is_anomaly"])
    latencies = [float(got[i]["latency_ms"]) for i in sorted(ids, key=int)]
    timings = {"ready_s": ready_s, "publish_s": published_s, "answer_s": answered_s, "results": float(expected)}
    return pred, latencies, timings


def start_private_broker(workdir: Path) -> tuple[str, Broker | None]:
    """A private Mosquitto on a free port (or the one at ``PLCSENSE_MQTT_URL``), as the demo does."""
    from plcsense.demo import demo_broker

    try:
        return demo_broker(workdir)
    except SystemExit as exc:
        raise MqttReplayError(str(exc)) from None


def run_via_mqtt(
    files: list[LabelledFile], runs: dict[str, FileRun], url: str, workdir: Path, timeout: float = 120.0
) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """Replay every file through its own worker; predictions per file and a report with parity and latency."""
    results = _Results()
    listener = _connect(url, "result listener")
    listener.on_message = results.on_message
    subscribed = threading.Event()
    listener.on_subscribe = lambda *a: subscribed.set()
    listener.subscribe([("skab/+/in/result", 1), ("skab/+/in/error", 1)])
    if not subscribed.wait(10):
        listener.disconnect()
        listener.loop_stop()
        raise MqttReplayError(f"result listener: subscription not acknowledged by {url}")
    predictions: dict[str, np.ndarray] = {}
    latencies: list[float] = []
    totals = {"ready_s": 0.0, "publish_s": 0.0, "answer_s": 0.0, "results": 0.0}
    tag = f"{os.getpid()}-{int(time.time())}"
    try:
        for n, f in enumerate(files):
            pred, lat, t = replay_file(
                f, runs[f.key], url, results, workdir, f"skab/{n}/in", f"skab-bench-{tag}-{n}", timeout
            )
            predictions[f.key] = pred
            latencies += lat
            for k, v in t.items():
                totals[k] += v
    finally:
        listener.disconnect()
        listener.loop_stop()

    agree = total = 0
    mismatches = []
    for f in files:
        run = runs[f.key]
        scored = slice(run.first - run.train_rows, None)
        same = predictions[f.key][scored] == run.pred[scored]
        agree += int(same.sum())
        total += len(same)
        mismatches += [f"{f.key}:{run.first + int(i)}" for i in np.flatnonzero(~same)[:5]]
    lat = np.asarray(latencies)
    report = {
        "url": url,
        "parity": round(agree / total, 6) if total else None,
        "scored_rows": total,
        "mismatches": mismatches[:20],
        "repeated_results": results.duplicates,
        **summarise_predictions(files, predictions, runs[files[0].key].train_rows),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 3),
            "p95": round(float(np.percentile(lat, 95)), 3),
            "max": round(float(lat.max()), 3),
            "mean": round(float(lat.mean()), 3),
        },
        "throughput_per_s": round(totals["results"] / totals["answer_s"], 1) if totals["answer_s"] else None,
        "timings": {k: round(v, 2) for k, v in totals.items() if k != "results"},
    }
    return report, predictions


# ----------------------------------------------------------------------------- published baselines
def score_baselines(data_dir: Path, files: list[LabelledFile], train_rows: int = 400) -> dict[str, object]:
    """Recompute the published detectors' scores from ``baseline_predictions/*.csv`` on the labelled files here.

    Their rows are matched to the test parts by (file, datetime); ``data/`` in their file names is dropped.
    """
    truth = {}
    for f in files:
        truth[f.key] = {t: bool(y) for t, y in zip(f.times[train_rows:], f.labels[train_rows:], strict=True)}
    out = {}
    for path in sorted((data_dir / "baseline_predictions").glob("*.csv")):
        rows: dict[str, tuple[list[bool], list[bool]]] = {}
        unmatched = 0
        with path.open() as fh:
            for row in csv.DictReader(fh):
                key = row["file"].removeprefix("data/")
                label = truth.get(key, {}).get(row["datetime"])
                if label is None:
                    unmatched += 1
                    continue
                labels, preds = rows.setdefault(key, ([], []))
                labels.append(label)
                preds.append(float(row["pred_anomaly"]) > 0)
        per_file = {key: (np.array(labels), np.array(preds)) for key, (labels, preds) in rows.items()}
        summary = summarise(per_file)
        summary["files"] = len(per_file)
        summary["rows_not_matched"] = unmatched
        out[path.stem] = summary
    return out


def settings_dict(settings: object) -> dict:
    return {k: v for k, v in asdict(settings).items() if k not in ("ridge", "drift_lag")}  # type: ignore[call-overload]


def cross_protocol(args: argparse.Namespace, bundles: Path) -> dict[str, object]:
    """Tune on ``--tune-on`` (+ ``--tune-pieces``), then report the product with those settings on both sides."""
    from plcsense.training.detectors import ARSettings
    from plcsense.training.sensors import SensorTrainConfig, ar_candidates

    tune_files = load_labelled(args.data_dir, [args.tune_on])
    report_files = load_labelled(args.data_dir, [args.report_on])
    pieces = load_anomaly_free_pieces(args.data_dir, args.anomaly_free_pieces) if args.anomaly_free_pieces else []
    tune_idx = pieces_by_index(args.tune_pieces, len(pieces))
    tune_pieces = [p for i, p in enumerate(pieces) if i in tune_idx]
    held_pieces = [p for i, p in enumerate(pieces) if i not in tune_idx]
    if not tune_files or not report_files:
        raise ValueError(f"no labelled files in {args.tune_on!r} or {args.report_on!r} under {args.data_dir}")

    t0 = time.perf_counter()
    best, grid = tune(tune_files + tune_pieces, args.train_rows)
    tuned_s = time.perf_counter() - t0
    cfg = SensorTrainConfig(candidates=ar_candidates(best))
    dev, _ = run_offline(tune_files + tune_pieces, bundles / "dev", args.train_rows, args.window, cfg)
    held, _ = run_offline(report_files + held_pieces, bundles / "held_back", args.train_rows, args.window, cfg)

    def row(r: dict) -> dict:
        return {
            "settings": settings_dict(r["settings"]),
            "valves": r["pooled"],
            **({"pieces_far": r["folders"][ANOMALY_FREE]["far"]} if ANOMALY_FREE in r["folders"] else {}),
        }

    return {
        "tuned_on": {"folder": args.tune_on, "anomaly_free_pieces": sorted(tune_idx)},
        "reported_on": {"folder": args.report_on, "anomaly_free_pieces": sorted(set(range(len(pieces))) - tune_idx)},
        "chosen_settings": settings_dict(best),
        "chosen_is_the_default": best == ARSettings(),
        "grid": {"points": len(grid), "seconds": round(tuned_s, 1), "top": [row(r) for r in grid[:5]]},
        "dev": dev,
        "held_back": held,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--out", type=Path, help="write file,datetime,pred_anomaly for every test row here")
    parser.add_argument("--window", type=int, help="readings per window (default: the detector's own)")
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--bundles", type=Path, help="keep the per-file bundles here (default: a temporary folder)")
    parser.add_argument("--anomaly-free-pieces", type=int, default=0, help="also judge anomaly-free.csv cut in N")
    parser.add_argument("--tune-on", help="choose the settings on this folder's labels (e.g. valve1) ...")
    parser.add_argument("--report-on", help="... and report them on this one (e.g. valve2)")
    parser.add_argument("--tune-pieces", help="anomaly-free pieces used for tuning, e.g. 0-3 (the rest are reported)")
    parser.add_argument("--via-mqtt", action="store_true", help="also replay every file through the real worker")
    parser.add_argument("--url", help="MQTT broker for --via-mqtt (default: a private Mosquitto on a free port)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per file for --via-mqtt")
    parser.add_argument("--baselines", action="store_true", help="only recompute baseline_predictions/ scores")
    args = parser.parse_args()
    if bool(args.tune_on) != bool(args.report_on):
        parser.error("--tune-on and --report-on go together")
    if args.tune_on and (args.via_mqtt or args.out):
        parser.error("--via-mqtt and --out judge the default configuration; run them without --tune-on")

    started = time.perf_counter()
    files = load_labelled(args.data_dir)
    if not files:
        parser.error(f"no CSV files with {LABEL!r} and {CHANGEPOINT!r} columns in the sub-folders of {args.data_dir}")
    if args.baselines:
        print(json.dumps(score_baselines(args.data_dir, files, args.train_rows), indent=1))
        return
    import_tensorflow_quietly()
    with tempfile.TemporaryDirectory(prefix="skab-") as tmp:
        bundles = args.bundles or Path(tmp) / "bundles"
        if args.tune_on:
            try:
                result: dict[str, object] = cross_protocol(args, bundles)
            except ValueError as exc:  # DataError: e.g. a window the training part cannot fill
                parser.error(str(exc))
            result["seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps(result, indent=1))
            return
        pieces = load_anomaly_free_pieces(args.data_dir, args.anomaly_free_pieces) if args.anomaly_free_pieces else []
        try:
            offline, runs = run_offline(files + pieces, bundles, args.train_rows, args.window)
        except ValueError as exc:  # DataError: e.g. a window the training part cannot fill
            parser.error(str(exc))
        result = {
            "files": len(files),
            "anomaly_free_pieces": len(pieces),
            "configuration": "plcsense train sensors defaults (SensorTrainConfig())",
            "predictions_from": "plcsense train sensors bundle, LiteRT",
            "offline": offline,
        }
        if args.out:
            with args.out.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["file", "datetime", "pred_anomaly"])
                for f in files:
                    for t, p in zip(f.times[args.train_rows :], runs[f.key].pred, strict=True):
                        writer.writerow([f.key, t, int(p)])
        if args.via_mqtt:
            broker = None
            try:
                url = args.url
                if url is None:
                    (Path(tmp) / "broker").mkdir()
                    url, broker = start_private_broker(Path(tmp) / "broker")
                (Path(tmp) / "workers").mkdir()
                result["via_mqtt"], _ = run_via_mqtt(files, runs, url, Path(tmp) / "workers", args.timeout)
            except MqttReplayError as exc:
                print(f"skab: --via-mqtt failed: {exc}", file=sys.stderr)
                sys.exit(1)
            finally:
                if broker is not None:
                    broker.stop()
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))
    if args.via_mqtt and result["via_mqtt"]["parity"] != 1.0:  # type: ignore[index]
        sys.exit(1)


if __name__ == "__main__":
    main()
