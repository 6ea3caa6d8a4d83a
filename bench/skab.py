"""SKAB benchmark, official protocol, for plcsense's sensor anomaly detector; F1 / FAR / MAR as JSON.

    .venv/bin/python bench/skab.py ../shared/data/skab --anomaly-free-pieces 8 [--out PRED.csv] [--window N]
    .venv/bin/python bench/skab.py ../shared/data/skab --tune-on valve1 --report-on valve2 \
        --anomaly-free-pieces 8 --tune-pieces 0-3
    .venv/bin/python bench/skab.py ../shared/data/skab --via-mqtt [--url mqtt://host:1883]
    .venv/bin/python bench/skab.py ../shared/data/skab --baselines      # the published detectors, recomputed
    .venv/bin/python bench/skab.py ../shared/data/skab --shifts         # sustained shifts of faults and pieces
    .venv/bin/python bench/skab.py ../shared/data/skab --separability   # pieces a supervised classifier calls faults

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
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from plcsense.harness import (
    Answer,
    Broker,
    MqttConnectError,
    MqttSubscribeError,
    ResultCollector,
    WorkerError,
    WorkerProcess,
    close,
    connect,
    start_broker,
    write_worker_config,
)
from plcsense.mqtt_url import redacted
from plcsense.quiet import import_tensorflow_quietly
from plcsense.training.anomaly_eval import alarm_scores, judge_rows
from plcsense.training.data import SensorTable, read_sensor_csv

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


def _log_tail(worker: WorkerProcess, lines: int = 30) -> str:
    return f"{worker.log_path}:\n" + "\n".join(worker.log().splitlines()[-lines:])


def _stop(worker: WorkerProcess, timeout: float = 30.0) -> int | None:
    """SIGTERM (the worker answers what is in flight and exits 0), SIGKILL if it hangs; its exit code."""
    if worker.proc is None:
        return None
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.terminate(timeout)
    worker.stop()
    return worker.proc.returncode


def _disagreeing_repeats(out: ResultCollector) -> list[str]:
    """Results that say otherwise than the first answer to their id (at-least-once: a repeat must say the same)."""
    bad = []
    for msg in out.messages_on("/result"):
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            doc = None
        first = out.by_id.get(str(doc.get("id"))) if isinstance(doc, dict) else None
        if first is None:
            bad.append(f"not a result: {msg.payload[:80]!r}")
        elif (said := doc.get("is_anomaly")) != first.doc.get("is_anomaly"):
            bad.append(f"id {first.doc['id']} answered {first.doc.get('is_anomaly')}, then {said}")
    return bad


def replay_file(
    f: LabelledFile, run: FileRun, url: str, workdir: Path, topic: str, client_id: str, timeout: float = 120.0
) -> tuple[np.ndarray, list[float], dict[str, float], int]:
    """Replay ``f`` through a fresh worker; its predictions per test row, latencies (ms), timings and repeats."""
    route = {"name": "skab", "topic": topic, "model": str(run.bundle), "encoding": "json", "max_batch": 64}
    settings = {"url": url, "client_id": client_id, "session_expiry_s": 0}  # nothing left behind on the broker
    config, port = write_worker_config(workdir / f"{client_id}.json", settings, [route])
    worker = WorkerProcess(config, port, workdir / f"{client_id}.log")
    failed = threading.Event()

    def on_answer(answer: Answer) -> None:
        if answer.is_error:
            failed.set()

    def exited() -> bool:
        return worker.proc is not None and worker.proc.poll() is not None

    listener = publisher = None
    try:
        listener = connect(url)
        out = ResultCollector(listener, [f"{topic}/result", f"{topic}/error"], on_answer=on_answer)
        t0 = time.perf_counter()
        worker.start(timeout=READY_TIMEOUT_S)
        ready_s = time.perf_counter() - t0
        publisher = connect(url)
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
        deadline = time.monotonic() + max(1.0, timeout - published_s)
        while not out.wait_for(expected, 0.5):  # every answer, or the first error, the worker's exit, the timeout
            if failed.is_set() or exited() or time.monotonic() >= deadline:
                break
        answered_s = time.perf_counter() - t0
        if out.errors:
            raise MqttReplayError(f"{f.key}: the worker answered with errors on {topic}/error: {out.errors[:3]}")
        got = {key: answer.doc for key, answer in out.by_id.items()}
        if len(got) < expected:
            why = "the worker exited" if exited() else f"no more answers within {timeout:.0f} s"
            raise MqttReplayError(
                f"{f.key}: {len(got)} of {expected} results on {topic}/result ({why}); {_log_tail(worker)}"
            )
    except (MqttConnectError, MqttSubscribeError, WorkerError) as exc:
        raise MqttReplayError(f"{f.key}: {exc}") from None
    finally:
        if publisher is not None:
            close(publisher)
        code = _stop(worker)
        if listener is not None:
            close(listener)  # after the worker: a repeat sent while it drained is still counted and checked
    if code != 0:
        raise MqttReplayError(f"{f.key}: worker exited with code {code} after SIGTERM; {_log_tail(worker)}")
    disagree = _disagreeing_repeats(out)
    if disagree:
        raise MqttReplayError(f"{f.key}: repeated results on {topic}/result disagree: {disagree[:5]}")

    pred = np.zeros(len(run.pred), bool)
    ids = {str(i) for i in range(run.first, len(f.values))}
    stray = sorted(set(got) - ids, key=int)
    if stray:
        raise MqttReplayError(f"{f.key}: results for readings whose window was not yet full: ids {stray[:5]}")
    for i in range(run.first, len(f.values)):
        pred[i - run.train_rows] = bool(got[str(i)]["is_anomaly"])
    latencies = [float(got[i]["latency_ms"]) for i in sorted(ids, key=int)]
    timings = {"ready_s": ready_s, "publish_s": published_s, "answer_s": answered_s, "results": float(expected)}
    return pred, latencies, timings, out.duplicates


def run_via_mqtt(
    files: list[LabelledFile], runs: dict[str, FileRun], url: str, workdir: Path, timeout: float = 120.0
) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """Replay every file through its own worker; predictions per file and a report with parity and latency."""
    predictions: dict[str, np.ndarray] = {}
    latencies: list[float] = []
    repeated = 0
    totals = {"ready_s": 0.0, "publish_s": 0.0, "answer_s": 0.0, "results": 0.0}
    tag = f"{os.getpid()}-{int(time.time())}"
    # The garbage collector off while replaying (as in echo_compare.py): with TensorFlow loaded a full collection
    # takes ~0.3 s, and the collector's kept messages set one off every other file, halving the publish rate.
    gc.collect()
    gc.disable()
    try:
        for n, f in enumerate(files):
            pred, lat, t, repeats = replay_file(
                f, runs[f.key], url, workdir, f"skab/{n}/in", f"skab-bench-{tag}-{n}", timeout
            )
            predictions[f.key] = pred
            latencies += lat
            repeated += repeats
            for k, v in t.items():
                totals[k] += v
    finally:
        gc.enable()

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
        "url": redacted(url),
        "parity": round(agree / total, 6) if total else None,
        "scored_rows": total,
        "mismatches": mismatches[:20],
        "repeated_results": repeated,
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


# ----------------------------------------------------------------------------- what the data holds
def standardised(f: LabelledFile, train_rows: int) -> np.ndarray:
    """Every row of ``f`` in its training part's standard deviations from the training part's mean."""
    train = f.values[:train_rows]
    return (f.values - train.mean(axis=0)) / np.where(train.std(axis=0) > 0, train.std(axis=0), 1.0)


def trailing_means(z: np.ndarray, span: int) -> np.ndarray:
    """(n, C) -> (n - span + 1, C): the mean of each run of ``span`` consecutive rows."""
    cumulative = np.concatenate([np.zeros((1, z.shape[1])), np.cumsum(z, axis=0)])
    return (cumulative[span:] - cumulative[:-span]) / span


def sustained_shifts(f: LabelledFile, train_rows: int = 400, span: int = 50) -> dict[str, float]:
    """Per channel, the ``span``-row mean of the test part farthest from the training part's mean, in the
    training part's standard deviations; a labelled file's rows are those labelled anomalous."""
    z = standardised(f, train_rows)[train_rows:]
    if f.labels.any():
        z = z[f.labels[train_rows:]]
    if len(z) < span:
        return {}
    means = trailing_means(z, span)
    extreme = means[np.abs(means).argmax(axis=0), np.arange(z.shape[1])]
    return {c: round(float(v), 1) for c, v in zip(f.columns, extreme, strict=True)}


def shift_table(files: list[LabelledFile], pieces: list[LabelledFile], train_rows: int) -> dict[str, object]:
    """Why an anomaly-free piece can look like a fault: the sustained shifts of the labelled faults beside the
    pieces' own (``--shifts``)."""
    faults = {f.key: sustained_shifts(f, train_rows) for f in files}
    return {
        "span_rows": 50,
        "labelled_faults": faults,
        "anomaly_free_pieces": {p.key: sustained_shifts(p, train_rows) for p in pieces},
    }


def fault_like_rows(f: LabelledFile, train_rows: int, span: int = 20) -> np.ndarray:
    """A supervised classifier's view of each test row: its readings and their trailing ``span``-row means, in
    the training part's standard deviations (the per-file standardisation the detector does too)."""
    z = standardised(f, train_rows)
    means = np.zeros_like(z)
    means[span - 1 :] = trailing_means(z, span)
    return np.hstack([z, means])[train_rows:]


def separability(files: list[LabelledFile], pieces: list[LabelledFile], train_rows: int) -> dict[str, object]:
    """How much of the anomaly-free recording looks like a fault (``--separability``): gradient-boosted trees
    trained *with the labels* of one folder's faults (or of all of them), then asked about the other folder and the
    anomaly-free pieces. A label-free detector that catches the faults cannot be expected to call fewer of those
    rows faults than a classifier that was shown what the faults look like."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    folders = sorted({f.key.split("/")[0] for f in files})
    plans = [(f"{a} -> {b}", [a], [b]) for a in folders for b in folders if a != b]
    plans.append(("all folders, in sample", folders, folders))
    out: dict[str, object] = {"features": "readings and their 20-row trailing means, in training-part sd"}
    for name, train_on, report_on in plans:
        fit = [f for f in files if f.key.split("/")[0] in train_on]
        x = np.concatenate([fault_like_rows(f, train_rows) for f in fit])
        y = np.concatenate([f.labels[train_rows:] for f in fit])
        trees = HistGradientBoostingClassifier(random_state=0).fit(x, y)
        judged = [f for f in files if f.key.split("/")[0] in report_on] + pieces
        out[name] = summarise(
            {f.key: (f.labels[train_rows:], trees.predict(fault_like_rows(f, train_rows))) for f in judged}
        )
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
    parser.add_argument(
        "--shifts", action="store_true", help="only print each file's largest sustained shift per channel (in sd)"
    )
    parser.add_argument(
        "--separability",
        action="store_true",
        help="only print how many anomaly-free rows a classifier trained on the fault labels calls faults",
    )
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
    if args.shifts:
        pieces = load_anomaly_free_pieces(args.data_dir, args.anomaly_free_pieces or 8)
        print(json.dumps(shift_table(files, pieces, args.train_rows), indent=1))
        return
    if args.separability:
        pieces = load_anomaly_free_pieces(args.data_dir, args.anomaly_free_pieces or 8)
        print(json.dumps(separability(files, pieces, args.train_rows), indent=1))
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
            broker: Broker | None = None
            try:
                url = args.url or os.environ.get("PLCSENSE_MQTT_URL")
                if url is None:
                    try:
                        broker = start_broker(Path(tmp) / "broker", verbose_log=False)
                    except RuntimeError as exc:  # no Mosquitto here, or it did not start
                        raise MqttReplayError(f"{exc} (or give --url mqtt://host:1883)") from None
                    url = broker.url
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
