"""SKAB benchmark, official protocol, for plcsense's sensor anomaly detector; pooled F1 / FAR / MAR as JSON.

    .venv/bin/python bench/skab.py ../shared/data/skab --out skab_pred.csv [--window N] [--keras-only]
    .venv/bin/python bench/skab.py ../shared/data/skab --baselines      # the published detectors, recomputed

Protocol (Katser & Kozitsin, SKAB): every CSV file on its own; its first 400 rows are the training part (normal
operation) and the rest the test part; the detector is fitted and its threshold set on the training part only,
without labels. A row's prediction is the score of the window ending at that row (rows without a full window
are predicted normal). Scores are pooled over the test rows of all files:
F1 = TP / (TP + (FP + FN) / 2), FAR = FP / (FP + TN), MAR = FN / (FN + TP).

DATA_DIR holds sub-folders of CSV files with ``anomaly`` and ``changepoint`` columns (valve1/, valve2/, other/);
folders without them (anomaly-free/, baseline_predictions/) are skipped. Every test row is written to ``--out``
as ``file,datetime,pred_anomaly``. The detector is scored twice: through the Keras model and through the exported
LiteRT model (what the worker runs); the predictions written are the LiteRT ones unless ``--keras-only``.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from plcsense.training.data import read_sensor_csv, sniff_delimiter
from plcsense.training.detectors import DetectorSettings, build_detector, channel_errors

LABEL, CHANGEPOINT = "anomaly", "changepoint"


@dataclass
class LabelledFile:
    key: str  # "valve1/0.csv"
    values: np.ndarray  # (rows, C)
    labels: np.ndarray  # (rows,) bool
    times: list[str]  # the datetime column, or row numbers


def _header(path: Path) -> tuple[list[str], str]:
    with path.open(encoding="utf-8-sig") as f:
        sample = f.read(8192)
    delimiter = sniff_delimiter(sample)
    return [h.strip() for h in next(csv.reader(sample.splitlines(), delimiter=delimiter))], delimiter


def load_labelled(data_dir: Path) -> list[LabelledFile]:
    """Every CSV with ``anomaly`` and ``changepoint`` columns in DATA_DIR's sub-folders, sorted by folder, file."""
    files = []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.csv"), key=lambda p: (len(p.stem), p.stem)):
            header, delimiter = _header(path)
            if LABEL not in header or CHANGEPOINT not in header:
                continue
            table = read_sensor_csv(path, label_column=LABEL, ignore=(CHANGEPOINT,))
            with path.open(encoding="utf-8-sig") as f:
                rows = [r for r in csv.reader(f, delimiter=delimiter)][1:]
            rows = [r for r in rows if any(cell.strip() for cell in r)]
            time_col = header.index("datetime") if "datetime" in header else None
            times = [r[time_col] for r in rows] if time_col is not None else [str(i) for i in range(len(rows))]
            assert table.labels is not None and len(times) == len(table.values)
            files.append(LabelledFile(f"{folder.name}/{path.name}", table.values, table.labels > 0, times))
    return files


def counts(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return np.array([(truth & pred).sum(), (~truth & pred).sum(), (truth & ~pred).sum(), (~truth & ~pred).sum()])


def metrics(c: np.ndarray) -> dict[str, float]:
    tp, fp, fn, tn = (int(v) for v in c)
    return {
        "f1": round(tp / (tp + (fp + fn) / 2), 4) if tp + fp + fn else 0.0,
        "far": round(fp / (fp + tn), 4) if fp + tn else 0.0,
        "mar": round(fn / (fn + tp), 4) if fn + tp else 0.0,
        "rows": tp + fp + fn + tn,
    }


def summarise(per_file: dict[str, np.ndarray]) -> dict[str, object]:
    """Pooled metrics over all files and per folder, from per-file (TP, FP, FN, TN) counts."""
    folders: dict[str, np.ndarray] = {}
    for key, c in per_file.items():
        folder = key.split("/")[0]
        folders[folder] = folders.get(folder, np.zeros(4, int)) + c
    return {
        "pooled": metrics(sum(per_file.values(), np.zeros(4, int))),
        "folders": {k: metrics(v) for k, v in sorted(folders.items())},
    }


def run_detector(
    files: list[LabelledFile], settings: DetectorSettings, train_rows: int, litert: bool
) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """Fit per file, predict every test row with Keras and (optionally) LiteRT; return the report and predictions."""
    keras_counts, lite_counts, predictions = {}, {}, {}
    agree = total = 0
    timings = {"fit_s": 0.0, "keras_s": 0.0, "litert_convert_s": 0.0, "litert_s": 0.0}
    for f in files:
        t0 = time.perf_counter()
        model, threshold = build_detector(f.values[:train_rows], settings=settings)
        timings["fit_s"] += time.perf_counter() - t0
        window = model.input_shape[1]
        first = max(train_rows, window - 1)  # earlier test rows have no full window: predicted normal
        values = f.values.astype(np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(values[first - window + 1 :], window, axis=0)
        windows = np.ascontiguousarray(windows.transpose(0, 2, 1))
        truth = f.labels[train_rows:]

        t0 = time.perf_counter()
        keras_pred = np.zeros(len(truth), bool)
        keras_pred[first - train_rows :] = channel_errors(model, windows).mean(axis=1) > threshold
        timings["keras_s"] += time.perf_counter() - t0
        keras_counts[f.key] = counts(truth, keras_pred)
        pred = keras_pred
        if litert:
            from plcsense.models.runtime import LiteRTModel
            from plcsense.training.evaluate import predict_all
            from plcsense.training.export import to_tflite

            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.tflite"
                path.write_bytes(to_tflite(model))
                lite = LiteRTModel(path)
            timings["litert_convert_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            pred = np.zeros(len(truth), bool)
            pred[first - train_rows :] = predict_all(lite, windows).mean(axis=1) > threshold
            timings["litert_s"] += time.perf_counter() - t0
            lite_counts[f.key] = counts(truth, pred)
            agree += int((pred == keras_pred).sum())
            total += len(pred)
        predictions[f.key] = pred
    report: dict[str, object] = {"keras": summarise(keras_counts)}
    if litert:
        report["litert"] = summarise(lite_counts)
        report["litert_keras_agreement"] = round(agree / total, 6) if total else None
    report["timings"] = {k: round(v, 2) for k, v in timings.items()}
    return report, predictions


def score_baselines(data_dir: Path, files: list[LabelledFile], train_rows: int = 400) -> dict[str, object]:
    """Recompute the published detectors' scores from ``baseline_predictions/*.csv`` on the labelled files here.

    Their rows are matched to the test parts by (file, datetime); ``data/`` in their file names is dropped.
    """
    truth = {}
    for f in files:
        truth[f.key] = {t: bool(y) for t, y in zip(f.times[train_rows:], f.labels[train_rows:], strict=True)}
    out = {}
    for path in sorted((data_dir / "baseline_predictions").glob("*.csv")):
        per_file: dict[str, np.ndarray] = {}
        unmatched = 0
        with path.open() as fh:
            for row in csv.DictReader(fh):
                key = row["file"].removeprefix("data/")
                label = truth.get(key, {}).get(row["datetime"])
                if label is None:
                    unmatched += 1
                    continue
                pred = float(row["pred_anomaly"]) > 0
                per_file.setdefault(key, np.zeros(4, int))
                per_file[key] += counts(np.array([label]), np.array([pred]))
        summary = summarise(per_file)
        summary["files"] = len(per_file)
        summary["rows_not_matched"] = unmatched
        out[path.stem] = summary
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--out", type=Path, help="write file,datetime,pred_anomaly for every test row here")
    parser.add_argument("--window", type=int, help="readings per window (changes the smoothing length only)")
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--keras-only", action="store_true", help="skip the LiteRT export and scoring")
    parser.add_argument("--baselines", action="store_true", help="only recompute baseline_predictions/ scores")
    for field in fields(DetectorSettings):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    args = parser.parse_args()

    started = time.perf_counter()
    files = load_labelled(args.data_dir)
    if not files:
        parser.error(f"no CSV files with {LABEL!r} and {CHANGEPOINT!r} columns in the sub-folders of {args.data_dir}")
    if args.baselines:
        print(json.dumps(score_baselines(args.data_dir, files, args.train_rows), indent=1))
        return
    settings = DetectorSettings(**{f.name: getattr(args, f.name) for f in fields(DetectorSettings)})
    try:
        settings = settings.with_window(args.window)
    except ValueError as exc:
        parser.error(str(exc))
    report, predictions = run_detector(files, settings, args.train_rows, litert=not args.keras_only)
    if args.out:
        with args.out.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "datetime", "pred_anomaly"])
            for f in files:
                for t, p in zip(f.times[args.train_rows :], predictions[f.key], strict=True):
                    writer.writerow([f.key, t, int(p)])
    result = {
        "files": len(files),
        "window": settings.window,
        "settings": asdict(settings),
        "predictions_from": "keras" if args.keras_only else "litert",
        **report,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
