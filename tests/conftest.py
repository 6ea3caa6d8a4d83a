"""Shared fixtures: a private Mosquitto per test, tiny real bundles trained once, the worker as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.broker import Broker, free_port, mosquitto_available, start_broker

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WINDOW = 20  # readings per window of the tiny sensor bundle

requires_mosquitto = pytest.mark.skipif(
    not mosquitto_available(), reason="needs the mosquitto binary (apt-get install mosquitto)"
)


# ----------------------------------------------------------------------------- brokers
@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if not mosquitto_available():
        pytest.skip("needs the mosquitto binary (apt-get install mosquitto)")
    b = start_broker(tmp_path / "broker")
    yield b
    b.stop()


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[Broker]:
    if not mosquitto_available():
        pytest.skip("needs the mosquitto binary (apt-get install mosquitto)")
    b = start_broker(tmp_path / "broker", tls=True, auth=True)
    yield b
    b.stop()


# ----------------------------------------------------------------------------- tiny real bundles
def write_sensor_csv(path: Path, rows: int = 600, seed: int = 0, delimiter: str = ";") -> None:
    """Three smooth, correlated channels plus a timestamp column, like a PLC's CSV export."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    a = np.sin(t / 8) + 0.05 * rng.normal(size=rows)
    b = 2 * np.cos(t / 8) + 0.05 * rng.normal(size=rows)
    c = 10 + a + b + 0.05 * rng.normal(size=rows)
    lines = [delimiter.join(["timestamp", "vibration", "current", "pressure"])]
    lines += [
        delimiter.join([f"2026-01-01 00:{i // 60 % 60:02d}:{i % 60:02d}", f"{x:.5f}", f"{y:.5f}", f"{z:.5f}"])
        for i, (x, y, z) in enumerate(zip(a, b, c, strict=True))
    ]
    path.write_text("\n".join(lines) + "\n")


def write_image_folder(root: Path, per_class: int = 24, size: int = 24, seed: int = 0) -> None:
    """Three visibly different classes of small grey images: dark, bright, striped."""
    rng = np.random.default_rng(seed)
    for name in ("bright", "dark", "striped"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.normal(0, 12, (size, size))
            if name == "dark":
                pixels = 40 + noise
            elif name == "bright":
                pixels = 210 + noise
            else:
                pixels = np.where((np.arange(size) // 3) % 2, 230, 20)[None, :] + noise
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(root / name / f"{i:03d}.png")


@pytest.fixture(scope="session")
def sensor_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from plcsense.training.sensors import SensorTrainConfig, train_sensor_anomaly

    root = tmp_path_factory.mktemp("sensor")
    write_sensor_csv(root / "normal.csv")
    out = root / "bundle"
    train_sensor_anomaly([root / "normal.csv"], out, SensorTrainConfig(window=WINDOW, name="pump"))
    return out


@pytest.fixture(scope="session")
def image_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images") / "parts"
    write_image_folder(root)
    return root


@pytest.fixture(scope="session")
def image_bundle(image_data: Path) -> Path:
    from plcsense.training.images import ImageTrainConfig, train_images

    out = image_data.parent / "bundle"
    train_images(
        image_data,
        out,
        ImageTrainConfig(arch="scratch", image_size=16, epochs=12, batch_size=8, augment=None, name="parts"),
    )
    return out


# ----------------------------------------------------------------------------- MQTT helpers
def mqtt_client(broker: Broker, protocol: str = "5", client_id: str = "") -> mqtt.Client:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
    )
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set(ca_certs=str(broker.ca_file))
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


class Collector:
    """Subscribes to a filter and keeps every message it gets."""

    def __init__(self, broker: Broker, topic: str, protocol: str = "5") -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt_client(broker, protocol)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(5), "subscription not acknowledged"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def json(self, suffix: str = "") -> list[dict]:
        with self._cond:
            return [json.loads(m.payload) for m in self.messages if m.topic.endswith(suffix)]

    def wait(self, count: int, suffix: str = "", timeout: float = 20) -> list[mqtt.MQTTMessage]:
        """Wait until ``count`` messages whose topic ends with ``suffix`` arrived; return those there are."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(m.topic.endswith(suffix) for m in self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def wait_for(self, count: int, suffix: str = "", timeout: float = 20) -> list[dict]:
        return [json.loads(m.payload) for m in self.wait(count, suffix, timeout)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    made: list[Collector] = []
    yield made
    for c in made:
        c.close()


def publish_all(broker: Broker, topic: str, payloads: list[bytes | str], protocol: str = "5", **kw: object) -> None:
    client = mqtt_client(broker, protocol)
    infos = [client.publish(topic, p, qos=1, **kw) for p in payloads]
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


# ----------------------------------------------------------------------------- the worker process
class WorkerProcess:
    def __init__(self, config: Path, metrics_port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.config, self.metrics_port, self.log_path = config, metrics_port, log
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> WorkerProcess:
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "plcsense", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        if wait:
            self.wait_ready()
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"worker not ready after {timeout} s:\n{self.log()}")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        _, text = self.get("/metrics")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def worker_config(
    path: Path,
    broker: Broker,
    routes: list[dict],
    *,
    protocol: str = "5",
    client_id: str = "test-worker",
    **mqtt_extra: object,
) -> tuple[Path, int]:
    port = free_port()
    mqtt_settings: dict[str, object] = {"url": broker.url, "client_id": client_id, "protocol": protocol}
    if broker.username:
        mqtt_settings |= {"username": broker.username, "password": broker.password}
    if broker.tls:
        mqtt_settings["ca_file"] = str(broker.ca_file)
    mqtt_settings |= mqtt_extra
    config = {"mqtt": mqtt_settings, "metrics": {"port": port, "host": "127.0.0.1"}, "routes": routes}
    path.write_text(json.dumps(config))
    return path, port


@pytest.fixture
def run_worker(tmp_path: Path) -> Iterator:
    """``run_worker(broker, routes, **mqtt)`` starts a worker process and waits until it is ready."""
    started: list[WorkerProcess] = []

    def run(broker: Broker, routes: list[dict], *, start: bool = True, **kw: object) -> WorkerProcess:
        n = len(started)
        config, port = worker_config(tmp_path / f"worker{n}.yaml", broker, routes, **kw)
        worker = WorkerProcess(config, port, tmp_path / f"worker{n}.log")
        started.append(worker)
        return worker.start() if start else worker

    yield run
    for worker in started:
        worker.stop()
