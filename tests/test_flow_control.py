"""Faults found by an independent fault run, each against a real Mosquitto: unbounded intake, image bombs,
silent connection failures, wrong error codes and ignored inputs."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from plcsense.harness import free_port, start_broker
from tests.conftest import WINDOW, Collector, mqtt_client, publish_all, wait_metric
from tests.test_worker import readings, sensor_route, settled


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    return buffer.getvalue()


class PeakGauge:
    """Scrapes one gauge of a worker every few milliseconds and keeps the largest value seen."""

    def __init__(self, worker, name: str) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(worker, name), daemon=True)
        self._thread.start()

    def _run(self, worker, name: str) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, worker.metric(name))
            time.sleep(0.01)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def test_intake_is_bounded_whatever_the_broker_does(broker, sensor_bundle, run_worker, collectors):
    """Mosquitto 2.0.11 stops enforcing Receive Maximum once acks flow: the worker must bound itself, and still
    answer every input on the live connection."""
    max_inflight = 16
    worker = run_worker(broker, [sensor_route(sensor_bundle, encoding="npy")], max_inflight=max_inflight)
    out = Collector(broker, "plant/+/pump/result")
    collectors.append(out)
    window = npy(np.asarray(readings(WINDOW)))
    per_publisher = 2500
    peak = PeakGauge(worker, "plcsense_inflight_messages")
    publishers = [
        threading.Thread(target=publish_all, args=(broker, f"plant/d{p}/pump", [window] * per_publisher))
        for p in range(3)
    ]
    for t in publishers:
        t.start()
    for t in publishers:
        t.join()
    answered = out.wait(3 * per_publisher, timeout=120)
    highest = peak.stop()
    assert len(answered) == 3 * per_publisher
    assert 0 < highest <= 2 * max_inflight, highest
    assert worker.metric("plcsense_intake_saturations_total") > 0
    assert settled(worker) == 0
    assert worker.get("/readyz")[0] == 200


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` 16-bit greyscale, with a little compressed data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 200_000))
        + chunk(b"IEND", b"")
    )


def _jpeg_claiming(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_image_bombs_get_errors_and_do_not_delay_other_routes(
    broker, sensor_bundle, image_bundle, run_worker, collectors
):
    run_worker(
        broker,
        [
            sensor_route(sensor_bundle, encoding="npy"),
            {"name": "cam", "topic": "line/+/cam", "model": str(image_bundle), "encoding": "image"},
        ],
    )
    out = Collector(broker, "#")
    collectors.append(out)
    bombs = [_png_header_claiming(11000, 11000)] * 10 + [_jpeg_claiming(11000, 11000)]
    cam = mqtt_client(broker)
    for bomb in bombs:
        cam.publish("line/1/cam", bomb, qos=1)
    sent = time.monotonic()
    publish_all(broker, "plant/d1/pump", [npy(np.asarray(readings(WINDOW)))])
    result = out.wait(1, "pump/result", timeout=10)
    assert result and time.monotonic() - sent < 1.0
    errors = out.wait_for(len(bombs), "cam/error", timeout=30)
    assert [e["error"] for e in errors] == ["image_too_large"] * len(bombs)
    assert not out.json("cam/result")


def test_connection_failures_are_logged_with_their_cause(broker, sensor_bundle, run_worker):
    """Nothing listens on the port: the log names the cause once, /readyz carries it, a metric counts it."""
    worker = run_worker(broker, [sensor_route(sensor_bundle)], start=False, url=f"mqtt://127.0.0.1:{free_port()}")
    worker.start(wait=False)
    assert wait_metric(worker, "plcsense_mqtt_connect_failures_total", 2, reason="refused") >= 2
    status, body = worker.get("/readyz")
    assert status == 503 and "nothing accepts connections" in body
    assert worker.log().count("nothing accepts connections") == 1, worker.log()


def test_untrusted_broker_certificate_is_explained(tmp_path, tls_broker, sensor_bundle, run_worker):
    other = start_broker(tmp_path / "other", tls=True, auth=True)  # its own CA, not the one tls_broker uses
    try:
        worker = run_worker(tls_broker, [sensor_route(sensor_bundle)], start=False, **{"ca_file": str(other.ca_file)})
        worker.start(wait=False)
        assert wait_metric(worker, "plcsense_mqtt_connect_failures_total", 1, reason="tls_untrusted") >= 1
        status, body = worker.get("/readyz")
        assert status == 503 and "mqtt.ca_file" in body
    finally:
        other.stop()


def test_a_wrong_password_is_named_as_the_cause(tls_broker, sensor_bundle, run_worker):
    """paho hangs up after a refused CONNACK: that must not overwrite the refusal with "closed before accepting"."""
    worker = run_worker(tls_broker, [sensor_route(sensor_bundle)], start=False, password="not-the-password")
    worker.start(wait=False)
    assert wait_metric(worker, "plcsense_mqtt_connect_failures_total", 2, reason="rejected") >= 2
    status, body = worker.get("/readyz")
    assert status == 503 and "check mqtt.username, mqtt.password" in body, body
    assert worker.metric("plcsense_mqtt_connect_failures_total", reason="closed") == 0


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"[" + b"9" * 5000 + b", 1, 2]", "invalid_json"),  # beyond Python's int conversion limit
        (b"[" + b"9" * 400 + b", 1, 2]", "non_finite"),  # fits an int, not a float
        (b"\x93NUMPY\x01\x00\x76\x00{'descr': '<f4', 'fortran_order': False, 'shape': (999999999999,), }", "bad_npy"),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4',", "bad_npy"),  # header cut short
    ],
)
def test_malformed_payloads_get_specific_codes_without_tracebacks(
    payload, code, broker, sensor_bundle, run_worker, collectors
):
    encoding = "npy" if payload.startswith(b"\x93NUMPY") else "json"
    worker = run_worker(broker, [sensor_route(sensor_bundle, encoding=encoding)])
    out = Collector(broker, "plant/#")
    collectors.append(out)
    publish_all(broker, "plant/d1/pump", [payload] * 5)
    errors = out.wait_for(5, "/error")
    assert [e["error"] for e in errors] == [code] * 5
    log = worker.log()
    assert "Traceback" not in log
    assert log.count(f"{code} on plant/d1/pump") == 1, "repeated warnings are rate-limited"


def test_status_topics_and_answers_are_ignored_and_counted(broker, sensor_bundle, run_worker, collectors):
    """With a ``#`` route, another worker's retained status and answers are not inputs; a sentinel shows that
    nothing was answered for them."""
    publish_all(broker, "plcsense/other-worker/status", ["online"], retain=True)
    worker = run_worker(broker, [{**sensor_route(sensor_bundle), "topic": "#"}])
    out = Collector(broker, "#")
    collectors.append(out)
    publish_all(broker, "plant/d1/pump/result", [b'{"id": "x"}'])
    publish_all(broker, "plant/d1/pump", [json.dumps({"id": "sentinel", "data": readings(WINDOW)})])
    assert out.wait_for_ids(["sentinel"])
    answers = [m.topic for m in out.messages if m.topic.endswith(("/result", "/error"))]
    assert answers == ["plant/d1/pump/result", "plant/d1/pump/result"]  # the PLC's, then the sentinel's own
    assert worker.metric("plcsense_ignored_messages_total", reason="output_topic") >= 2


def test_bad_ts_is_refused_not_echoed(broker, sensor_bundle, run_worker, collectors):
    run_worker(broker, [sensor_route(sensor_bundle)])
    out = Collector(broker, "plant/#")
    collectors.append(out)
    window = readings(WINDOW)
    publish_all(
        broker,
        "plant/d1/pump",
        [
            json.dumps({"id": "a", "data": window, "ts": "<script>"}),
            json.dumps({"id": "b", "data": window, "ts": {"nested": 1}}),
            json.dumps({"id": "c", "data": window, "ts": "2026-01-01T00:00:00Z"}),
        ],
    )
    errors = out.wait_for(2, "/error")
    assert [(e["id"], e["error"]) for e in errors] == [("a", "invalid_json"), ("b", "invalid_json")]
    assert [r["ts"] for r in out.wait_for(1, "/result")] == ["2026-01-01T00:00:00Z"]


def test_refused_client_certificate_is_explained(tmp_path, sensor_bundle, run_worker):
    """The broker asks for a client certificate the worker does not send: a TLS handshake failure, named as such."""
    mtls = start_broker(tmp_path / "mtls", require_client_cert=True)
    try:
        worker = run_worker(mtls, [sensor_route(sensor_bundle)], start=False)
        worker.start(wait=False)
        assert wait_metric(worker, "plcsense_mqtt_connect_failures_total", 1, reason="closed") >= 1
        status, body = worker.get("/readyz")
        assert status == 503 and "mqtt.cert_file" in body, body
        assert worker.log().count("mqtt.cert_file") == 1, "each cause is logged once, then summarised"
    finally:
        mtls.stop()


def test_a_tampered_bundle_takes_only_its_own_route_down(tmp_path, broker, sensor_bundle, run_worker, collectors):
    """An edited threshold breaks the bundle's seal: that route answers model_unavailable, the other one serves."""
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(sensor_bundle, tampered)
    manifest = tampered / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"threshold": ', '"threshold": 9'))
    routes = [
        sensor_route(sensor_bundle, encoding="npy"),
        {**sensor_route(tampered, encoding="npy"), "name": "edited", "topic": "plant/+/edited"},
    ]
    worker = run_worker(broker, routes, start=False)
    worker.start(wait=False)  # never ready: one route has no model
    assert wait_metric(worker, "plcsense_mqtt_connected", 1) == 1
    time.sleep(0.5)  # the SUBACK follows the CONNACK: give it a moment before publishing
    out = Collector(broker, "plant/#")
    collectors.append(out)
    window = npy(np.asarray(readings(WINDOW)))
    publish_all(broker, "plant/d1/edited", [window])
    publish_all(broker, "plant/d1/pump", [window])
    assert out.wait(1, "pump/result") and [e["error"] for e in out.wait_for(1, "edited/error")] == ["model_unavailable"]
    status, body = worker.get("/readyz")
    assert status == 503 and "edited: bundle" in body, body
