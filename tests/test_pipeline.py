"""The message path in-process (no broker), then worker paths against a real Mosquitto that had no test yet:
QoS 0 routes, ``{route}`` templates, ``window_stride``, answers refused by the broker (ACL), shared groups,
``/healthz`` and 404."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from plcsense.harness import start_broker
from plcsense.models.bundle import bundle_digest
from plcsense.worker.metrics import Metrics
from plcsense.worker.pipeline import NOTHING_OWED, Answer, Inbound, Pipeline
from plcsense.worker.settings import Settings
from plcsense.worker.transport import Delivery
from tests.conftest import WINDOW, Collector, mqtt_client, publish_all
from tests.test_worker import readings, sensor_route, settled


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, np.float32))
    return buffer.getvalue()


class Answers:
    """The pipeline's ``on_answer``: what inference answered, in order."""

    def __init__(self) -> None:
        self.got: list[Answer] = []
        self.arrived = threading.Condition()

    def __call__(self, inbound: Inbound, answer: Answer) -> None:
        with self.arrived:
            self.got.append(answer)
            self.arrived.notify_all()

    def wait(self, n: int) -> list[dict]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.got) >= n, 10)
        return [json.loads(a.body) for a in self.got]


def pipeline_for(route: dict) -> tuple[Pipeline, Answers]:
    answers = Answers()
    pipeline = Pipeline(Settings(routes=[route]), Metrics(), answers)
    pipeline.load_models()
    return pipeline, answers


def inbound(pipeline: Pipeline, topic: str, payload: bytes) -> Inbound:
    return Inbound(topic, payload, route=pipeline.route_for(topic))


def test_pipeline_outcomes_without_a_broker(sensor_bundle):
    pipeline, answers = pipeline_for(sensor_route(sensor_bundle))
    try:
        rows = readings(WINDOW)
        for row in rows[:-1]:  # filling the window: nothing owed yet
            assert pipeline.handle(inbound(pipeline, "plant/d1/pump", json.dumps(row).encode())) is NOTHING_OWED
        last = json.dumps({"id": "full", "data": rows[-1]}).encode()
        assert pipeline.handle(inbound(pipeline, "plant/d1/pump", last)) is None  # on to inference
        [result] = answers.wait(1)
        assert result["id"] == "full" and result["task"] == "anomaly" and answers.got[0].topic == "plant/d1/pump/result"

        bad = pipeline.handle(inbound(pipeline, "plant/d1/pump", b"[1, 2"))
        assert isinstance(bad, Answer) and bad.topic == "plant/d1/pump/error"
        assert json.loads(bad.body)["error"] == "invalid_json"
        assert pipeline.route_for("plant/d1/pump/result") is None  # our own answer, not an input
        assert pipeline.route_for("plcsense/other/status") is None
    finally:
        pipeline.close()


def test_a_model_output_that_overflows_is_an_error_not_a_normal_result(sensor_bundle):
    """Readings near float32's limit pass the input checks but overflow the model; its NaN or infinite score must
    not come out as "is_anomaly": false (NaN > threshold is False) or crash the batch."""
    pipeline, answers = pipeline_for(sensor_route(sensor_bundle, full_windows=True))
    try:
        huge = np.full((WINDOW, 3), 3.0e38, np.float32)
        huge[::2] *= -1
        good = {"id": "good", "data": readings(WINDOW)}
        for payload in ({"id": "huge", "data": huge.tolist()}, good):
            assert pipeline.handle(inbound(pipeline, "plant/d1/pump", json.dumps(payload).encode())) is None
        overflowed, fine = answers.wait(2)
        assert overflowed["id"] == "huge" and overflowed["error"] == "inference_failed"
        assert "not finite" in overflowed["detail"]
        assert fine["id"] == "good" and fine["score"] >= 0 and "error" not in fine
        errors = {"route": "pump", "reason": "inference_failed"}
        assert pipeline.metrics.registry.get_sample_value("plcsense_errors_total", errors) == 1
    finally:
        pipeline.close()


def test_pinned_digest_refuses_another_bundle(sensor_bundle, image_bundle):
    pinned = bundle_digest(sensor_bundle)
    good, _ = pipeline_for(sensor_route(sensor_bundle, model_digest=pinned))
    assert good.broken_routes == []
    good.close()
    wrong, _ = pipeline_for({**sensor_route(image_bundle, model_digest=pinned), "encoding": "image"})
    assert wrong.broken_routes and "pinned" in wrong.broken_routes[0]
    answer = wrong.handle(inbound(wrong, "plant/d1/pump", b"x"))
    assert isinstance(answer, Answer) and json.loads(answer.body)["error"] == "model_unavailable"


# ----------------------------------------------------------------------------- through a real broker
def test_qos0_route_and_route_templates(broker, sensor_bundle, run_worker, collectors):
    route = sensor_route(
        sensor_bundle, encoding="npy", qos=0, result_topic="results/{route}", error_topic="errors/{route}"
    )
    worker = run_worker(broker, [route])
    out = Collector(broker, "#")
    collectors.append(out)
    client = mqtt_client(broker)
    client.publish("plant/d1/pump", npy(readings(WINDOW)), qos=0).wait_for_publish(5)
    client.publish("plant/d1/pump", b"not npy", qos=0).wait_for_publish(5)
    assert out.wait(1, "errors/pump")
    assert [m.qos for m in out.wait(1, "results/pump")] == [0]
    assert settled(worker) == 0


def test_window_stride_through_the_worker(broker, sensor_bundle, run_worker, collectors):
    run_worker(broker, [sensor_route(sensor_bundle, window_stride=5)])
    out = Collector(broker, "plant/+/pump/result")
    collectors.append(out)
    rows = readings(WINDOW + 20)
    publish_all(broker, "plant/d1/pump", [json.dumps({"id": i, "data": r}) for i, r in enumerate(rows)])
    last = str(len(rows) - 1)
    assert out.wait_for_ids([last])
    assert [r["id"] for r in out.json()] == [str(i) for i in range(WINDOW - 1, len(rows), 5)]


@pytest.fixture
def acl_broker(tmp_path: Path):
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite plant/#\ntopic readwrite plcsense/#\ntopic read denied/#\n")
    b = start_broker(tmp_path / "broker", extra_conf=[f"acl_file {acl}"])
    yield b
    b.stop()


def test_refused_answer_is_counted_and_its_input_released(acl_broker, sensor_bundle, run_worker, collectors):
    route = sensor_route(sensor_bundle, encoding="npy", result_topic="denied/{topic}")
    worker = run_worker(
        acl_broker, [route, {**sensor_route(sensor_bundle, encoding="npy"), "name": "ok", "topic": "plant/+/ok"}]
    )
    out = Collector(acl_broker, "plant/#")
    collectors.append(out)
    publish_all(acl_broker, "plant/d1/pump", [npy(readings(WINDOW))])
    publish_all(acl_broker, "plant/d1/ok", [npy(readings(WINDOW))])  # a sentinel on an allowed route
    assert out.wait(1, "ok/result")
    assert worker.metric("plcsense_answers_dropped_total", route="pump", reason="refused") == 1
    assert settled(worker) == 0


def test_shared_group_splits_the_load_between_two_workers(broker, sensor_bundle, run_worker, collectors):
    route = sensor_route(sensor_bundle, encoding="npy", full_windows=True)
    workers = [run_worker(broker, [route], client_id=f"member{i}", shared_group="pumps") for i in range(2)]
    out = Collector(broker, "plant/+/pump/result")
    collectors.append(out)
    window = readings(WINDOW)
    payloads = [npy(np.asarray(window) + i * 1e-3) for i in range(200)]
    publish_all(broker, "plant/d1/pump", payloads)
    assert len(out.wait(200)) >= 200
    taken = [w.metric("plcsense_messages_total", route="pump") for w in workers]
    assert sum(taken) == 200 and all(taken), taken


def test_healthz_and_unknown_paths(broker, sensor_bundle, run_worker):
    worker = run_worker(broker, [sensor_route(sensor_bundle)])
    assert worker.get("/healthz") == (200, "ok\n")
    status, body = worker.get("/nope")
    assert status == 404 and "/metrics" in body
    status, text = worker.get("/metrics")
    assert status == 200 and "plcsense_build_info" in text and "process_resident_memory_bytes" in text


def test_shared_group_refuses_a_windowed_route_unless_it_takes_whole_windows(sensor_bundle):
    shared = {"shared_group": "pumps"}
    windowed = Pipeline(Settings(mqtt=shared, routes=[sensor_route(sensor_bundle)]), Metrics(), Answers())
    windowed.load_models()
    assert windowed.broken_routes and "shared_group" in windowed.broken_routes[0]

    whole = Pipeline(
        Settings(mqtt=shared, routes=[sensor_route(sensor_bundle, full_windows=True)]), Metrics(), Answers()
    )
    whole.load_models()
    try:
        assert whole.broken_routes == []
        single = whole.handle(inbound(whole, "plant/d1/pump", json.dumps(readings(1)[0]).encode()))
        assert isinstance(single, Answer) and json.loads(single.body)["error"] == "bad_shape"
    finally:
        whole.close()


def test_json_logs(broker, sensor_bundle, run_worker, collectors):
    worker = run_worker(broker, [sensor_route(sensor_bundle)], start=False)
    worker.config.write_text(json.dumps({**yaml.safe_load(worker.config.read_text()), "log_format": "json"}))
    worker.start()
    out = Collector(broker, "plant/#")
    collectors.append(out)
    publish_all(broker, "plant/d1/pump", [b"[1, 2"])
    assert out.wait(1, "/error")
    records = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert any(r["level"] == "WARNING" and "invalid_json" in r["message"] for r in records), worker.log()


def test_compiled_topic_filters_agree_with_paho():
    import paho.mqtt.client as mqtt

    from plcsense.worker.topics import TopicFilter

    filters = ["#", "+", "a/#", "a/+", "a/+/c", "+/b/#", "a/b", "$SYS/#", "+/+", "a/+/#", "/+", "+/", "a//b", "a.b/+"]
    topics = ["a", "a/b", "a/b/c", "a/x/c", "b", "$SYS/x", "$SYS", "/a", "a/", "a//b", "x/b/y", "/", "a/b/c/d", "aab/x"]
    for f in filters:
        for t in topics:
            assert TopicFilter(f).matches(t) == mqtt.topic_matches_sub(f, t), (f, t)


def test_shared_group_members_stopped_and_scaled_away_lose_nothing(broker, sensor_bundle, run_worker, collectors):
    """Three members; one is stopped a third of the way in, another scaled away at two thirds (SIGTERM: it
    unsubscribes, answers what it was given, ends its session). Every input is answered by someone."""
    route = sensor_route(sensor_bundle, full_windows=True)
    workers = [run_worker(broker, [route], client_id=f"member{i}", shared_group="pumps") for i in range(3)]
    out = Collector(broker, "plant/+/pump/+")
    collectors.append(out)
    client = mqtt_client(broker)
    total, rate = 1500, 300.0
    window = readings(WINDOW)
    start = time.monotonic()
    for i in range(total):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        if i in (total // 3, 2 * total // 3):
            threading.Thread(target=workers[0 if i == total // 3 else 1].terminate).start()
        client.publish(f"plant/d{i % 7}/pump", json.dumps({"id": str(i), "data": window}), qos=1)
    assert out.wait_for_ids([str(i) for i in range(total)], timeout=60), total - len(out.answers.by_id)
    assert not out.json("/error")
    assert [w.proc.wait(30) for w in workers[:2]] == [0, 0]
    client.disconnect()


def test_control_replies_and_lost_qos0_answers_leave_no_bookkeeping_behind(broker, sensor_bundle, collectors):
    """A control reply answers no input: its PUBACK must not stay behind as an "early" one (once packet ids wrap
    it would acknowledge another input before that input's answer was with the broker). And QoS 0 answers that
    paho drops at a reconnect (no on_publish follows) must give their flow-control room back."""
    from plcsense.worker.service import Worker

    settings = Settings(
        mqtt={**broker.mqtt_settings(), "client_id": "books"},
        routes=[sensor_route(sensor_bundle, qos=0, full_windows=True)],
        metrics={"port": 0},
    )
    worker = Worker(settings)
    worker.start()
    transport = worker.transport
    try:
        replies = Collector(broker, "plcsense/books/control/reply")
        collectors.append(replies)
        assert _until(lambda: transport.ready()[0])
        client = mqtt_client(broker)
        client.publish("plcsense/books/control", json.dumps({"command": "reload"}), qos=1).wait_for_publish(5)
        assert replies.wait_for(1)[0]["ok"]
        assert _until(lambda: not transport._unowed and not transport._early_acks), (
            transport._unowed,
            transport._early_acks,
        )

        # a QoS 0 answer paho still held when the answers connection went: a real disconnect, a queued answer
        with transport._lock:
            transport._unacked += 1  # taken (settle() would count it answered once it had published)
        route = worker.pipeline.routes[0]
        queued = Inbound("plant/d1/pump", b"{}", delivery=Delivery(1, 0, 1, "pump"), route=route)
        epoch = transport._answers_epoch
        transport._track(60_000, queued, epoch)
        broker.restart()
        assert _until(lambda: transport._unacked == 0 and not transport._pending, timeout=20)
        dropped = {"route": "pump", "reason": "connection_lost"}
        assert worker.metrics.registry.get_sample_value("plcsense_answers_dropped_total", dropped) == 1
        # one published before that disconnect but tracked after its sweep: no on_publish will come for it either
        with transport._lock:
            transport._unacked += 1
        transport._track(60_001, queued, epoch)
        assert transport._unacked == 0 and not transport._pending
        assert worker.metrics.registry.get_sample_value("plcsense_answers_dropped_total", dropped) == 2
    finally:
        worker.stop(timeout=5)


def _until(condition, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_member_leaving_a_shared_group_answers_what_the_broker_still_had_queued_for_it(
    broker, sensor_bundle, run_worker, collectors
):
    """A burst larger than the broker's in-flight window queues most of a member's share in its session; when
    that member is scaled away it must answer those too (the broker keeps sending them after the UNSUBACK, and
    they die with the session it ends), not only those already in flight."""
    route = sensor_route(sensor_bundle, full_windows=True)
    leaving, staying = (run_worker(broker, [route], client_id=f"burst{i}", shared_group="pumps") for i in range(2))
    out = Collector(broker, "plant/+/pump/+")
    collectors.append(out)
    client = mqtt_client(broker)
    window = readings(WINDOW)
    total = 1200
    assert _until(lambda: leaving.metric("plcsense_mqtt_connected") == 1 and staying.metric("plcsense_mqtt_connected"))
    os.kill(leaving.proc.pid, signal.SIGSTOP)  # its share piles up in its session: in flight, then queued
    try:
        infos = [
            client.publish(f"plant/d{i % 7}/pump", json.dumps({"id": str(i), "data": window}), qos=1)
            for i in range(total)
        ]
        for info in infos:
            info.wait_for_publish(30)
        leaving.proc.send_signal(signal.SIGTERM)  # scaled away: handled as soon as it runs again
    finally:
        os.kill(leaving.proc.pid, signal.SIGCONT)
    assert out.wait_for_ids([str(i) for i in range(total)], timeout=90), total - len(out.answers.by_id)
    assert leaving.proc.wait(60) == 0
    assert staying.metric("plcsense_messages_total", route="pump") < total, "the leaving member had a share"
    client.disconnect()
