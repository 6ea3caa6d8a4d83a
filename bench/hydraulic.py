"""Sensor-tensor classification on the ZeMA hydraulic test rig (UCI 447), printed as JSON.

    .venv/bin/python bench/hydraulic.py [--target cooler|valve|accumulator|pump] [--workdir DIR] [--quantize int8]

Each 60 s load cycle becomes one CSV (header ``TS1,TS2,TS3,TS4``, 60 rows at 1 Hz) under
``train/<class>/`` or ``test/<class>/`` from a seeded (42) stratified 80/20 split of the 2205 cycles; the
model is trained with ``train_sensor_classifier`` (its default settings) on ``train/`` and scored with the
exported LiteRT model on ``test/`` by ``evaluate_sensor_folder``. Reads ``../shared/data/hydraulic`` (or
``--data``); skips with a message when it is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hydraulic"
SENSORS = ("TS1", "TS2", "TS3", "TS4")
MARKER = ".plcsense-bench-hydraulic"

# profile.txt columns and the meaning of each condition value (from the data set's README)
TARGETS: dict[str, tuple[int, dict[int, str]]] = {
    "cooler": (0, {3: "near_failure", 20: "reduced", 100: "full"}),
    "valve": (1, {100: "optimal", 90: "small_lag", 80: "severe_lag", 73: "near_failure"}),
    "pump": (2, {0: "no_leakage", 1: "weak_leakage", 2: "severe_leakage"}),
    "accumulator": (3, {130: "optimal", 115: "slightly_reduced", 100: "severely_reduced", 90: "near_failure"}),
}


def load_cycles(data: Path, target: str) -> tuple[np.ndarray, np.ndarray]:
    """(2205, 60, 4) temperatures and the condition value of ``target`` per cycle."""
    sensors = np.stack([np.loadtxt(data / f"{s}.txt", delimiter="\t") for s in SENSORS], axis=-1)
    profile = np.loadtxt(data / "profile.txt", delimiter="\t")
    column, _ = TARGETS[target]
    return sensors, profile[:, column].astype(int)


def prepare_workdir(workdir: Path) -> None:
    """Refuse a non-empty folder this bench did not create; clear the parts it wrote before."""
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise SystemExit(f"{workdir} is not empty and was not made by this bench; choose another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).touch()
    for part in ("train", "test"):
        shutil.rmtree(workdir / part, ignore_errors=True)


def write_split(workdir: Path, sensors: np.ndarray, values: np.ndarray, names: dict[int, str]) -> dict[str, int]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(values))
    train, test = train_test_split(index, test_size=0.2, random_state=42, stratify=values)
    header = ",".join(SENSORS)
    for part, cycles in (("train", train), ("test", test)):
        for cycle in sorted(cycles):
            folder = workdir / part / names[int(values[cycle])]
            folder.mkdir(parents=True, exist_ok=True)
            np.savetxt(
                folder / f"cycle{cycle:04d}.csv", sensors[cycle], fmt="%.6g", delimiter=",", header=header, comments=""
            )
    return {"train": len(train), "test": len(test)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=list(TARGETS), default="cooler")
    parser.add_argument("--workdir", type=Path, help="keep the CSVs and the bundle here (default: a temp folder)")
    parser.add_argument("--data", type=Path, default=SHARED, help="folder with TS1-TS4.txt and profile.txt")
    parser.add_argument("--epochs", type=int, help="override the training default")
    parser.add_argument("--quantize", choices=["none", "float16", "int8"], default="none")
    parser.add_argument(
        "--quiet", action="store_true", help="no per-epoch lines and no log (stdout is JSON either way)"
    )
    args = parser.parse_args()

    if not all((args.data / f"{name}.txt").is_file() for name in (*SENSORS, "profile")):
        print(json.dumps({"skipped": f"hydraulic data not found under {args.data}"}))
        return 0
    from plcsense.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from plcsense.training.evaluate import evaluate_sensor_folder
    from plcsense.training.sensor_classify import SensorClassifyConfig, train_sensor_classifier

    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="hydraulic-")) if temporary else args.workdir.resolve()
    prepare_workdir(workdir)
    try:
        started = time.perf_counter()
        sensors, values = load_cycles(args.data, args.target)
        names = TARGETS[args.target][1]
        sizes = write_split(workdir, sensors, values, names)
        prepare_s = time.perf_counter() - started

        cfg = SensorClassifyConfig(name=f"hydraulic-{args.target}", quantize=args.quantize)
        if args.epochs:
            cfg.epochs = args.epochs
        if args.quiet:
            logging.getLogger("plcsense.training").setLevel(logging.WARNING)
        started = time.perf_counter()
        # Keras prints epochs to stdout: send them to stderr (or nowhere) so stdout is the JSON result alone
        with contextlib.redirect_stdout(io.StringIO() if args.quiet else sys.stderr):
            bundle = train_sensor_classifier(workdir / "train", workdir / f"bundle-{args.target}", cfg)
        train_s = time.perf_counter() - started

        started = time.perf_counter()
        scores = evaluate_sensor_folder(bundle, workdir / "test")
        evaluate_s = time.perf_counter() - started

        one = np.zeros((1, *bundle.input_shape), np.float32)
        bundle.model.predict(one)
        started = time.perf_counter()
        for _ in range(200):
            bundle.model.predict(one)
        latency_ms = (time.perf_counter() - started) / 200 * 1000
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "target": args.target,
        "classes": {names[v]: int(n) for v, n in zip(*np.unique(values, return_counts=True), strict=True)},
        "cycles": sizes,
        "test_accuracy": scores["accuracy"],
        "test_loss": scores["loss"],
        "recall": scores["recall"],
        "precision": scores["precision"],
        "labels": scores["labels"],
        "confusion_matrix": scores["confusion_matrix"],
        "quantization": bundle.manifest.quantization,
        "manifest_metrics": bundle.manifest.metrics,
        "manifest_variants": bundle.manifest.variants,
        "timings_s": {
            "prepare": round(prepare_s, 2),
            "train_and_export": round(train_s, 2),
            "evaluate": round(evaluate_s, 2),
        },
        "litert_latency_ms_batch1": round(latency_ms, 4),
        "epochs_max": cfg.epochs,
        "cpu_count": os.cpu_count(),
        "workdir": None if temporary else str(workdir),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
