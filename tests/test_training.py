"""Training and evaluation through the CLI, on tiny data (real SKAB data when ../shared is present)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plcsense.models.bundle import load_bundle
from tests.conftest import SHARED_DATA, write_image_folder, write_sensor_csv


def plcsense(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as a user's shell runs it: TensorFlow imported by this test process sets TF_CPP_MIN_LOG_LEVEL in
    os.environ, which the CLI respects as the user's own choice, so it is not passed on."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, "-m", "plcsense", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


NOISE = (
    "absl::InitializeLog",  # TensorFlow's import, before TF_CPP_MIN_LOG_LEVEL applies
    "oneDNN custom operations",
    "cpu_feature_guard",
    "Assets written to",  # every export, through the tensorflow logger
    "fully_quantize",  # the int8 converter
    "Statistics for quantized inputs",
    "XNNPACK delegate",  # LiteRT's first interpreter
)


def assert_quiet(proc: subprocess.CompletedProcess) -> None:
    """No TensorFlow or LiteRT start-up notices, and no absl-formatted C++ log lines, in the CLI's output."""
    output = proc.stdout + proc.stderr
    assert [n for n in NOISE if n in output] == [], output[-3000:]
    assert not re.search(r"^[IWE]\d{4} \d\d:\d\d:\d\d", output, re.MULTILINE), output[-3000:]


def write_labelled_csv(path: Path, seed: int) -> Path:
    """300 rows of the tiny plant with a 0/1 ``anomaly`` column, and a level shift of the pressure where it is 1."""
    write_sensor_csv(path, rows=300, seed=seed, delimiter=",")
    lines = path.read_text().splitlines()
    labelled = [lines[0] + ",anomaly"]
    for i, line in enumerate(lines[1:]):
        fields = line.split(",")
        fault = 150 <= i < 200
        if fault:
            fields[3] = str(float(fields[3]) + 5)
        labelled.append(",".join(fields) + f",{int(fault)}")
    path.write_text("\n".join(labelled) + "\n")
    return path


def test_train_and_evaluate_sensors_cli(tmp_path):
    write_sensor_csv(tmp_path / "normal.csv", delimiter=";")
    out = tmp_path / "bundle"
    proc = plcsense(
        "train",
        "sensors",
        str(tmp_path / "normal.csv"),
        "--task",
        "anomaly",
        "--window",
        "24",
        "--detector",
        "autoencoder",
        "--epochs",
        "3",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert_quiet(proc)
    manifest = load_bundle(out).manifest
    assert manifest.input.channels == ["vibration", "current", "pressure"]  # timestamp column left out
    assert manifest.input.window == 24

    # labelled data with an injected fault: evaluate reports F1, FAR and MAR from the LiteRT model
    labelled = write_labelled_csv(tmp_path / "labelled.csv", seed=3)
    proc = plcsense("evaluate", str(out), str(labelled), "--json", "--out", str(tmp_path / "rows.csv"))
    assert proc.returncode == 0, proc.stderr
    assert_quiet(proc)
    scores = json.loads(proc.stdout)
    assert scores["n"] == 300 - 23
    assert list(scores)[3:6] == ["f1", "far", "mar"]
    assert scores["recall"] > 0.8 and scores["precision"] > 0.5 and scores["far"] < 0.2
    assert scores["mar"] == pytest.approx(1 - scores["recall"])

    # one line per judged row: the newest reading of each window, its time stamp, score, verdict and label
    with (tmp_path / "rows.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file", "row", "timestamp", "score", "predicted", "label"]
    assert len(rows) == scores["n"] and rows[0]["file"] == str(labelled)
    assert [int(r["row"]) for r in rows] == list(range(23, 300))
    source = list(csv.DictReader(labelled.open()))
    assert all(r["timestamp"] == source[int(r["row"])]["timestamp"] for r in rows)
    assert all(r["label"] == source[int(r["row"])]["anomaly"] for r in rows)
    clear = [r for r in rows if abs(float(r["score"]) - manifest.threshold) > 1e-4]  # scores are written rounded
    assert all((float(r["score"]) > manifest.threshold) == (r["predicted"] == "1") for r in clear)
    predicted = np.array([r["predicted"] == "1" for r in rows])
    truth = np.array([r["label"] == "1" for r in rows])
    assert scores["anomalies"] == predicted.sum()
    assert scores["far"] == pytest.approx((predicted & ~truth).sum() / (~truth).sum())
    assert scores["mar"] == pytest.approx((~predicted & truth).sum() / truth.sum())
    assert scores["f1"] == pytest.approx(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))

    table = plcsense("evaluate", str(out), str(labelled))
    header = table.stdout.splitlines()[0].split()
    assert header[:7] == ["data", "n", "anomalies", "anomaly_rate", "f1", "far", "mar"]


def test_train_and_evaluate_images_cli(tmp_path):
    data = tmp_path / "parts"
    write_image_folder(data, per_class=20)
    (data / "dark" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "bundle"
    proc = plcsense(
        "train",
        "images",
        str(data),
        "--arch",
        "scratch",
        "--no-augment",
        "--image-size",
        "16",
        "--epochs",
        "12",
        "--batch-size",
        "8",
        "--quantize",
        "int8",
        "--min-agreement",
        "0",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert_quiet(proc)
    assert "broken.png" in proc.stderr  # corrupt files are skipped and named
    manifest = load_bundle(out).manifest
    assert manifest.labels == ["bright", "dark", "striped"] and manifest.input.color_mode == "grayscale"
    assert 0 <= manifest.metrics["test_accuracy"] <= 1

    held_out = tmp_path / "held_out"
    write_image_folder(held_out, per_class=10, seed=7)
    proc = plcsense("evaluate", str(out), str(held_out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert_quiet(proc)
    scores = json.loads(proc.stdout)
    assert scores["n"] == 30 and scores["accuracy"] >= 0.9 and scores["loss"] >= 0
    table = plcsense("evaluate", str(out), str(held_out), str(data))
    assert "accuracy" in table.stdout and str(held_out) in table.stdout


def test_training_refuses_bad_data(tmp_path):
    (tmp_path / "one" / "only").mkdir(parents=True)
    write_image_folder(tmp_path / "single", per_class=3)
    for name in ("dark", "striped"):
        for f in (tmp_path / "single" / name).iterdir():
            f.unlink()
        (tmp_path / "single" / name).rmdir()
    proc = plcsense("train", "images", str(tmp_path / "single"), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "at least two" in proc.stderr
    proc = plcsense("train", "images", str(tmp_path / "one"), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "holds no images" in proc.stderr
    write_image_folder(tmp_path / "rare", per_class=3)
    for f in sorted((tmp_path / "rare" / "dark").iterdir())[1:]:
        f.unlink()
    proc = plcsense("train", "images", str(tmp_path / "rare"), "--arch", "scratch", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "class(es) dark (1) have fewer than 2 examples" in proc.stderr, proc.stderr
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    write_sensor_csv(tmp_path / "s.csv", rows=100)
    proc = plcsense("train", "sensors", str(tmp_path / "s.csv"), "--out", str(tmp_path / "notes"))
    assert proc.returncode == 2 and "not a model bundle" in proc.stderr
    assert (tmp_path / "notes" / "keep.txt").exists()
    (tmp_path / "faulty.csv").write_text("a;b;anomaly\n" + "".join(f"{i % 5};{i % 3};1\n" for i in range(200)))
    proc = plcsense("train", "sensors", str(tmp_path / "faulty.csv"), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "every row is labelled anomalous (anomaly = 1)" in proc.stderr


def test_sensor_csv_reader_keeps_only_sensor_columns_of_real_world_exports(tmp_path):
    """Exports as PLC tools, Excel and pandas write them: epoch time stamps, an unnamed index column, a trailing
    delimiter, a Windows-1252 unit in the header; and what must be refused with the column named."""
    from plcsense.training.data import DataError, read_sensor_csv

    pandas_style = tmp_path / "pandas.csv"
    pandas_style.write_text(",timestamp,flow,temp\n0,1767225600,1.5,20.1\n1,1767225601,1.6,20.2\n")
    table = read_sensor_csv(pandas_style)
    assert table.columns == ["flow", "temp"] and table.times == ["1767225600", "1767225601"]
    assert table.values.tolist() == [[1.5, 20.1], [1.6, 20.2]]
    trailing = tmp_path / "trailing.csv"
    trailing.write_bytes("Time;flow;temp \xb0C;\n1.0;1,5;20,1;\n2.0;1,6;20,2;\n".encode("cp1252"))
    table = read_sensor_csv(trailing)
    assert table.columns == ["flow", "temp °C"] and table.values.tolist() == [[1.5, 20.1], [1.6, 20.2]]
    assert read_sensor_csv(pandas_style, columns=["timestamp", "flow"]).columns == ["timestamp", "flow"]
    duplicate = tmp_path / "dup.csv"
    duplicate.write_text("a;a;b\n1;2;3\n")
    with pytest.raises(DataError, match=r"\['a'\] appear more than once"):
        read_sensor_csv(duplicate)
    single = tmp_path / "single.csv"  # one channel, decimal commas: no delimiter at all
    single.write_text("pressure\n1,5\n2,25\n")
    assert read_sensor_csv(single).values.tolist() == [[1.5], [2.25]]
    gap = tmp_path / "gap.csv"
    gap.write_text("flow;temp\n1;2\n3;\n")
    with pytest.raises(DataError, match="column 'temp' at line 3"):
        read_sensor_csv(gap)


@pytest.mark.skipif(not (SHARED_DATA / "skab").is_dir(), reason="needs ../shared/data/skab (present in CI)")
def test_skab_anomaly_free_trains(tmp_path):
    out = tmp_path / "pump"
    proc = plcsense(
        "train",
        "sensors",
        str(SHARED_DATA / "skab" / "anomaly-free" / "anomaly-free.csv"),
        "--task",
        "anomaly",
        "--window",
        "30",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert_quiet(proc)
    assert len(load_bundle(out).manifest.input.channels) == 8


@pytest.mark.parametrize(
    "args,refused",
    [
        (["sensors", "s.csv", "--epochs", "5"], "--epochs does not apply to train sensors --detector auto"),
        (["sensors", "s.csv", "--detector", "ar", "--time-budget", "9"], "--time-budget does not apply to train"),
        (["sensors", "s.csv", "--detector", "ar", "--seed", "1", "--batch-size", "8"], "--batch-size, --seed do not"),
        (["sensors", "s.csv", "--quantize", "int8"], "--quantize does not apply to train sensors --detector auto"),
        (["sensors", "s.csv", "--detector", "autoencoder", "--arch", "scratch"], "--arch does not apply to train "),
        (
            ["sensors", "cycles", "--task", "classify", "--window", "9"],
            "--window does not apply to train sensors",
        ),
        (["sensors", "cycles", "--task", "classify", "--detector", "ar"], "--detector does not apply"),
        (["images", "parts", "--label-column", "y"], "--label-column does not apply to train images"),
        (["images", "parts", "--task", "anomaly"], "--task does not apply to train images"),
        (["images", "parts", "--epochs", "5"], "--epochs does not apply to train images (it takes"),  # a backbone
        (["images", "parts", "--arch", "scratch", "--weights", "w.h5"], "--weights does not apply to train images"),
        (["sensors", "s.csv", "--fine-tune-layers", "0"], "--fine-tune-layers does not apply"),  # 0 is given too
        (["images", "parts", "--arch", "scratch", "--fine-tune-learning-rate", "1e-4"], "--fine-tune-learning-rate"),
    ],
)
def test_train_refuses_options_the_chosen_training_ignores(tmp_path, args, refused):
    """Refused before any data is read or TensorFlow imported: one line, exit 2, nothing written."""
    proc = plcsense("train", *args, "--out", str(tmp_path / "b"), timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"plcsense: {refused}") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "option, value", [("--fine-tune-learning-rate", "0"), ("--learning-rate", "-0.001"), ("--time-budget", "nan")]
)
def test_rates_and_budgets_must_be_numbers_above_zero(tmp_path, option, value):
    proc = plcsense("train", "images", "parts", option, value, "--out", str(tmp_path / "b"), timeout=60)
    assert proc.returncode == 2 and f"argument {option}: {value} is not a number above 0" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_ctrl_c_in_the_autoencoders_fit_exports_its_best_epoch_so_far(tmp_path, monkeypatch):
    """Ctrl-C at the end of the third epoch of a fit nothing else would end soon: the best of the epochs done is
    calibrated and exported, and the manifest and report say it was interrupted after two whole epochs."""
    from plcsense.training import sensors

    def interrupt_at_third(self, epoch, logs=None):
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(sensors._Deadline, "on_epoch_end", interrupt_at_third)
    write_sensor_csv(tmp_path / "normal.csv", rows=300)
    detector = sensors.AutoencoderSettings(window=16, epochs=500, patience=500, batch_size=16)
    bundle = sensors.train_sensor_anomaly(
        [tmp_path / "normal.csv"], tmp_path / "b", sensors.SensorTrainConfig(detector=detector)
    )
    m = load_bundle(bundle.path).manifest
    assert m.metrics["interrupted"] == 1.0 and m.metrics["epochs_run"] == 2 and m.threshold > 0
    calibration = json.loads((tmp_path / "b" / "report" / "selection.json").read_text())["calibration"]
    assert calibration["stopped"] == "interrupted" and calibration["epochs_run"] == 2


def test_autoencoder_takes_its_training_options(tmp_path):
    write_sensor_csv(tmp_path / "normal.csv", rows=300)
    args = ["--detector", "autoencoder", "--window", "16", "--epochs", "1", "--batch-size", "16", "--seed", "7"]
    proc = plcsense("train", "sensors", str(tmp_path / "normal.csv"), *args, "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert_quiet(proc)
    m = load_bundle(tmp_path / "b").manifest
    assert m.score == "mean_squared_error" and m.input.window == 16
    assert proc.stdout.count(" - val_loss: ") == 1  # one epoch's line: --epochs reached the autoencoder


def test_evaluate_out_is_for_anomaly_bundles(image_bundle, image_data, tmp_path):
    proc = plcsense("evaluate", str(image_bundle), str(image_data), "--out", str(tmp_path / "rows.csv"), timeout=60)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("plcsense: --out writes the row")
    assert "is a classifier" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "rows.csv").exists()


def test_alarm_scores_match_hand_counts():
    from plcsense.training.anomaly_eval import alarm_scores

    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0], bool)
    pred = np.array([0, 1, 0, 0, 1, 1, 0, 0, 0, 0], bool)  # TP 2, FP 1, FN 3, TN 4
    scores = alarm_scores(truth, pred)
    assert scores["f1"] == pytest.approx(2 / (2 + (1 + 3) / 2))
    assert scores["far"] == pytest.approx(1 / 5) and scores["mar"] == pytest.approx(3 / 5)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 5)
    quiet = alarm_scores(np.zeros(4, bool), np.zeros(4, bool))  # nothing to find, nothing flagged
    assert quiet == {"f1": 0.0, "far": 0.0, "mar": 0.0, "precision": 0.0, "recall": 0.0}


def test_a_labelled_file_shorter_than_the_window_is_counted_not_scored():
    from plcsense.training.anomaly_eval import RowVerdicts, summarise

    short = RowVerdicts("short.csv", 26, np.zeros(0), np.zeros(0, bool), np.zeros(0, bool), None)
    assert summarise([short]) == {"n": 0, "anomalies": 0, "anomaly_rate": 0.0}
