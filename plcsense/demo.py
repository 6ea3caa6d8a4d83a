"""``plcsense demo``: the whole path on one machine with nothing configured.

Real data that ships with our dependencies: scikit-learn's handwritten digits (UCI, 1797 8x8 scans, written out
as a folder of PNGs, one folder per class) stand in for part images, and matplotlib's sample EEG recording
(4 channels, 800 samples) stands in for a multichannel sensor stream. The demo trains a classifier and an
anomaly detector on them, starts the worker as its own process (the serving path, without TensorFlow),
replays the data with the simulator (plus an occasional corrupt payload) and prints what comes back.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np

from plcsense.harness import (
    Answer,
    Broker,
    MqttConnectError,
    ResultCollector,
    WorkerError,
    WorkerProcess,
    close,
    connect,
    free_port,
    mosquitto_available,
    start_broker,
    write_worker_config,
)

IMAGE_TOPIC = "demo/line1/camera"
SENSOR_TOPIC = "demo/line1/eeg"
DEFAULT_METRICS_PORT = 9108


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def demo_broker(workdir: Path) -> tuple[str, Broker | None]:
    """The broker at ``PLCSENSE_MQTT_URL``, or a private Mosquitto on a free port (then also returned)."""
    url = os.environ.get("PLCSENSE_MQTT_URL")
    if url:
        return url, None
    if not mosquitto_available():
        raise SystemExit(
            "demo: no MQTT broker. Install one (sudo apt-get install mosquitto) or point the demo at yours "
            "with PLCSENSE_MQTT_URL=mqtt://host:1883"
        )
    try:
        broker = start_broker(workdir / "broker", verbose_log=False)
    except RuntimeError as exc:
        raise SystemExit(f"demo: {exc}") from None
    return broker.url, broker


def write_digits(folder: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        out = folder / str(target)
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * (255 / 16)).astype(np.uint8), mode="L").save(out / f"{i:04d}.png")


def write_eeg(path: Path) -> None:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("eeg.dat") as handle:
        data = np.frombuffer(handle.read(), dtype=float).reshape(800, 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ch1", "ch2", "ch3", "ch4"])
        writer.writerows([f"{v:.6g}" for v in row] for row in data)


def prepare(workdir: Path) -> tuple[Path, Path]:
    """Write the demo data and train the two bundles (kept between runs)."""
    from plcsense.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()  # before the trainers import it: TensorFlow's start-up notices open the demo
    from plcsense.training.images import ImageTrainConfig, train_images
    from plcsense.training.sensors import SensorTrainConfig, train_sensor_anomaly

    digits, eeg = workdir / "data" / "digits", workdir / "data" / "eeg.csv"
    if not digits.exists():
        write_digits(digits)
    if not eeg.exists():
        write_eeg(eeg)
    image_bundle, sensor_bundle = workdir / "bundles" / "digits", workdir / "bundles" / "eeg"
    if not (image_bundle / "manifest.json").exists():
        print("demo: training the digit classifier (scratch CNN)", flush=True)
        bundle = train_images(
            digits, image_bundle, ImageTrainConfig(arch="scratch", image_size=32, epochs=6, augment=None, name="digits")
        )
        print(f"demo: digit classifier test accuracy {bundle.manifest.metrics['test_accuracy']:.3f}", flush=True)
    if not (sensor_bundle / "manifest.json").exists():
        print("demo: fitting the EEG anomaly detector", flush=True)
        train_sensor_anomaly([eeg], sensor_bundle, SensorTrainConfig(name="eeg"))
    return digits, eeg


def _routes(workdir: Path) -> list[dict[str, str]]:
    return [
        {"name": "camera", "topic": "demo/+/camera", "model": str(workdir / "bundles" / "digits"), "encoding": "image"},
        {"name": "eeg", "topic": "demo/+/eeg", "model": str(workdir / "bundles" / "eeg"), "encoding": "json"},
    ]


class Tally:
    """Counts what comes back and prints a readable sample of it: the first results of each route, then
    every 50th, and every anomaly burst and error."""

    def __init__(self) -> None:
        self.results = 0
        self.errors = 0
        self.per_route: dict[str, int] = {}

    def on_answer(self, answer: Answer) -> None:  # one at a time: called on the collector's network thread
        doc = answer.doc
        if answer.is_error:
            self.errors += 1
            print(f"  error  {doc['topic']}: {doc['error']} ({doc['detail']})", flush=True)
            return
        self.results += 1
        n = self.per_route[doc["topic"]] = self.per_route.get(doc["topic"], 0) + 1
        if doc["task"] == "classification":
            what = f"label {doc['label']} ({doc['score']:.2f})"
        else:
            worst = max(doc["channels"], key=doc["channels"].get)
            what = f"score {doc['score']:.3f} / threshold {doc['threshold']:.3f}" + (
                f" ANOMALY, mostly {worst}" if doc["is_anomaly"] else ""
            )
        if n <= 3 or n % 50 == 0 or (doc.get("is_anomaly") and n % 5 == 0):
            print(f"  result {doc['topic']} #{n}: {what}, {doc['latency_ms']:.1f} ms", flush=True)


def run_demo() -> int:
    workdir = Path(os.environ.get("PLCSENSE_DEMO_DIR", ".demo")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    seconds = float(os.environ.get("PLCSENSE_DEMO_SECONDS", "0")) or None
    digits, eeg = prepare(workdir)
    url, broker = demo_broker(workdir)
    try:
        return _serve_and_replay(workdir, url, digits, eeg, seconds)
    except (MqttConnectError, WorkerError) as exc:
        raise SystemExit(f"demo: {exc}") from None
    finally:
        if broker:
            broker.stop()


def _serve_and_replay(workdir: Path, url: str, digits: Path, eeg: Path, seconds: float | None) -> int:
    metrics_port = DEFAULT_METRICS_PORT if _port_free(DEFAULT_METRICS_PORT) else free_port()
    mqtt = {"url": url, "client_id": "plcsense-demo", "protocol": "3.1.1" if "amqtt" in url else "5"}
    config, _ = write_worker_config(workdir / "worker.json.yaml", mqtt, _routes(workdir), metrics_port=metrics_port)
    (workdir / "worker.log").unlink(missing_ok=True)
    worker = WorkerProcess(config, metrics_port, workdir / "worker.log")
    tally = Tally()
    answers = [f"demo/+/{name}/{kind}" for name in ("camera", "eeg") for kind in ("result", "error")]
    listener = ResultCollector(connect(url), answers, on_answer=tally.on_answer)
    print(f"demo: broker {url}; starting the worker (its log: {worker.log_path})", flush=True)
    try:
        worker.start(timeout=60)
        print(
            f"demo: worker metrics at http://127.0.0.1:{metrics_port}/metrics (also /healthz, /readyz); Ctrl-C to stop",
            flush=True,
        )
        sent = _replay_until(url, digits, eeg, seconds)
        code = worker.terminate(60)  # drains: every answer is accepted by the broker before the worker exits
        time.sleep(0.5)  # and the broker forwards the last of them to the listener
    finally:
        worker.stop()
        listener.close()
    print(f"demo: {sent} messages, {tally.results} results, {tally.errors} errors", flush=True)
    return 0 if code == 0 and tally.results > 0 else 1


def _replay_until(url: str, digits: Path, eeg: Path, seconds: float | None) -> int:
    """Replay images, EEG readings and corrupt payloads until ``seconds`` pass or Ctrl-C; how many were sent."""
    sent, stop = [0, 0, 0], threading.Event()
    threads = [
        threading.Thread(target=_replay, args=(url, IMAGE_TOPIC, digits, 5.0, stop, sent, 0), daemon=True),
        threading.Thread(target=_replay, args=(url, SENSOR_TOPIC, eeg, 20.0, stop, sent, 1), daemon=True),
        threading.Thread(target=_corrupt, args=(url, stop, sent, 2), daemon=True),
    ]
    for thread in threads:
        thread.start()
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(10)
    return sum(sent)


def _replay(url: str, topic: str, source: Path, rate: float, stop: threading.Event, sent: list[int], slot: int) -> None:
    from plcsense.simulate import payloads_for

    payloads = payloads_for(source)
    if source.is_dir():  # images come sorted by class: mix them like a real line would
        np.random.default_rng(0).shuffle(payloads)
    client = connect(url)
    started, i = time.monotonic(), 0
    while not stop.is_set():
        payload = payloads[i % len(payloads)][1]
        if not source.is_dir() and i % 400 >= 360:  # a fault: ch3 jumps by 6 sigma for 40 readings
            doc = json.loads(payload)
            doc["data"][2] += 6.0
            payload = json.dumps(doc).encode()
        client.publish(topic, payload, qos=1)
        i += 1
        sent[slot] = i
        stop.wait(max(0.0, started + i / rate - time.monotonic()))
    close(client)


def _corrupt(url: str, stop: threading.Event, sent: list[int], slot: int) -> None:
    """Every 10 s something a misbehaving PLC might send, to show the error path."""
    bad = [(IMAGE_TOPIC, b"\xff\xd8 truncated jpeg"), (SENSOR_TOPIC, b'{"data": [1, 2]}'), (SENSOR_TOPIC, b"not json")]
    client = connect(url)
    i = 0
    while not stop.wait(10):
        client.publish(*bad[i % len(bad)], qos=1)
        i += 1
        sent[slot] = i
    close(client)
