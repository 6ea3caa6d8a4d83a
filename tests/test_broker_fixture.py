"""The harness: private Mosquitto brokers (MQTT 3.1.1/5, TLS, auth, persistence, extra config), a connect that
checks the CONNACK, and the answer collector."""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from plcsense import harness
from plcsense.harness import Broker, MqttConnectError, ResultCollector, close, start_broker

pytestmark = pytest.mark.skipif(not harness.mosquitto_available(), reason="mosquitto not installed")

TIMEOUT = 5.0
PROTOCOLS = [pytest.param("5", id="v5"), pytest.param("3.1.1", id="v311")]


@pytest.fixture
def plain_broker(tmp_path: Path) -> Iterator[Broker]:
    broker = start_broker(tmp_path)
    try:
        yield broker
    finally:
        broker.stop()


def round_trip(broker: Broker, protocol: str = "5", **connect_kwargs: object) -> None:
    topic = f"plcsense/test/{uuid.uuid4().hex[:8]}"
    sub = ResultCollector(broker.connect(protocol=protocol, **connect_kwargs), topic)
    pub = broker.connect(protocol=protocol, **connect_kwargs)
    try:
        info = pub.publish(topic, b"\x00hello\xff", qos=1)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()
        assert sub.wait_until(lambda: len(sub.messages) == 1, TIMEOUT)
        msg = sub.messages[0]
        assert (msg.topic, msg.payload, msg.qos) == (topic, b"\x00hello\xff", 1)
        assert sub.answers == [], "a payload that is no worker answer is kept as a message only"
    finally:
        sub.close()
        close(pub)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plain_round_trip(plain_broker: Broker, protocol: str) -> None:
    assert plain_broker.url == f"mqtt://127.0.0.1:{plain_broker.port}"
    assert plain_broker.port != 1883 and plain_broker.running
    round_trip(plain_broker, protocol)


def test_stop_is_idempotent_and_frees_port(tmp_path: Path) -> None:
    broker = start_broker(tmp_path)
    broker.stop()
    broker.stop()
    assert not broker.running
    with pytest.raises(MqttConnectError, match=r"cannot reach the MQTT broker at mqtt://127\.0\.0\.1:"):
        broker.connect()


def test_tls_with_auth(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, tls=True, auth=True)
    try:
        assert broker.url == f"mqtts://127.0.0.1:{broker.port}"
        assert broker.username == "plc" and broker.password
        assert broker.ca_file and broker.ca_file.exists()
        assert broker.mqtt_settings() == {
            "url": broker.url,
            "username": "plc",
            "password": broker.password,
            "ca_file": str(broker.ca_file),
        }
        round_trip(broker)
        with pytest.raises(MqttConnectError, match="refused the connection: Not authorized") as refused:
            harness.connect(broker.url, username="plc", password="wrong-password", ca_file=broker.ca_file)
        assert refused.value.reason is not None and refused.value.reason.is_failure
        with pytest.raises(MqttConnectError, match="refused the connection"):
            harness.connect(broker.url, ca_file=broker.ca_file, protocol="3.1.1")  # anonymous
    finally:
        broker.stop()


def test_tls_rejects_untrusted_ca(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "a", tls=True)
    other = start_broker(tmp_path / "b", tls=True)  # a different CA
    try:
        with pytest.raises(MqttConnectError, match=r"cannot reach .*CERTIFICATE_VERIFY_FAILED"):
            harness.connect(broker.url, ca_file=other.ca_file)
    finally:
        broker.stop()
        other.stop()


def test_mutual_tls(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, require_client_cert=True)
    try:
        assert broker.tls and broker.client_cert and broker.client_key
        round_trip(broker, cert_file=broker.client_cert, key_file=broker.client_key)
        # Without a client certificate the broker ends the TLS session before any CONNACK.
        with pytest.raises(MqttConnectError):
            broker.connect(timeout=TIMEOUT)
    finally:
        broker.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_persistent_session_survives_restart(tmp_path: Path, protocol: str) -> None:
    broker = start_broker(tmp_path, persistence=True)
    try:
        topic = f"plcsense/persist/{uuid.uuid4().hex[:8]}"
        client_id = f"persist-{uuid.uuid4().hex[:8]}"
        persistent = {"protocol": protocol, "client_id": client_id, "session_expiry_s": 3600}
        ResultCollector(broker.connect(**persistent), topic).close()

        pub = broker.connect(protocol=protocol)
        pub.publish(topic, b"queued while offline", qos=1).wait_for_publish(TIMEOUT)
        close(pub)

        old_pid = broker.process.pid
        broker.restart()
        assert broker.running and broker.process.pid != old_pid

        # The queued message comes right after the CONNACK: the handler must be there before connecting.
        got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        sub = broker.connect(**persistent, on_message=lambda _c, _u, m: got.put(m))
        try:
            msg = got.get(timeout=TIMEOUT)
            assert (msg.topic, msg.payload, msg.qos) == (topic, b"queued while offline", 1), broker.log()
        finally:
            close(sub)
    finally:
        broker.stop()


def test_extra_conf_acl_refuses_a_publish(tmp_path: Path) -> None:
    """Extra config lines reach the broker: an ACL refuses a publish (MQTT 5 PUBACK 0x87). Mosquitto 2.0's
    acl_file does not refuse subscriptions: it grants them and delivers nothing."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite allowed/#\n")
    broker = start_broker(tmp_path / "broker", extra_conf=[f"acl_file {acl}"])
    acks: queue.Queue[tuple[int, mqtt.ReasonCode]] = queue.Queue()
    pub = broker.connect()
    pub.on_publish = lambda _c, _u, mid, reason, _p: acks.put((mid, reason))
    try:
        assert f"acl_file {acl}" in broker.config_file.read_text()
        allowed = pub.publish("allowed/x", b"1", qos=1).mid
        denied = pub.publish("denied/x", b"1", qos=1).mid
        reasons = dict(acks.get(timeout=TIMEOUT) for _ in range(2))
        assert not reasons[allowed].is_failure
        assert reasons[denied].is_failure and str(reasons[denied]) == "Not authorized"
    finally:
        close(pub)
        broker.stop()


def test_collector_counts_answers_once_per_id(plain_broker: Broker) -> None:
    """Inputs and foreign payloads are kept as messages only; a redelivered answer is a duplicate, not a new one."""
    seen: list[str] = []
    out = ResultCollector(plain_broker.connect(), "line/#", on_answer=lambda a: seen.append(a.topic))
    pub = plain_broker.connect()
    try:
        docs = [
            {"data": [1, 2], "id": "a"},  # an input, not an answer
            {"task": "anomaly", "id": "a", "score": 1.0},
            {"task": "anomaly", "id": "a", "score": 1.0},  # redelivery
            {"error": "bad_shape", "id": 7, "detail": "x"},
            {"task": "classification", "id": None, "label": "dark"},
        ]
        topics = ["line/1", "line/1/result", "line/1/result", "line/2/error", "line/3/result"]
        for topic, doc in zip(topics, docs, strict=True):
            pub.publish(topic, json.dumps(doc), qos=1).wait_for_publish(TIMEOUT)
        pub.publish("line/4", b"\x89PNG raw", qos=1).wait_for_publish(TIMEOUT)
        assert out.wait_for(["a", "7"], TIMEOUT) and out.wait_for(3, TIMEOUT)
        assert out.wait_until(lambda: len(out.messages) == 6, TIMEOUT)  # the raw payload, sent last, is here
        assert len(out.answers) == 3
        assert out.duplicates == 1
        assert out.results == [docs[1], docs[4]] and out.errors == [docs[3]]
        assert seen == ["line/1/result", "line/2/error", "line/3/result"]
        assert out.by_id["7"].is_error and out.by_id["a"].received <= out.by_id["7"].received
        assert not out.wait_for(["missing"], 0.1) and not out.wait_for(4, 0.1)
    finally:
        out.close()
        close(pub)


def test_missing_mosquitto_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "find_executable", lambda _name: None)
    with pytest.raises(RuntimeError, match="apt-get install mosquitto mosquitto-clients"):
        start_broker(tmp_path)
