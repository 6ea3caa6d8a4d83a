"""The private-Mosquitto test helper starts brokers speaking MQTT 3.1.1/5, TLS, auth and persistence."""

from __future__ import annotations

import queue
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

try:  # works whether or not tests/ is a package
    from tests import broker as broker_mod
except ImportError:  # pragma: no cover - depends on pytest's rootdir/sys.path
    import broker as broker_mod  # type: ignore[no-redef]

Broker = broker_mod.Broker
start_broker = broker_mod.start_broker

pytestmark = pytest.mark.skipif(not broker_mod.mosquitto_available(), reason="mosquitto not installed")

TIMEOUT = 5.0
PROTOCOLS = [pytest.param(mqtt.MQTTv5, id="v5"), pytest.param(mqtt.MQTTv311, id="v311")]


class Session:
    """A paho client with its network loop running and received messages in a queue."""

    def __init__(
        self,
        broker: Broker,
        *,
        protocol: int = mqtt.MQTTv5,
        client_id: str | None = None,
        password: str | None = None,
        client_cert: bool = False,
        persistent: bool = False,
    ) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.done = threading.Event()  # CONNACK (good or bad) or connection lost
        self.reason: mqtt.ReasonCode | None = None
        self.session_present = False
        client_id = client_id or f"t-{uuid.uuid4().hex[:8]}"
        kwargs: dict = {"protocol": protocol}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = not persistent
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, **kwargs)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_args: self.done.set()
        self.client.on_connect_fail = lambda *_args: self.done.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        if broker.username:
            self.client.username_pw_set(broker.username, broker.password if password is None else password)
        if broker.tls:
            self.client.tls_set(
                ca_certs=str(broker.ca_file),
                certfile=str(broker.client_cert) if client_cert else None,
                keyfile=str(broker.client_key) if client_cert else None,
            )
        connect_kwargs: dict = {}
        if protocol == mqtt.MQTTv5:
            connect_kwargs["clean_start"] = not persistent
            if persistent:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 3600
                connect_kwargs["properties"] = props
        self.client.reconnect_delay_set(60, 60)  # a refused connect must not be retried during a test
        self.client.connect(broker.host, broker.port, keepalive=30, **connect_kwargs)
        self.client.loop_start()

    def _on_connect(self, _client, _userdata, flags, reason_code, _properties) -> None:
        self.reason = reason_code
        self.session_present = bool(flags.session_present)
        if not reason_code.is_failure:
            self.connected.set()
        self.done.set()

    def wait_connected(self) -> Session:
        assert self.done.wait(TIMEOUT), "no CONNACK"
        assert self.connected.is_set(), f"connect refused: {self.reason}"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> None:
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_args: subscribed.set()
        self.client.subscribe(topic, qos=qos)
        assert subscribed.wait(TIMEOUT), "no SUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()

    def next_message(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def plain_broker(tmp_path: Path) -> Iterator[Broker]:
    broker = start_broker(tmp_path)
    try:
        yield broker
    finally:
        broker.stop()


def round_trip(broker: Broker, protocol: int = mqtt.MQTTv5, **session_kwargs) -> None:
    topic = f"plcsense/test/{uuid.uuid4().hex[:8]}"
    sub = Session(broker, protocol=protocol, **session_kwargs).wait_connected()
    pub = Session(broker, protocol=protocol, **session_kwargs).wait_connected()
    try:
        sub.subscribe(topic)
        pub.publish(topic, b"\x00hello\xff")
        msg = sub.next_message()
        assert (msg.topic, msg.payload, msg.qos) == (topic, b"\x00hello\xff", 1)
    finally:
        sub.close()
        pub.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plain_round_trip(plain_broker: Broker, protocol: int) -> None:
    assert plain_broker.url == f"mqtt://127.0.0.1:{plain_broker.port}"
    assert plain_broker.port != 1883 and plain_broker.running
    round_trip(plain_broker, protocol)


def test_stop_is_idempotent_and_frees_port(tmp_path: Path) -> None:
    broker = start_broker(tmp_path)
    broker.stop()
    broker.stop()
    assert not broker.running
    with pytest.raises(OSError):
        mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2).connect(broker.host, broker.port)


def test_tls_with_auth(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, tls=True, auth=True)
    try:
        assert broker.url == f"mqtts://127.0.0.1:{broker.port}"
        assert broker.username == "plc" and broker.password
        assert broker.ca_file and broker.ca_file.exists()
        round_trip(broker)
        bad = Session(broker, password="wrong-password")
        try:
            assert bad.done.wait(TIMEOUT)
            assert not bad.connected.is_set()
            assert bad.reason is not None and bad.reason.is_failure
        finally:
            bad.close()
    finally:
        broker.stop()


def test_tls_rejects_untrusted_ca(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "a", tls=True)
    other = start_broker(tmp_path / "b", tls=True)  # a different CA
    try:
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        client.tls_set(ca_certs=str(other.ca_file))
        with pytest.raises(ssl.SSLError):
            client.connect(broker.host, broker.port)
    finally:
        broker.stop()
        other.stop()


def test_mutual_tls(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, require_client_cert=True)
    try:
        assert broker.tls and broker.client_cert and broker.client_key
        round_trip(broker, client_cert=True)
        # Without a client certificate the broker ends the TLS session before any CONNACK.
        try:
            anon = Session(broker)
        except (ssl.SSLError, OSError):
            return
        try:
            assert anon.done.wait(TIMEOUT)
            assert not anon.connected.is_set()
        finally:
            anon.close()
    finally:
        broker.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_persistent_session_survives_restart(tmp_path: Path, protocol: int) -> None:
    broker = start_broker(tmp_path, persistence=True)
    try:
        topic = f"plcsense/persist/{uuid.uuid4().hex[:8]}"
        client_id = f"persist-{uuid.uuid4().hex[:8]}"
        sub = Session(broker, protocol=protocol, client_id=client_id, persistent=True).wait_connected()
        sub.subscribe(topic)
        sub.close()

        pub = Session(broker, protocol=protocol).wait_connected()
        pub.publish(topic, b"queued while offline")
        pub.close()

        old_pid = broker.process.pid
        broker.restart()
        assert broker.running and broker.process.pid != old_pid

        sub = Session(broker, protocol=protocol, client_id=client_id, persistent=True).wait_connected()
        try:
            assert sub.session_present, broker.log()
            msg = sub.next_message()
            assert (msg.topic, msg.payload, msg.qos) == (topic, b"queued while offline", 1)
        finally:
            sub.close()
    finally:
        broker.stop()


def test_missing_mosquitto_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_mod, "find_executable", lambda _name: None)
    with pytest.raises(RuntimeError, match="apt-get install mosquitto mosquitto-clients"):
        start_broker(tmp_path)
