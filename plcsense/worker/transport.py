"""The MQTT side of the worker: session, subscriptions, flow control, late acknowledgement and drain.

Delivery contract: inputs arrive at QoS 1 on a persistent session, and each input is acknowledged to the broker
only after its answer (result or error) has been accepted by the broker. A worker killed at any moment therefore
loses nothing: the broker redelivers every unacknowledged input when the worker comes back.

Flow control does not trust the broker: Mosquitto before 2.0.13 ignores MQTT 5 Receive Maximum once acks flow.
When ``max_inflight`` inputs are unacknowledged (or a route's ``max_pending`` are unanswered), the intake
connection's network thread waits in ``on_message``, so its socket is not read and TCP pushes back on the broker.
Answers go out on a second connection of their own: their PUBACKs, which free the room, never queue behind the
inputs the intake is not reading, so the wait cannot deadlock and the bound holds exactly.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from plcsense.worker.metrics import Metrics
from plcsense.worker.paho_speedup import share_property_tables
from plcsense.worker.pipeline import Answer, Inbound, Outcome, Pipeline, Route
from plcsense.worker.quiet_log import RateLimitedLog
from plcsense.worker.settings import MqttSettings

log = logging.getLogger("plcsense.worker")

STALL_S = 60.0
LEAVE_QUIET_S = 1.0
"""A member leaving a shared group ends its session once nothing is unanswered and no input came for this long."""
"""Intake waiting this long without one answer means the message path is stuck: /healthz fails."""


_MAX_PACKETS_PER_PASS = 256
"""Packets handled in one pass of paho's loop before it sends what is queued (acknowledgements) and checks keepalive."""


def _resume_at(limit: int) -> int:
    """Where a full window of ``limit`` resumes taking inputs: a quarter free (at least one place)."""
    return limit - max(1, limit // 4)


@dataclass(slots=True)
class Delivery:
    """How to acknowledge one input: its packet id means nothing on a later connection (``generation``)."""

    mid: int
    qos: int
    generation: int
    route: str


class _ReadAhead:
    """The broker connection, read up to 64 KiB per system call.

    paho reads every packet with three ``recv`` calls (first byte, length, rest), each a system call that also
    hands the GIL to another thread. Served from a buffer, a burst of inputs costs one ``recv`` per 64 KiB.
    paho asks ``pending()`` before it waits in ``select`` (as it does of TLS sockets, which buffer too), so
    buffered bytes are never left waiting. Everything else goes to the socket.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def recv(self, size: int) -> bytes:
        if not self._buffer:
            data = self._sock.recv(65536)  # BlockingIOError / SSLWantReadError pass to paho as from the socket
            if len(data) <= size:
                return data
            self._buffer += data
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        return chunk

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._buffer) + (inner() if inner is not None else 0)

    @property
    def buffered(self) -> bool:
        return bool(self._buffer)

    def fileno(self) -> int:  # select() asks on every loop pass
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Client(mqtt.Client):
    """paho's client, reading ahead, and remembering why the last connection attempt failed (paho retries
    without saying)."""

    last_error: BaseException | None = None

    def reconnect(self) -> mqtt.MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_error = exc
            raise

    def _create_socket(self) -> Any:
        return _ReadAhead(super()._create_socket())

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        """paho's, then every packet already read ahead (at most ``_MAX_PACKETS_PER_PASS``).

        paho reads one packet per pass of its loop on a connection with nothing of its own in flight, which is
        the intake's case: a select() and a full loop pass for every input."""
        rc = super().loop_read(max_packets)
        sock = self._sock
        for _ in range(_MAX_PACKETS_PER_PASS):
            if rc != mqtt.MQTT_ERR_SUCCESS or not isinstance(sock, _ReadAhead) or not sock.buffered:
                break
            rc = super().loop_read(1)
        return rc


def connect_failure(exc: BaseException | None, s: MqttSettings) -> tuple[str, str]:
    """(metric reason, one line with the cause and what to check) for a failed connection attempt."""
    where = f"{s.host}:{s.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        if "hostname" in str(exc).lower() or "ip address mismatch" in str(exc).lower():
            return "tls_hostname", (
                f"TLS: the broker's certificate does not name {s.host} ({exc.verify_message}); connect by a name "
                "the certificate lists, or set mqtt.tls_insecure for an IP address it lacks"
            )
        return "tls_untrusted", (
            f"TLS: the broker's certificate is not trusted ({exc.verify_message}); set mqtt.ca_file to the CA "
            "that signed it"
        )
    if isinstance(exc, ssl.SSLError):
        return "tls_handshake", (
            f"TLS handshake with {where} failed ({exc.reason or exc}); check that the port is the broker's TLS "
            "listener and, if it requires client certificates, mqtt.cert_file and mqtt.key_file"
        )
    if isinstance(exc, ConnectionRefusedError):
        return "refused", f"nothing accepts connections on {where}; check mqtt.url and that the broker runs"
    if isinstance(exc, socket.gaierror):
        return "dns", f"cannot resolve {s.host} ({exc.strerror}); check mqtt.url and DNS"
    if isinstance(exc, TimeoutError):
        return "timeout", f"no answer from {where} in time; check the network path and firewalls"
    return "other", f"cannot connect to {where} ({type(exc).__name__}: {exc})"


class Transport:
    def __init__(
        self,
        settings: MqttSettings,
        metrics: Metrics,
        pipeline: Pipeline,
        control: Callable[[bytes], dict[str, Any]] | None = None,
    ) -> None:
        share_property_tables()
        self.settings = settings
        self._control = control
        # commands run one at a time off the network thread: a reload loads and checks model versions (seconds),
        # and on the network thread intake, acknowledgements and keepalive pings would wait for it
        self._commands = ThreadPoolExecutor(1, thread_name_prefix="control") if control else None
        self.metrics = metrics
        self.pipeline = pipeline
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._generation = 0
        self._subscriptions: dict[int, str] = {}  # SUBSCRIBE mid -> filter, until the SUBACK says how it went
        self._subscribe_failed: list[str] = []
        self._unacked = 0  # inputs received and not yet acknowledged
        metrics.inflight.set_function(lambda: self._unacked)  # read at scrape time, not set twice per input
        self._working: dict[str, int] = {}  # per route: inputs received and not yet answered
        self._pending: dict[int, Inbound] = {}  # outgoing publish mid -> the input it answers
        self._answers_epoch = 0  # disconnects of the answers connection so far: see _track
        self._early_acks: set[int] = set()  # PUBACKs that beat the bookkeeping after publish()
        self._unowed: set[int] = set()  # mids of our publishes that answer no input (control replies)
        self._refused: set[mqtt.Client] = set()  # clients whose last CONNACK refused them
        self._draining = False
        self._leaving = False  # a shared-group member leaving for good: it answers everything it is still sent
        self._last_input = 0.0  # time.monotonic() of the last input taken
        self._saturated = False
        self._waiting_for: Route | None = None  # the route of the input a full intake holds, while it waits
        self._stalled_since: float | None = None  # intake waiting for room, and no answer since
        self._connected = threading.Event()
        self._answers_connected = threading.Event()
        self._failure: str | None = None
        self._warnings = RateLimitedLog(log)
        self.client = self._make_client(settings.client_id, intake=True)
        self.answers = self._make_client(f"{settings.client_id}-answers", intake=False)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        s = self.settings
        kwargs: dict[str, Any] = {}
        if s.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry_s
            props.ReceiveMaximum = s.max_inflight
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect_async(s.host, s.port, s.keepalive_s, **kwargs)
        self.client.loop_start()
        self.answers.connect_async(
            s.host, s.port, s.keepalive_s, **({"clean_start": True} if s.protocol == "5" else {})
        )
        self.answers.loop_start()
        log.info("connecting to %s as %s (MQTT %s)", s.url, s.client_id, s.protocol)

    def ready(self) -> tuple[bool, str]:
        if not (self._connected.is_set() and self._answers_connected.is_set()):
            return False, "not connected to the MQTT broker" + (f": {self._failure}" if self._failure else "")
        if self._subscribe_failed:
            return False, "subscriptions refused: " + "; ".join(self._subscribe_failed)
        if self._subscriptions:
            return False, "waiting for the broker to confirm subscriptions"
        if self._draining:
            return False, "shutting down"
        if self._saturated:
            return False, f"saturated: {self._unacked} inputs unacknowledged; intake paused until one is answered"
        return True, "ready"

    def healthy(self) -> tuple[bool, str]:
        """Not healthy when intake has waited for room for ``STALL_S`` without a single input being answered."""
        since = self._stalled_since
        if since is not None and time.monotonic() - since > STALL_S:
            return False, f"no input answered for {time.monotonic() - since:.0f} s while {self._unacked} wait; stuck"
        return True, "ok"

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop taking messages, answer what is in flight, go offline. Returns False if the drain timed out.

        A member of a shared group leaves for good (a scale-down): it first unsubscribes, so the broker stops
        giving it a share, answers everything given to it (also what the broker had queued for it and goes on
        sending after the UNSUBACK), then, after ``LEAVE_QUIET_S`` without a new input, ends its session. Anything
        left in an ended session would be lost on Mosquitto, which does not hand it to another member."""
        leaving = self.settings.protocol == "5" and bool(self.settings.shared_group) and self._connected.is_set()
        if leaving:
            self._leaving = True
            self._unsubscribe_all(timeout=5)
        deadline = time.monotonic() + timeout
        with self._lock:
            self._draining = True
            self._room.notify_all()
            while True:
                drained = self._idle.wait_for(lambda: self._unacked == 0, max(0.0, deadline - time.monotonic()))
                # Leaving: the broker goes on sending what it had queued for this session after the UNSUBACK, one
                # message per acknowledgement; only a quiet spell with nothing unanswered means it has all come
                quiet = time.monotonic() - self._last_input
                if not (leaving and drained) or quiet >= LEAVE_QUIET_S:
                    break
                if time.monotonic() >= deadline:  # still being sent inputs: keep the session, they stay in it
                    drained = False
                    break
                self._idle.wait(min(LEAVE_QUIET_S - quiet, max(0.0, deadline - time.monotonic())))
        if not drained:
            log.warning(
                "%d messages still unanswered after %.0f s; the broker will redeliver them", self._unacked, timeout
            )
        if self._connected.is_set():
            info = self.client.publish(self.settings.status_topic, "offline", qos=1, retain=True)
            info.wait_for_publish(timeout=3)
        props = None
        if leaving and drained:  # Mosquitto would otherwise keep queueing a share for us until the session expires
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        if self._commands is not None:
            self._commands.shutdown(wait=False, cancel_futures=True)
        self.client.disconnect(properties=props)
        self.client.loop_stop()
        self.answers.disconnect()
        self.answers.loop_stop()
        return drained

    def _unsubscribe_all(self, timeout: float) -> None:
        """Unsubscribe every route and wait for the broker's UNSUBACK (messages sent before it still come)."""
        done = threading.Event()
        topics = [f"$share/{self.settings.shared_group}/{r.settings.topic}" for r in self.pipeline.routes]
        self.client.on_unsubscribe = lambda *args: done.set()
        result, _ = self.client.unsubscribe(topics)
        if result != mqtt.MQTT_ERR_SUCCESS or not done.wait(timeout):
            log.warning("no UNSUBACK from the broker; leaving the shared group anyway")

    # ----------------------------------------------------------------- session
    def _make_client(self, client_id: str, *, intake: bool) -> mqtt.Client:
        """The intake connection (persistent session, late acks, status) or the answers connection (clean)."""
        s = self.settings
        v5 = s.protocol == "5"
        client = _Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not intake,
        )
        client.reconnect_delay_set(min_delay=s.reconnect_min_s, max_delay=s.reconnect_max_s)
        if s.username:
            client.username_pw_set(s.username, s.password.get_secret_value() if s.password else None)
        if s.tls:
            client.tls_set(
                ca_certs=str(s.ca_file) if s.ca_file else None,
                certfile=str(s.cert_file) if s.cert_file else None,
                keyfile=str(s.key_file) if s.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(s.tls_insecure)
        client.on_connect_fail = self._on_connect_fail
        client.user_data_set(self._connected if intake else self._answers_connected)
        client.suppress_exceptions = True  # a bug in a callback must not end the MQTT loop
        if intake:
            client.manual_ack_set(True)
            client.will_set(s.status_topic, "offline", qos=1, retain=True)
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_message = self._on_message
            client.on_subscribe = self._on_subscribe
        else:
            client.max_inflight_messages_set(s.max_inflight)
            client.on_connect = self._on_answers_connect
            client.on_disconnect = self._on_disconnect
            client.on_publish = self._on_publish
        return client

    def _connection_failed(self, reason: str, detail: str) -> None:
        self._failure = detail
        self.metrics.connect_failures.labels(reason).inc()
        self._warnings.log(logging.ERROR, f"connect:{reason}", "cannot connect to the MQTT broker: %s", detail)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._connection_failed(*connect_failure(getattr(client, "last_error", None), self.settings))

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused.add(client)  # paho hangs up next: that is not the "closed before CONNACK" case
            self._connection_failed(
                "rejected",
                f"the broker refused the connection ({reason}); check mqtt.username, mqtt.password and its ACL",
            )
            return
        s = self.settings
        log.info("connected to %s (session present: %s)", s.url, flags.session_present)
        with self._lock:
            self._generation += 1
            self._subscriptions.clear()
            self._subscribe_failed.clear()
            self._failure = None
        for route in self.pipeline.routes:
            topic = route.settings.topic
            if s.protocol == "5":
                shared = bool(s.shared_group)
                if shared:
                    topic = f"$share/{s.shared_group}/{topic}"
                # No Local keeps our own results out; it is not allowed on shared subscriptions. Retain handling 1:
                # a retained reading is sent when the subscription is new, not again on every reconnect that
                # re-subscribes a kept session (it would enter a window twice).
                options = SubscribeOptions(qos=route.settings.qos, noLocal=not shared, retainHandling=1)
                _, mid = client.subscribe(topic, options=options)
            else:
                _, mid = client.subscribe(topic, qos=route.settings.qos)
            self._subscriptions[mid] = topic
        if self._control is not None:
            _, mid = client.subscribe(s.control_topic, qos=1)
            self._subscriptions[mid] = s.control_topic
        client.publish(s.status_topic, "online", qos=1, retain=True)
        self._connected.set()
        self.metrics.connected.set(int(self._answers_connected.is_set()))

    def _on_answers_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused.add(client)
            self._connection_failed(
                "rejected",
                f"the broker refused the answers connection ({reason}); check mqtt.username, mqtt.password and its "
                "ACL (it connects as <client_id>-answers)",
            )
            return
        self._answers_connected.set()
        self.metrics.connected.set(int(self._connected.is_set()))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list, props: Any) -> None:
        topic = self._subscriptions.pop(mid, "?")
        for reason in reasons:
            if getattr(reason, "is_failure", False):
                log.error(
                    "broker refused the subscription to %s (%s); check its ACL and shared-subscription support",
                    topic,
                    reason,
                )
                self._subscribe_failed.append(f"{topic}: {reason}")

    def _closed_while_connecting(self, reason: Any) -> None:
        """The broker hung up before CONNACK: with TLS 1.3 that is how a refused client certificate shows."""
        hint = (
            "if it requires client certificates, check mqtt.cert_file and mqtt.key_file (signed by a CA it trusts)"
            if self.settings.tls
            else "check its log and the url's port"
        )
        self._connection_failed("closed", f"the broker closed the connection before accepting it ({reason}); {hint}")

    def _on_disconnect(self, client: mqtt.Client, connected: Any, flags: Any, reason: Any, props: Any) -> None:
        """Either connection (``connected`` is its event, given to paho as user data)."""
        if not connected.is_set() and not self._draining:
            if client in self._refused:  # the refusal was reported, with its cause
                self._refused.discard(client)
            else:
                self._closed_while_connecting(reason)
            return
        connected.clear()
        self.metrics.connected.set(0)
        if connected is self._answers_connected:
            self._lost_at_disconnect()
        with self._room:
            self._room.notify_all()
        if not self._draining:  # unanswered inputs stay unacknowledged: the broker or paho resends them
            self._failure = f"disconnected ({reason})"
            self._warnings.log(
                logging.WARNING, f"disconnect:{reason}", "disconnected from the broker (%s); reconnecting", reason
            )

    # ----------------------------------------------------------------- intake
    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._take(client, msg)
        except Exception:  # nothing may escape into paho's network thread: it would stop the MQTT loop
            log.exception("unexpected failure handling a message on %s; it stays unacknowledged", msg.topic)

    def _has_room(self, route: Route) -> bool:
        limit = route.max_pending
        return self._unacked < self.settings.max_inflight and (
            limit is None or self._working.get(route.name, 0) < limit
        )

    def _refilled(self, route: Route) -> bool:
        """Room for a quarter of the window again: a full intake resumes here, not at the first free place."""
        limit = route.max_pending
        return self._unacked <= _resume_at(self.settings.max_inflight) and (
            limit is None or self._working.get(route.name, 0) <= _resume_at(limit)
        )

    def _wake_intake(self) -> None:
        """Wake a waiting intake only once its window is refilled (caller holds the lock).

        Woken at every answer, the network thread took one input and slept again: two thread switches and a
        GIL hand-over per input while saturated, 36 futex calls per message measured with strace."""
        if self._waiting_for is not None and self._refilled(self._waiting_for):
            self._room.notify()

    def _take(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic  # decoded from bytes at every access
        if self._commands is not None and topic == self.settings.control_topic:
            delivery = Delivery(msg.mid, msg.qos, self._generation, "")
            self._commands.submit(self._command, client, topic, msg.payload, delivery)
            return
        route = self.pipeline.route_for(topic)
        if route is None:  # an answer or status topic (ours or a sibling's): acknowledge and ignore
            self.metrics.ignored.labels("output_topic").inc()
            client.ack(msg.mid, msg.qos)
            return
        with self._lock:
            if not self._has_room(route):
                self._set_saturated(True)
                self._waiting_for = route
                while not self._refilled(route) and not self._draining and self._connected.is_set():
                    self._room.wait(0.5)
                self._waiting_for = None
                self._set_saturated(False)
            if self._draining and not self._leaving:
                return  # not acknowledged: the broker keeps it for our next session
            self._unacked += 1
            self._last_input = time.monotonic()
            self._working[route.name] = self._working.get(route.name, 0) + 1
            generation = self._generation
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None)
        if response_topic is not None and self.pipeline.route_for(response_topic) is not None:
            # an answer there would come back to us as an input (or reach another route's model): refused
            self._warnings.log(
                logging.WARNING,
                f"response:{route.name}",
                "route %s: response topic %r is one of this worker's input topics; answering on the route's own",
                route.name,
                response_topic[:200],
            )
            response_topic = None
        inbound = Inbound(
            topic,
            msg.payload,
            response_topic=response_topic,
            correlation=getattr(props, "CorrelationData", None),
            delivery=Delivery(msg.mid, msg.qos, generation, route.name),
            route=route,
        )
        outcome = self.pipeline.handle(inbound)
        if outcome is not None:
            self.settle(inbound, outcome)

    def _command(self, client: mqtt.Client, topic: str, payload: bytes, delivery: Delivery) -> None:
        """One control command: run it, publish the reply, then acknowledge it (a command is never redelivered for
        failing: its reply says why)."""
        assert self._control is not None
        try:
            reply = self._control(payload)
            info = self.answers.publish(f"{topic}/reply", json.dumps(reply), qos=1)
            if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # queued: its PUBACK will come
                self._owes_nothing(info.mid)
        except Exception:
            log.exception("control command on %s failed", topic)
        if delivery.qos and delivery.generation == self._generation:
            client.ack(delivery.mid, delivery.qos)

    def _set_saturated(self, saturated: bool) -> None:
        if saturated and self._stalled_since is None:
            self._stalled_since = time.monotonic()
        elif not saturated:
            self._stalled_since = None
        if saturated != self._saturated:
            self._saturated = saturated
            self.metrics.saturated.set(int(saturated))
            if saturated:
                self.metrics.saturations.inc()

    # ----------------------------------------------------------------- answers and acknowledgement
    def settle(self, inbound: Inbound, outcome: Outcome) -> None:
        """Publish the answer (if any) and let the input go once the broker has it. Any thread."""
        if isinstance(outcome, Answer):
            self._publish(inbound, outcome)
        else:
            self._finish(inbound)
        delivery: Delivery = inbound.delivery
        with self._lock:
            self._working[delivery.route] -= 1
            if self._stalled_since is not None:  # progress: the clock of a stall starts again
                self._stalled_since = time.monotonic()
            self._wake_intake()

    def _publish(self, inbound: Inbound, answer: Answer) -> None:
        props = None
        if answer.correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = answer.correlation
        try:
            info = self.answers.publish(answer.topic, answer.body, qos=answer.qos, properties=props)
        except (ValueError, TypeError) as exc:  # e.g. a response topic with wildcards: it can never be answered
            self._dropped(inbound, "bad_topic", f"cannot publish to {answer.topic!r} ({exc})")
            self._finish(inbound)
            return
        # read after the publish: a connection that went and came back before it must not count as lost (its
        # on_publish would then be kept as an early ack); one that goes from here on is seen in _track
        epoch = self._answers_epoch
        queued = info.rc == mqtt.MQTT_ERR_SUCCESS or (info.rc == mqtt.MQTT_ERR_NO_CONN and answer.qos > 0)
        if not queued:  # paho did not keep it (QoS 0 while offline): the broker redelivers a QoS 1 input
            self._dropped(inbound, "not_queued", f"publish to {answer.topic} failed ({mqtt.error_string(info.rc)})")
            self._abandon()
            return
        self._track(info.mid, inbound, epoch)

    def _dropped(self, inbound: Inbound, reason: str, detail: str) -> None:
        self.metrics.answers_dropped.labels(inbound.delivery.route, reason).inc()
        self._warnings.log(logging.ERROR, f"drop:{reason}", "answer for %s not delivered: %s", inbound.topic, detail)

    def _track(self, mid: int, inbound: Inbound, epoch: int) -> None:
        """Remember which input an outgoing answer is for, unless its PUBACK came first. ``epoch`` is the answers
        connection's at the publish: a QoS 0 answer that the connection took with it between the publish and here
        missed ``_lost_at_disconnect``'s sweep, and no on_publish will come for it."""
        with self._lock:
            if mid in self._early_acks:
                self._early_acks.discard(mid)
                lost = False
            elif inbound.route.settings.qos == 0 and epoch != self._answers_epoch:
                lost = True
            else:
                self._pending[mid] = inbound
                return
        if lost:
            self._lost(inbound)
        else:
            self._finish(inbound)

    def _owes_nothing(self, mid: int) -> None:
        """A publish that answers no input: its PUBACK must not be kept as an early one, or once packet ids wrap
        (65535 publishes on) it would acknowledge the input of whichever answer gets that id, before its answer
        is with the broker."""
        with self._lock:
            if mid in self._early_acks:
                self._early_acks.discard(mid)
            else:
                self._unowed.add(mid)

    def _lost_at_disconnect(self) -> None:
        """paho drops QoS 0 answers still queued when the answers connection goes, without an on_publish: release
        their inputs (QoS 0 too, so nothing is redelivered) or they would hold flow-control room for good."""
        with self._lock:
            self._answers_epoch += 1
            # an answer goes out at its route's QoS (pipeline.result / error)
            lost = [self._pending.pop(mid) for mid, i in list(self._pending.items()) if i.route.settings.qos == 0]
        for inbound in lost:
            self._lost(inbound)

    def _lost(self, inbound: Inbound) -> None:
        """Its QoS 0 answer went with the answers connection: counted, and the input let go."""
        self._dropped(inbound, "connection_lost", "a QoS 0 answer was still queued when the connection went")
        self._abandon()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            if mid in self._unowed:
                self._unowed.discard(mid)
                return
            if mid not in self._pending:
                self._early_acks.add(mid)
                return
            inbound = self._pending.pop(mid)
        if getattr(reason, "is_failure", False):
            # MQTT 5: the broker refused our answer (not authorised...). Retrying cannot help and holding the input
            # would block flow control for good, so it is acknowledged, logged and counted.
            self._dropped(inbound, "refused", f"the broker refused it ({reason}); check the broker's ACL")
        self._finish(inbound)

    def _finish(self, inbound: Inbound) -> None:
        """The answer is with the broker (or none is owed): acknowledge the input."""
        delivery: Delivery = inbound.delivery
        current = delivery.generation == self._generation  # the lock would not make check and ack one step either
        if delivery.qos and current:  # after a reconnect the broker redelivers it; an old packet id could hit another
            self.client.ack(delivery.mid, delivery.qos)
        self._abandon()

    def _abandon(self) -> None:
        """Stop tracking an input (answered, or left unacknowledged for the broker to redeliver)."""
        with self._lock:
            self._unacked -= 1
            self._wake_intake()
            if self._unacked == 0:
                self._idle.notify_all()
