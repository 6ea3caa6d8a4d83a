"""What "kill -9 loses nothing" needs from the broker (issue 11, item 7): the shipped Mosquitto config has it, and
on a real Mosquitto those settings carry a 5,000-reading worker outage and a broker kill -9 that Mosquitto's
defaults lose most of."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

from plcsense.harness import close
from plcsense.worker.settings import MqttSettings
from tests.broker import Broker, mosquitto_available, start_broker
from tests.conftest import publish_all

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SHIPPED = DEPLOY / "mosquitto" / "mosquitto.conf"
DELIVERY_KEYS = (
    "max_queued_messages",
    "max_queued_bytes",
    "max_inflight_messages",
    "autosave_interval",
    "autosave_on_changes",
    "persistent_client_expiration",
)
MOSQUITTO_DEFAULTS = ["max_queued_messages 1000", "autosave_interval 1800"]  # mosquitto.conf(5), 2.0
_UNIT_S = {"h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}
READINGS = 5000
TOPIC = "plant/line1/pump"

requires_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason="needs the mosquitto binary")


def mosquitto_settings(path: Path) -> dict[str, str]:
    """``key value`` lines of a mosquitto.conf (the last one wins, as in Mosquitto)."""
    settings = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            settings[key] = value.strip()
    return settings


def test_shipped_mosquitto_config_meets_the_delivery_guarantee():
    conf = mosquitto_settings(SHIPPED)
    assert conf["persistence"] == "true"
    assert conf.get("autosave_on_changes", "false") == "false" and int(conf["autosave_interval"]) <= 1
    queued = int(conf["max_queued_messages"])
    assert queued == 0 or queued >= 100_000, "Mosquitto's default of 1000 loses most of a short worker outage"
    queued_bytes = int(conf.get("max_queued_bytes", "0"))
    assert queued_bytes == 0 or queued_bytes >= 100 << 20
    expiry = conf["persistent_client_expiration"]
    assert int(expiry[:-1]) * _UNIT_S[expiry[-1]] >= MqttSettings.model_fields["session_expiry_s"].default
    volumes = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["mosquitto"]["volumes"]
    named = {v.split(":")[1] for v in volumes if not v.startswith(".")}
    assert conf["persistence_location"].rstrip("/") in named, "the persistence file must live on a volume"


@requires_mosquitto
def test_shipped_packet_limit_disconnects_oversized_publishers_and_passes_the_workers_own(tmp_path):
    """``max_packet_size`` bounds what anyone can make the broker and the worker read into memory; it must stay
    above the worker's ``max_payload_bytes``, so that payloads between the two still get an error answer."""
    from plcsense.worker.settings import RouteSettings

    limit = int(mosquitto_settings(SHIPPED)["max_packet_size"])
    assert limit > RouteSettings.model_fields["max_payload_bytes"].default
    broker = start_broker(tmp_path / "broker", extra_conf=[f"max_packet_size {limit}"], verbose_log=False)
    try:
        sizes: list[int] = []
        subscriber, subscribed = (
            broker.connect(client_id="big-sub", on_message=lambda c, u, m: sizes.append(len(m.payload))),
            threading.Event(),
        )
        subscriber.on_subscribe = lambda *_args: subscribed.set()
        subscriber.subscribe(TOPIC, qos=1)
        assert subscribed.wait(10)
        publisher = broker.connect(client_id="big-pub")
        publisher.publish(TOPIC, b"x" * (limit - 1024), qos=1).wait_for_publish(10)
        publisher.publish(TOPIC, b"y" * (limit + 1024), qos=1)
        deadline = time.monotonic() + 10
        while ("oversize packet" not in broker.log() or not sizes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "disconnected due to oversize packet" in broker.log()
        assert sizes == [limit - 1024]
        close(publisher)
        close(subscriber)
    finally:
        broker.stop()


# ----------------------------------------------------------------------------- on a real Mosquitto
def broker_with(tmp_path: Path, lines: list[str]) -> Broker:
    return start_broker(tmp_path / "broker", persistence=True, extra_conf=lines, verbose_log=False)


def shipped_lines() -> list[str]:
    conf = mosquitto_settings(SHIPPED)
    return [f"{key} {conf[key]}" for key in DELIVERY_KEYS if key in conf]


class Worker:
    """A stand-in for the worker: a QoS 1 subscriber on a persistent MQTT 5 session (clean start off)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.received: set[str] = set()
        self.lock = threading.Lock()

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.received.add(msg.payload.decode())

    def connect(self) -> mqtt.Client:
        return self.broker.connect(client_id="outage-worker", session_expiry_s=3600, on_message=self._on_message)

    def subscribe_and_leave(self) -> None:
        client, subscribed = self.connect(), threading.Event()
        client.on_subscribe = lambda *_args: subscribed.set()
        client.subscribe(TOPIC, qos=1)
        assert subscribed.wait(10)
        close(client)

    def come_back(self, expected: int, quiet_s: float = 3.0) -> int:
        """Reconnect and count what the broker kept, waiting until all came or nothing new for ``quiet_s``."""
        client = self.connect()
        last, seen = time.monotonic(), 0
        while len(self.received) < expected and time.monotonic() - last < quiet_s:
            time.sleep(0.1)
            if len(self.received) != seen:
                last, seen = time.monotonic(), len(self.received)
        close(client)
        return len(self.received)


@requires_mosquitto
@pytest.mark.parametrize(("settings", "all_delivered"), [("shipped", True), ("defaults", False)])
def test_readings_queued_during_a_worker_outage_are_delivered(tmp_path, settings, all_delivered):
    broker = broker_with(tmp_path, shipped_lines() if settings == "shipped" else MOSQUITTO_DEFAULTS)
    try:
        worker = Worker(broker)
        worker.subscribe_and_leave()
        publish_all(broker, TOPIC, [str(i) for i in range(READINGS)])  # every one PUBACKed by the broker
        delivered = worker.come_back(READINGS)
    finally:
        broker.stop()
    if all_delivered:
        assert delivered == READINGS
    else:  # Mosquitto's default queue keeps 1000 (plus what was in flight) and drops the rest silently
        assert delivered <= 1200, delivered


@requires_mosquitto
@pytest.mark.parametrize(("settings", "all_delivered"), [("shipped", True), ("defaults", False)])
def test_queued_readings_survive_a_broker_kill_9(tmp_path, settings, all_delivered):
    broker = broker_with(tmp_path, shipped_lines() if settings == "shipped" else MOSQUITTO_DEFAULTS)
    try:
        worker = Worker(broker)
        worker.subscribe_and_leave()
        publish_all(broker, TOPIC, [str(i) for i in range(500)])  # within the default queue too
        time.sleep(2.5)  # more than the shipped autosave interval
        broker.process.kill()
        broker.process.wait()
        broker.restart()
        delivered = worker.come_back(500)
    finally:
        broker.stop()
    if all_delivered:
        assert delivered == 500
    else:  # saved every 30 minutes: neither the session nor the readings were on disk
        assert delivered == 0, delivered
