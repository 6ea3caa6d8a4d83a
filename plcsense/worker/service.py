"""The MQTT worker: subscribe to PLC topics, run models, publish results and errors, acknowledge late.

Delivery contract: inputs arrive at QoS 1 on a persistent session, and each input is acknowledged to the
broker only after its result (or error) has been accepted by the broker. A worker killed at any moment
therefore loses nothing: the broker redelivers every unacknowledged input when the worker comes back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from plcsense.models.bundle import Bundle, BundleError, load_bundle
from plcsense.models.inputs import InputError
from plcsense.worker.batching import MicroBatcher
from plcsense.worker.decoding import Decoded, decode, decode_metrics
from plcsense.worker.metrics import Metrics, serve_http
from plcsense.worker.settings import RouteSettings, Settings
from plcsense.worker.sparkplug import AliasTable, parse_topic
from plcsense.worker.windows import WindowStore, reading_time

log = logging.getLogger("plcsense.worker")

TOP_K = 5


@dataclass(slots=True)
class Job:
    """One received message on its way to an answer."""

    route: Route
    topic: str
    mid: int
    qos: int
    received: float
    generation: int = 0
    """The connection the input came on: its packet id means nothing on a later connection."""
    response_topic: str | None = None
    correlation: bytes | None = None
    decoded: Decoded | None = None


@dataclass
class Route:
    settings: RouteSettings
    bundle: Bundle | None = None
    load_error: str | None = None
    windows: WindowStore | None = None
    sparkplug: AliasTable | None = None
    batcher: MicroBatcher[Job] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.settings.name


def _template_regex(template: str, route: str) -> re.Pattern[str]:
    """A regex matching every topic a result/error template of ``route`` can produce (group ``topic``: the input)."""
    pattern, named = "", False
    for part in re.split(r"(\{topic\}|\{route\})", template):
        if part == "{topic}":
            pattern += ".+" if named else "(?P<topic>.+)"
            named = True
        else:
            pattern += re.escape(route) if part == "{route}" else re.escape(part)
    return re.compile(pattern + r"\Z")


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.routes = [Route(r) for r in settings.routes]
        self._output_patterns = [
            (r.topic, _template_regex(t, r.name)) for r in settings.routes for t in (r.result_topic, r.error_topic)
        ]
        self._generation = 0
        self._subscriptions: dict[int, str] = {}  # SUBSCRIBE mid -> filter, until the SUBACK says how it went
        self._subscribe_failed: list[str] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._pending: dict[int, Job | None] = {}  # outgoing publish mid -> the input it answers
        self._early_acks: set[int] = set()  # PUBACKs that beat the bookkeeping after publish()
        self._draining = False
        self._connected = threading.Event()
        self._http = None
        self.client = self._make_client()

    # ----------------------------------------------------------------- lifecycle
    def load_models(self) -> None:
        for route in self.routes:
            try:
                route.bundle = load_bundle(route.settings.model)
            except BundleError as exc:
                route.load_error = str(exc)
                log.error("route %s: %s; its messages get a model_unavailable error", route.name, exc)
                continue
            manifest = route.bundle.manifest
            spec = manifest.input
            if (route.settings.encoding == "image") != (spec.kind == "image"):
                route.load_error = (
                    f"encoding {route.settings.encoding} does not fit the model, which takes "
                    f"{'images' if spec.kind == 'image' else 'sensor windows'}"
                )
                route.bundle = None
                log.error("route %s: %s", route.name, route.load_error)
                continue
            if spec.kind == "sensor":
                r = route.settings
                route.windows = WindowStore(
                    spec.window,
                    len(spec.channels),
                    stride=r.window_stride,
                    max_gap_s=r.max_gap_s,
                    max_devices=r.max_devices,
                )
            if route.settings.encoding == "sparkplug":
                route.sparkplug = AliasTable(route.settings.max_devices)
            route.batcher = MicroBatcher(
                route.name, self._run_batch, route.settings.max_batch, route.settings.max_wait_ms / 1000
            )
            self.metrics.model_info.labels(route.name, manifest.name, manifest.version).set(1)
            log.info(
                "route %s: %s v%s (%s) on %s",
                route.name,
                manifest.name,
                manifest.version,
                manifest.task,
                route.settings.topic,
            )

    def ready(self) -> tuple[bool, str]:
        if not self._connected.is_set():
            return False, "not connected to the MQTT broker"
        broken = [f"{r.name}: {r.load_error}" for r in self.routes if r.bundle is None]
        if broken:
            return False, "models not loaded: " + "; ".join(broken)
        if self._subscribe_failed:
            return False, "subscriptions refused: " + "; ".join(self._subscribe_failed)
        if self._subscriptions:
            return False, "waiting for the broker to confirm subscriptions"
        if self._draining:
            return False, "shutting down"
        return True, "ready"

    def start(self) -> None:
        self.load_models()
        m = self.settings.metrics
        if m.port:
            self._http = serve_http(m.host, m.port, self.metrics, self.ready)
            log.info("metrics on http://%s:%d/metrics", m.host, m.port)
        s = self.settings.mqtt
        kwargs: dict[str, Any] = {}
        if s.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry_s
            props.ReceiveMaximum = s.max_inflight
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect_async(s.host, s.port, s.keepalive_s, **kwargs)
        self.client.loop_start()
        log.info("connecting to %s as %s (MQTT %s)", s.url, s.client_id, s.protocol)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop taking messages, answer what is in flight, go offline. Returns False if the drain timed out."""
        with self._lock:
            self._draining = True
            drained = self._idle.wait_for(lambda: self._inflight == 0, timeout)
        if not drained:
            log.warning(
                "%d messages still in flight after %.0f s; the broker will redeliver them",
                self._inflight,
                timeout,
            )
        for route in self.routes:
            if route.batcher:
                route.batcher.close(timeout=5)
        if self._connected.is_set():
            info = self.client.publish(self.settings.mqtt.status_topic, "offline", qos=1, retain=True)
            info.wait_for_publish(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()
        if self._http:
            self._http.shutdown()
            self._http.server_close()
        return drained

    # ----------------------------------------------------------------- MQTT plumbing
    def _make_client(self) -> mqtt.Client:
        s = self.settings.mqtt
        v5 = s.protocol == "5"
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
        )
        client.manual_ack_set(True)
        client.reconnect_delay_set(min_delay=max(1, round(s.reconnect_min_s)), max_delay=round(s.reconnect_max_s))
        client.max_inflight_messages_set(s.max_inflight)
        client.will_set(s.status_topic, "offline", qos=1, retain=True)
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
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.suppress_exceptions = True  # a bug in a callback must not end the MQTT loop
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s (check url, credentials and TLS files)", reason)
            return
        s = self.settings.mqtt
        log.info("connected to %s (session present: %s)", s.url, flags.session_present)
        with self._lock:
            self._generation += 1
            self._subscriptions.clear()
            self._subscribe_failed.clear()
        for route in self.routes:
            topic = route.settings.topic
            if s.protocol == "5":
                shared = bool(s.shared_group)
                if shared:
                    topic = f"$share/{s.shared_group}/{topic}"
                # No Local keeps our own results out; it is not allowed on shared subscriptions.
                _, mid = client.subscribe(topic, options=SubscribeOptions(qos=route.settings.qos, noLocal=not shared))
            else:
                _, mid = client.subscribe(topic, qos=route.settings.qos)
            self._subscriptions[mid] = topic
        self._track(client.publish(s.status_topic, "online", qos=1, retain=True).mid, None)
        self._connected.set()
        self.metrics.connected.set(1)

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

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()
        self.metrics.connected.set(0)
        if not self._draining:
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _is_own_output(self, topic: str) -> bool:
        """A result or error this worker (or a sibling) published for an input one of its routes takes."""
        for route_filter, pattern in self._output_patterns:
            match = pattern.match(topic)
            if match and ("topic" not in match.groupdict() or mqtt.topic_matches_sub(route_filter, match["topic"])):
                return True
        return False

    def _route_for(self, topic: str) -> Route | None:
        if topic == self.settings.mqtt.status_topic or self._is_own_output(topic):
            return None
        for route in self.routes:
            if mqtt.topic_matches_sub(route.settings.topic, topic):
                return route
        return None

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handle_message(client, msg)
        except Exception:  # nothing may escape into paho's network thread: it would stop the MQTT loop
            log.exception("unexpected failure handling a message on %s; it stays unacknowledged", msg.topic)

    def _handle_message(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        route = self._route_for(msg.topic)
        with self._lock:
            if self._draining:
                return  # not acknowledged: the broker keeps it for our next session
            if route is not None:
                self._inflight += 1
                self.metrics.inflight.set(self._inflight)
            generation = self._generation
        if route is None:  # our own output (or a stray topic): acknowledge and ignore
            client.ack(msg.mid, msg.qos)
            return
        props = getattr(msg, "properties", None)
        job = Job(
            route,
            msg.topic,
            msg.mid,
            msg.qos,
            time.monotonic(),
            generation,
            response_topic=getattr(props, "ResponseTopic", None),
            correlation=getattr(props, "CorrelationData", None),
        )
        self.metrics.messages.labels(route.name).inc()
        try:
            self._accept(job, msg.payload)
        except InputError as exc:
            self._publish_error(job, exc.code, exc.detail, exc.id)
        except Exception as exc:
            log.exception("route %s: unexpected failure on %s", route.name, msg.topic)
            self._publish_error(job, "internal", f"{type(exc).__name__}: {exc}")

    def _accept(self, job: Job, payload: bytes) -> None:
        route = job.route
        limit = route.settings.max_payload_bytes
        if len(payload) > limit:
            raise InputError("payload_too_large", f"payload is {len(payload)} bytes, limit is {limit}")
        if route.bundle is None:
            raise InputError("model_unavailable", route.load_error or "model not loaded")
        device = job.topic
        if route.sparkplug is not None:
            topic = parse_topic(job.topic)
            if topic is None:
                raise InputError("bad_sparkplug", "not a Sparkplug B topic (spBv1.0/<group>/<type>/<node>[/<device>])")
            if topic.message_type in ("NDEATH", "DDEATH", "NCMD", "DCMD"):
                with contextlib.suppress(InputError):  # lifecycle messages: forget the aliases, nothing to answer
                    route.sparkplug.decode(topic, payload)
                if topic.message_type.endswith("DEATH") and route.windows is not None:
                    # readings from before and after a rebirth must not share a window
                    route.windows.forget("/".join(p for p in topic.key if p))
                self._finish(job)
                return
            reading = route.sparkplug.decode(topic, payload)
            device = "/".join(p for p in topic.key if p)  # BIRTH and DATA of one device share a window
            seq = None if reading.seq is None else str(reading.seq)
            job.decoded = decode_metrics(reading.metrics, route.bundle.manifest, msg_id=seq, ts=reading.timestamp_ms)
        else:
            job.decoded = decode(payload, route.settings.encoding, route.bundle.manifest)
        if job.decoded.is_reading:
            assert route.windows is not None
            pushed = route.windows.push(device, job.decoded.array, reading_time(job.decoded.ts))
            self.metrics.windows.labels(route.name).set(len(route.windows))
            if pushed.gap_s is not None:
                limit = route.settings.max_gap_s
                raise InputError(
                    "window_reset",
                    f"{pushed.gap_s:.1f} s since the last reading (max_gap_s {limit}); "
                    "the window restarts with this reading",
                )
            if pushed.window is None:  # window still filling (or between strides): the reading is kept
                self._finish(job)
                return
            job.decoded.array = pushed.window
        assert route.batcher is not None
        route.batcher.submit(job)

    # ----------------------------------------------------------------- inference and answers
    def _run_batch(self, jobs: Sequence[Job]) -> None:
        bundle = jobs[0].route.bundle
        assert bundle is not None
        try:
            batch = np.stack([j.decoded.array for j in jobs])  # type: ignore[union-attr]
            started = time.perf_counter()
            outputs = bundle.model.predict(batch)
            self.metrics.inference.labels(bundle.label).observe(time.perf_counter() - started)
            self.metrics.batch_size.labels(bundle.label).observe(len(jobs))
        except Exception as exc:
            log.exception("inference failed for %s", bundle.label)
            for job in jobs:
                self._publish_error(job, "inference_failed", f"{type(exc).__name__}: {exc}")
            return
        for job, output in zip(jobs, outputs, strict=True):
            try:
                self._publish_result(job, bundle, output)
            except Exception as exc:
                log.exception("cannot build a result for %s", job.topic)
                self._publish_error(job, "internal", f"{type(exc).__name__}: {exc}")

    def _publish_result(self, job: Job, bundle: Bundle, output: np.ndarray) -> None:
        manifest = bundle.manifest
        decoded = job.decoded
        assert decoded is not None
        doc: dict[str, Any] = {
            "id": decoded.id,
            "topic": job.topic,
            "model": {"name": manifest.name, "version": manifest.version},
            "task": manifest.task,
        }
        if manifest.task == "classification":
            assert manifest.labels is not None
            order = np.argsort(output)[::-1][:TOP_K]
            doc["label"] = manifest.labels[order[0]]
            doc["score"] = round(float(output[order[0]]), 6)
            doc["top"] = [{"label": manifest.labels[i], "score": round(float(output[i]), 6)} for i in order]
        else:
            assert manifest.threshold is not None
            score = float(np.mean(output))
            doc["score"] = round(score, 6)
            doc["threshold"] = round(manifest.threshold, 6)
            doc["is_anomaly"] = score > manifest.threshold
            channels = manifest.input.channels  # type: ignore[union-attr]
            doc["channels"] = {name: round(float(v), 6) for name, v in zip(channels, output, strict=True)}
            if doc["is_anomaly"]:
                self.metrics.anomalies.labels(job.route.name).inc()
        doc["latency_ms"] = round((time.monotonic() - job.received) * 1000, 3)
        doc["ts"] = decoded.ts if decoded.ts is not None else time.time()
        topic = job.response_topic or job.route.settings.result_topic.format(topic=job.topic, route=job.route.name)
        self._publish(job, topic, doc)
        self.metrics.results.labels(job.route.name).inc()
        self.metrics.latency.labels(job.route.name).observe(time.monotonic() - job.received)

    def _publish_error(self, job: Job, code: str, detail: str, msg_id: str | None = None) -> None:
        self.metrics.errors.labels(job.route.name, code).inc()
        log.warning("route %s: %s on %s: %s", job.route.name, code, job.topic, detail)
        doc = {
            "error": code,
            "detail": detail,
            "topic": job.topic,
            "id": job.decoded.id if job.decoded else msg_id,
            "ts": time.time(),
        }
        topic = job.response_topic or job.route.settings.error_topic.format(topic=job.topic, route=job.route.name)
        self._publish(job, topic, doc)

    def _publish(self, job: Job, topic: str, doc: dict[str, Any]) -> None:
        props = None
        if job.correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = job.correlation
        qos = job.route.settings.qos
        try:
            info = self.client.publish(topic, json.dumps(doc, separators=(",", ":")), qos=qos, properties=props)
        except (ValueError, TypeError) as exc:  # e.g. a response topic with wildcards
            log.error("cannot publish to %r (%s); the input stays unacknowledged", topic, exc)
            self._abandon(job)
            return
        queued = info.rc == mqtt.MQTT_ERR_SUCCESS or (info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0)
        if not queued:  # paho did not keep it: leave the input unacknowledged, the broker redelivers it
            log.error("publish to %s failed (%s); the input stays unacknowledged", topic, mqtt.error_string(info.rc))
            self._abandon(job)
            return
        self._track(info.mid, job)

    def _track(self, mid: int, job: Job | None) -> None:
        """Remember which input an outgoing publish answers (None: a publish of our own, nothing to ack)."""
        with self._lock:
            if mid not in self._early_acks:
                self._pending[mid] = job
                return
            self._early_acks.discard(mid)
        if job is not None:
            self._finish(job)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            if mid not in self._pending:
                self._early_acks.add(mid)
                return
            job = self._pending.pop(mid)
        if job is None:
            return
        if getattr(reason, "is_failure", False):  # MQTT 5: the broker refused our answer (not authorised...)
            log.error("broker refused the answer for %s (%s); the input stays unacknowledged", job.topic, reason)
            self._abandon(job)
            return
        self._finish(job)

    def _finish(self, job: Job) -> None:
        """The answer is with the broker (or none is owed): acknowledge the input."""
        with self._lock:
            current = job.generation == self._generation
        if job.qos and current:  # after a reconnect the broker redelivers it; an old packet id could hit another
            self.client.ack(job.mid, job.qos)
        self._abandon(job)

    def _abandon(self, job: Job) -> None:
        """Stop tracking ``job`` (answered, or left unacknowledged for the broker to redeliver)."""
        with self._lock:
            self._inflight -= 1
            self.metrics.inflight.set(self._inflight)
            if self._inflight == 0:
                self._idle.notify_all()
