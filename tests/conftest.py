"""Shared fixtures: a private Mosquitto per test, tiny real bundles trained once, the worker as a process."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from PIL import Image

from plcsense.harness import (
    Broker,
    ResultCollector,
    WorkerProcess,
    close,
    mosquitto_available,
    start_broker,
    write_worker_config,
)

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
    """A client connected to ``broker`` (CONNACK checked), its network loop running."""
    return broker.connect(protocol=protocol, client_id=client_id)


class Collector:
    """Subscribes to a filter and keeps every message it gets (a test's view of the harness's collector)."""

    def __init__(self, broker: Broker, topic: str, protocol: str = "5") -> None:
        self.answers = ResultCollector(mqtt_client(broker, protocol), topic)
        self.client = self.answers.client

    @property
    def messages(self) -> list[mqtt.MQTTMessage]:
        return self.answers.messages

    def json(self, suffix: str = "") -> list[dict]:
        return [json.loads(m.payload) for m in self.answers.messages_on(suffix)]

    def wait(self, count: int, suffix: str = "", timeout: float = 20) -> list[mqtt.MQTTMessage]:
        """Wait until ``count`` messages whose topic ends with ``suffix`` arrived; return those there are."""
        self.answers.wait_until(lambda: len(self.answers.messages_on(suffix)) >= count, timeout)
        return self.answers.messages_on(suffix)

    def wait_for(self, count: int, suffix: str = "", timeout: float = 20) -> list[dict]:
        return [json.loads(m.payload) for m in self.wait(count, suffix, timeout)]

    def wait_for_ids(self, ids: list[str], timeout: float = 20) -> bool:
        """Wait for an answer to each id: send a sentinel last and wait for it to show nothing else came."""
        return self.answers.wait_for(ids, timeout)

    def close(self) -> None:
        self.answers.close()


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
    close(client)


# ----------------------------------------------------------------------------- the worker process
def worker_config(
    path: Path,
    broker: Broker,
    routes: list[dict],
    *,
    protocol: str = "5",
    client_id: str = "test-worker",
    **mqtt_extra: object,
) -> tuple[Path, int]:
    settings = {**broker.mqtt_settings(), "client_id": client_id, "protocol": protocol, **mqtt_extra}
    return write_worker_config(path, settings, routes)


def wait_metric(worker, name: str, at_least: float, timeout: float = 20, **labels: str) -> float:
    """The metric's value once it reaches ``at_least`` (or the last value seen after ``timeout``)."""
    deadline, value = time.monotonic() + timeout, 0.0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            value = worker.metric(name, **labels)
            if value >= at_least:
                break
        time.sleep(0.2)
    return value


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
