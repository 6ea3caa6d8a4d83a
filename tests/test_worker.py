"""The worker against a real Mosquitto: round trips, bad input, protocols, TLS, crashes and shutdown."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import WINDOW, Collector, mqtt_client, publish_all, wait_metric


def sensor_route(bundle: Path, **extra: object) -> dict:
    return {"name": "pump", "topic": "plant/+/pump", "model": str(bundle), "encoding": "json", **extra}


def settled(worker, timeout: float = 10) -> float:
    """In-flight count once every answer's PUBACK reached the worker (it may trail the answer a collector sees)."""
    deadline = time.monotonic() + timeout
    while (value := worker.metric("plcsense_inflight_messages")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def readings(n: int, seed: int = 1) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    a, b = np.sin(t / 8), 2 * np.cos(t / 8)
    rows = np.stack([a, b, 10 + a + b], axis=1) + 0.05 * rng.normal(size=(n, 3))
    return rows.round(5).tolist()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_sensor_readings_round_trip(broker, sensor_bundle, run_worker, collectors, protocol):
    worker = run_worker(broker, [sensor_route(sensor_bundle)], protocol=protocol)
    out = Collector(broker, "plant/#", protocol=protocol)
    collectors.append(out)
    rows = readings(40)
    payloads = [json.dumps({"data": r, "id": f"r{i}", "ts": 1000 + i}) for i, r in enumerate(rows)]
    publish_all(broker, "plant/p7/pump", payloads, protocol=protocol)

    expected = 40 - WINDOW + 1  # a result for every reading from the one that fills the window
    results = out.wait_for(expected, "/result")
    assert len(results) == expected
    assert [r["id"] for r in results] == [f"r{i}" for i in range(WINDOW - 1, 40)]
    first = results[0]
    assert first["topic"] == "plant/p7/pump"
    assert first["model"] == {"name": "pump", "version": "1"}
    assert first["task"] == "anomaly"
    assert first["ts"] == 1000 + WINDOW - 1
    assert isinstance(first["is_anomaly"], bool) and first["threshold"] > 0
    assert set(first["channels"]) == {"vibration", "current", "pressure"}
    assert not any(r["is_anomaly"] for r in results), "normal readings like the training data are not anomalies"
    assert worker.metric("plcsense_messages_total", route="pump") == 40
    assert worker.metric("plcsense_results_total", route="pump") == expected
    assert worker.metric("plcsense_mqtt_connected") == 1
    assert settled(worker) == 0

    # A reading far outside normal operation is flagged, and the deviating channel is named.
    publish_all(broker, "plant/p7/pump", [json.dumps([0.5, 1.0, 60.0])], protocol=protocol)
    flagged = out.wait_for(expected + 1, "/result")[-1]
    assert flagged["is_anomaly"] is True
    assert max(flagged["channels"], key=flagged["channels"].get) == "pressure"
    assert worker.metric("plcsense_anomalies_total", route="pump") >= 1


def test_sliding_windows_are_per_device(broker, sensor_bundle, run_worker, collectors):
    run_worker(broker, [sensor_route(sensor_bundle)])
    out = Collector(broker, "plant/+/pump/result")
    collectors.append(out)
    rows = readings(WINDOW + 2)
    half = WINDOW // 2 + 1
    publish_all(broker, "plant/a/pump", [json.dumps(r) for r in rows[:half]])
    publish_all(broker, "plant/b/pump", [json.dumps(r) for r in rows[:half]])
    # sentinel: a full window of a third device; answers keep arrival order, so once its result is here, any
    # result for a or b would be too
    publish_all(broker, "plant/s/pump", [json.dumps({"id": f"s{i}", "data": r}) for i, r in enumerate(rows[:WINDOW])])
    assert out.wait_for_ids([f"s{WINDOW - 1}"])
    assert {r["topic"] for r in out.json()} == {"plant/s/pump"}, "neither a nor b has a full window yet"
    publish_all(broker, "plant/a/pump", [json.dumps(r) for r in rows[half:]])
    results = [r for r in out.wait_for(4) if r["topic"] == "plant/a/pump"]
    assert len(results) == 3


def test_full_window_tensor_as_npy(broker, sensor_bundle, run_worker, collectors):
    run_worker(broker, [sensor_route(sensor_bundle, encoding="npy")])
    out = Collector(broker, "plant/#")
    collectors.append(out)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(readings(WINDOW), dtype=np.float32))
    publish_all(broker, "plant/x/pump", [buffer.getvalue()])
    [result] = out.wait_for(1, "/result")
    assert result["task"] == "anomaly" and result["id"] is None


def test_image_round_trip_and_top_k(broker, image_bundle, image_data, run_worker, collectors):
    worker = run_worker(
        broker, [{"name": "cam", "topic": "line/+/cam", "model": str(image_bundle), "encoding": "image"}]
    )
    out = Collector(broker, "line/#")
    collectors.append(out)
    files = [image_data / c / "000.png" for c in ("bright", "dark", "striped")]
    publish_all(broker, "line/1/cam", [f.read_bytes() for f in files])
    results = out.wait_for(3, "/result")
    assert [r["label"] for r in results] == ["bright", "dark", "striped"]
    for r in results:
        assert r["task"] == "classification"
        assert r["top"][0]["label"] == r["label"]
        assert abs(sum(t["score"] for t in r["top"]) - 1) < 1e-3
    assert worker.metric("plcsense_model_info", route="cam", model="parts", version="1") == 1


def test_bad_inputs_answered_with_errors(broker, sensor_bundle, image_bundle, run_worker, collectors):
    worker = run_worker(
        broker,
        [
            sensor_route(sensor_bundle, max_payload_bytes=2000),
            {"name": "cam", "topic": "line/+/cam", "model": str(image_bundle), "encoding": "image"},
        ],
    )
    out = Collector(broker, "#")
    collectors.append(out)
    bad_sensor = {
        "invalid_json": b'{"data": [1, 2,',
        "bad_shape": json.dumps({"data": [1, 2], "id": "short"}).encode(),
        "non_finite": b"[NaN, 1, 2]",
        "payload_too_large": json.dumps([0.1] * 1000).encode(),
    }
    for payload in bad_sensor.values():
        publish_all(broker, "plant/p1/pump", [payload])
    publish_all(broker, "line/1/cam", [b"\x89PNG\r\n\x1a\n broken"])
    publish_all(broker, "plant/p1/pump", [b'["a", "b", "c"]', b'{"id": 5}', b"[1e400, 0, 0]"])

    errors = out.wait_for(8, "/error")
    # answers keep arrival order within a route; routes run side by side (images decode off the network thread)
    sensor = [e for e in errors if e["topic"] == "plant/p1/pump"]
    assert [e["error"] for e in sensor] == [*bad_sensor, "bad_shape", "invalid_json", "non_finite"]
    assert sensor[1]["id"] == "short"
    assert [e["error"] for e in errors if e["topic"] == "line/1/cam"] == ["undecodable_image"]
    assert all(e["detail"] for e in errors)

    # still serving after all that
    publish_all(broker, "plant/p1/pump", [json.dumps(r) for r in readings(WINDOW)])
    assert len(out.wait_for(1, "/result")) == 1
    assert worker.metric("plcsense_messages_total", route="pump") == 7 + WINDOW
    assert worker.metric("plcsense_errors_total", route="pump", reason="non_finite") == 2
    assert worker.metric("plcsense_errors_total", route="cam", reason="undecodable_image") == 1
    assert settled(worker) == 0


def test_own_results_are_not_consumed(broker, sensor_bundle, run_worker, collectors):
    worker = run_worker(broker, [sensor_route(sensor_bundle, topic="plant/#", encoding="npy")])
    out = Collector(broker, "plant/#")
    collectors.append(out)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(readings(WINDOW), dtype=np.float32))
    publish_all(broker, "plant/x/pump", [buffer.getvalue(), b"not npy"])
    out.wait_for(1, "/error")
    publish_all(broker, "plant/y/pump", [buffer.getvalue()])  # sentinel: its result comes after any echo
    assert len(out.wait_for(2, "/result")) == 2
    assert len(out.json("/result")) == 2
    assert worker.metric("plcsense_messages_total", route="pump") == 3


def test_response_topic_and_correlation_data(broker, image_bundle, image_data, run_worker, collectors):
    run_worker(broker, [{"name": "cam", "topic": "line/+/cam", "model": str(image_bundle), "encoding": "image"}])
    out = Collector(broker, "replies/#")
    collectors.append(out)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "replies/plc7"
    props.CorrelationData = b"job-42"
    publish_all(broker, "line/1/cam", [(image_data / "dark" / "001.png").read_bytes()], properties=props)
    [reply] = out.wait_for(1)
    assert reply["label"] == "dark"
    assert out.messages[0].topic == "replies/plc7"
    assert out.messages[0].properties.CorrelationData == b"job-42"

    # a response topic the worker takes as input would feed the answer back in: the route's own topic instead
    own = Collector(broker, "line/#")
    collectors.append(own)
    props.ResponseTopic = "line/2/cam"
    publish_all(broker, "line/1/cam", [(image_data / "dark" / "002.png").read_bytes()], properties=props)
    [answer] = own.wait(1, "/result")
    assert answer.topic == "line/1/cam/result" and json.loads(answer.payload)["label"] == "dark"
    time.sleep(0.5)
    assert [m.topic for m in own.messages] == ["line/1/cam", "line/1/cam/result"], "nothing went to line/2/cam"


def test_tls_with_username_and_password(tls_broker, sensor_bundle, run_worker, collectors):
    worker = run_worker(tls_broker, [sensor_route(sensor_bundle)])
    out = Collector(tls_broker, "plant/#")
    collectors.append(out)
    publish_all(tls_broker, "plant/p1/pump", [json.dumps(r) for r in readings(WINDOW)])
    assert len(out.wait_for(1, "/result")) == 1
    assert worker.metric("plcsense_mqtt_connected") == 1


def test_availability_topic(broker, sensor_bundle, run_worker, collectors):
    worker = run_worker(broker, [sensor_route(sensor_bundle)], client_id="line3")
    status = Collector(broker, "plcsense/line3/status")
    collectors.append(status)
    assert status.wait(1) and status.messages[0].payload == b"online"
    assert status.messages[0].retain
    worker.kill()  # no clean disconnect: the broker publishes the will
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and status.messages[-1].payload != b"offline":
        time.sleep(0.1)
    assert status.messages[-1].payload == b"offline"


def test_kill_9_loses_nothing(broker, image_bundle, image_data, run_worker, collectors):
    """Messages in flight when the worker dies are redelivered by the broker and answered after restart."""
    route = {"name": "cam", "topic": "line/+/cam", "model": str(image_bundle), "encoding": "image", "max_batch": 4}
    worker = run_worker(broker, [route], client_id="crashy")
    worker.kill()  # the broker now holds a persistent session with the subscription: inputs queue up there
    out = Collector(broker, "line/+/cam/result")
    collectors.append(out)
    image = (image_data / "striped" / "003.png").read_bytes()
    total = 1500
    props = []
    for i in range(total):
        p = Properties(PacketTypes.PUBLISH)
        p.CorrelationData = str(i).encode()
        props.append(p)
    sender = mqtt_client(broker)
    for info in [sender.publish("line/1/cam", image, qos=1, properties=p) for p in props]:
        info.wait_for_publish(20)
    sender.disconnect()
    sender.loop_stop()

    worker.start(wait=False)  # not until /readyz: the queued inputs arrive with the session, before that says 200
    out.wait_for(1)  # killed at its first answer: the worker answers thousands of these tiny images a second
    worker.kill()
    answered_before = len(out.messages)
    assert answered_before < total, "the worker finished before it was killed; the test proved nothing"
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len({m.properties.CorrelationData for m in out.messages}) < total:
        time.sleep(0.2)
    seen = {m.properties.CorrelationData for m in out.messages}
    assert len(seen) == total, f"{total - len(seen)} messages never answered ({answered_before} before the kill)"
    assert all(json.loads(m.payload)["label"] == "striped" for m in out.messages)


def test_sigterm_drains_and_exits_zero(broker, sensor_bundle, run_worker, collectors):
    route = sensor_route(sensor_bundle, encoding="npy")
    worker = run_worker(broker, [route], client_id="drainer")
    out = Collector(broker, "plant/+/pump/result")
    status = Collector(broker, "plcsense/drainer/status")
    collectors.extend([out, status])
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(readings(WINDOW), dtype=np.float32))
    total = 1000
    publish_all(broker, "plant/x/pump", [buffer.getvalue()] * total)
    out.wait_for(10)
    assert worker.terminate() == 0
    assert "still in flight" not in worker.log()
    assert status.messages[-1].payload == b"offline"
    answered = len(out.messages)
    worker.start()  # whatever it had not taken yet is still queued for its session
    assert len(out.wait_for(total, timeout=60)) >= total
    assert answered <= total


def test_reconnects_after_broker_restart(tmp_path, sensor_bundle, run_worker, collectors):
    from tests.broker import start_broker

    broker = start_broker(tmp_path / "persistent", persistence=True)
    try:
        worker = run_worker(broker, [sensor_route(sensor_bundle, encoding="npy")], reconnect_max_s=2)
        window = io.BytesIO()
        np.save(window, np.asarray(readings(WINDOW), dtype=np.float32))
        client = mqtt_client(broker)  # a PLC's last window, retained on its topic
        client.publish("plant/r/pump", window.getvalue(), qos=1, retain=True).wait_for_publish(5)
        client.disconnect()
        assert wait_metric(worker, "plcsense_results_total", 1, route="pump") == 1
        broker.restart()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and worker.metric("plcsense_mqtt_connected") != 1:
            time.sleep(0.2)
        out = Collector(broker, "plant/+/pump/result")
        collectors.append(out)
        publish_all(broker, "plant/x/pump", [window.getvalue()])
        assert [r["topic"] for r in out.wait_for(1)] == ["plant/x/pump"]
        assert "disconnected from the broker" in worker.log()
        # the re-subscription of the kept session did not replay the retained window as a new input
        assert worker.metric("plcsense_results_total", route="pump") == 2
    finally:
        broker.stop()


def test_plc_topics_that_look_like_output_are_still_inputs(broker, sensor_bundle, run_worker, collectors):
    """Only a topic this worker could have produced for one of its inputs is skipped as its own output."""
    worker = run_worker(broker, [sensor_route(sensor_bundle, topic="plant/+/+", encoding="npy")])
    out = Collector(broker, "plant/#")
    collectors.append(out)
    window = io.BytesIO()
    np.save(window, np.asarray(readings(WINDOW), dtype=np.float32))
    publish_all(broker, "plant/p1/error", [window.getvalue()])  # a PLC's own alarm channel named "error"
    [result] = out.wait_for(1, "/result")
    assert result["topic"] == "plant/p1/error"
    publish_all(broker, "plant/p2/x", [window.getvalue()])  # sentinel: answered after anything our result caused
    assert len(out.wait_for(2, "/result")) == 2
    assert worker.metric("plcsense_messages_total", route="pump") == 2  # its result was not taken as input


def test_encoding_that_does_not_fit_the_model_is_not_ready(broker, sensor_bundle, run_worker):
    worker = run_worker(broker, [sensor_route(sensor_bundle, encoding="image")], start=False).start(wait=False)
    deadline = time.monotonic() + 30
    status, body = 0, ""
    while time.monotonic() < deadline:
        try:
            status, body = worker.get("/readyz")
            if status == 503 and "connected" not in body:
                break
        except OSError:
            pass
        time.sleep(0.2)
    assert status == 503 and "encoding image does not fit the model" in body
