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
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from plcsense.mqtt_url import client_for, host_port

IMAGE_TOPIC = "demo/line1/camera"
SENSOR_TOPIC = "demo/line1/eeg"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        time.sleep(0.1)
    return False


def start_broker(workdir: Path) -> tuple[str, subprocess.Popen | None]:
    """The broker at ``PLCSENSE_MQTT_URL``, or a private Mosquitto on a free port."""
    url = os.environ.get("PLCSENSE_MQTT_URL")
    if url:
        return url, None
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if binary is None:
        raise SystemExit(
            "demo: no MQTT broker. Install one (sudo apt-get install mosquitto) or point the demo at yours "
            "with PLCSENSE_MQTT_URL=mqtt://host:1883"
        )
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "max_queued_messages 10000"]
    if os.geteuid() == 0:
        lines.append("user root")  # otherwise mosquitto drops to a user that cannot read our work folder
    conf.write_text("\n".join(lines) + "\n")
    log = (workdir / "mosquitto.log").open("w")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    if not _wait_port(port, 10):
        proc.kill()
        raise SystemExit(f"demo: mosquitto did not start; see {workdir / 'mosquitto.log'}")
    return f"mqtt://127.0.0.1:{port}", proc


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


def _worker_config(workdir: Path, url: str, metrics_port: int) -> Path:
    config = {
        "mqtt": {"url": url, "client_id": "plcsense-demo", "protocol": "3.1.1" if "amqtt" in url else "5"},
        "metrics": {"port": metrics_port, "host": "127.0.0.1"},
        "routes": [
            {
                "name": "camera",
                "topic": "demo/+/camera",
                "model": str(workdir / "bundles" / "digits"),
                "encoding": "image",
            },
            {"name": "eeg", "topic": "demo/+/eeg", "model": str(workdir / "bundles" / "eeg"), "encoding": "json"},
        ],
    }
    path = workdir / "worker.json.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


class Tally:
    """Counts what comes back and prints a readable sample of it: the first results of each route, then
    every 50th, and every anomaly burst and error."""

    def __init__(self) -> None:
        self.results = 0
        self.errors = 0
        self.per_route: dict[str, int] = {}
        self.lock = threading.Lock()

    def on_message(self, client: object, userdata: object, msg: object) -> None:
        topic, doc = msg.topic, json.loads(msg.payload)  # type: ignore[attr-defined]
        with self.lock:
            if topic.endswith("/error"):
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
    url, broker = start_broker(workdir)
    metrics_port = 9108 if _port_free(9108) else _free_port()
    config = _worker_config(workdir, url, metrics_port)
    worker = subprocess.Popen([sys.executable, "-m", "plcsense", "serve", "--config", str(config)])
    tally, sent, stop = Tally(), [0, 0, 0], threading.Event()
    listener = client_for(url)
    listener.on_message = tally.on_message
    listener.connect(*host_port(url))
    listener.subscribe(
        [("demo/+/camera/result", 1), ("demo/+/camera/error", 1), ("demo/+/eeg/result", 1), ("demo/+/eeg/error", 1)]
    )
    listener.loop_start()
    print(
        f"demo: broker {url}; worker metrics at http://127.0.0.1:{metrics_port}/metrics "
        f"(also /healthz, /readyz); Ctrl-C to stop",
        flush=True,
    )
    _wait_port(metrics_port, 30)
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
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(60)
    time.sleep(0.5)
    listener.disconnect()
    listener.loop_stop()
    if broker:
        broker.terminate()
        broker.wait(10)
    print(f"demo: {sum(sent)} messages, {tally.results} results, {tally.errors} errors", flush=True)
    return 0 if code == 0 and tally.results > 0 else 1


def _replay(url: str, topic: str, source: Path, rate: float, stop: threading.Event, sent: list[int], slot: int) -> None:
    from plcsense.simulate import payloads_for

    payloads = payloads_for(source)
    if source.is_dir():  # images come sorted by class: mix them like a real line would
        np.random.default_rng(0).shuffle(payloads)
    client = client_for(url)
    client.connect(*host_port(url))
    client.loop_start()
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
    client.disconnect()
    client.loop_stop()


def _corrupt(url: str, stop: threading.Event, sent: list[int], slot: int) -> None:
    """Every 10 s something a misbehaving PLC might send, to show the error path."""
    bad = [(IMAGE_TOPIC, b"\xff\xd8 truncated jpeg"), (SENSOR_TOPIC, b'{"data": [1, 2]}'), (SENSOR_TOPIC, b"not json")]
    client = client_for(url)
    client.connect(*host_port(url))
    client.loop_start()
    i = 0
    while not stop.wait(10):
        client.publish(*bad[i % len(bad)], qos=1)
        i += 1
        sent[slot] = i
    client.disconnect()
    client.loop_stop()
