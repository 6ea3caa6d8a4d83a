"""Model lifecycle: a repository of versions, hot swap without a lost input, refused versions, shadow, canary,
promote and rollback, against a real Mosquitto."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from plcsense.models.bundle import read_manifest, write_manifest
from plcsense.worker.metrics import Metrics
from plcsense.worker.pipeline import Answer, Inbound, Pipeline
from plcsense.worker.settings import Settings
from tests.conftest import WINDOW, Collector, mqtt_client, publish_all, wait_metric, write_sensor_csv
from tests.test_worker import readings


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sensor bundles of the same model: v1, v2 (another fit), and v3 taking a longer window."""
    from plcsense.training.sensors import SensorTrainConfig, train_sensor_anomaly

    root = tmp_path_factory.mktemp("versions")
    write_sensor_csv(root / "a.csv", seed=0)
    write_sensor_csv(root / "b.csv", seed=5)
    made = {}
    for version, csv, window in (("1", "a.csv", WINDOW), ("2", "b.csv", WINDOW), ("3", "a.csv", WINDOW + 10)):
        made[version] = root / f"v{version}"
        cfg = SensorTrainConfig(window=window, name="pump", version=version)
        train_sensor_anomaly([root / csv], made[version], cfg)
    return made


def start_with(worker, **top: object):
    """Start ``worker`` with top-level settings added to its config (run_worker's keywords go to ``mqtt``)."""
    worker.config.write_text(json.dumps({**json.loads(worker.config.read_text()), **top}))
    return worker.start()


def publish_version(repo: Path, bundle: Path, version: str) -> None:
    """How an operator (or an init container) rolls out: copy beside, then rename into place in one step."""
    staging = repo / f".{version}.partial"
    shutil.copytree(bundle, staging)
    staging.rename(repo / version)


def route(repo: Path, **extra: object) -> dict:
    return {"name": "pump", "topic": "plant/+/pump", "model": str(repo), "encoding": "json", **extra}


def window_doc(i: int | str, shift: float = 0.0) -> str:
    return json.dumps({"id": str(i), "data": (np.asarray(readings(WINDOW)) + shift).tolist()})


def test_hot_swap_under_load_with_three_workers(tmp_path, broker, versions, run_worker, collectors):
    repo = tmp_path / "repo" / "pump"
    repo.mkdir(parents=True)
    publish_version(repo, versions["1"], "1")
    poll_s = 0.5
    r = route(repo, full_windows=True)
    workers = [
        start_with(
            run_worker(broker, [r], start=False, client_id=f"site-w{i}", shared_group="pumps"),
            models={"poll_s": poll_s},
        )
        for i in range(3)
    ]
    out = Collector(broker, "plant/+/pump/+")
    collectors.append(out)
    total, rate = 1500, 400.0
    sent_at: dict[str, float] = {}
    swapped_at: list[float] = []

    def publish() -> None:
        client = mqtt_client(broker)
        start = time.monotonic()
        for i in range(total):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            if i == total // 2:
                publish_version(repo, versions["2"], "2")
                swapped_at.append(time.monotonic())
            sent_at[str(i)] = time.monotonic()
            infos.append(client.publish(f"plant/d{i % 10}/pump", window_doc(i), qos=1))
        # paho keeps what is past its in-flight window (20) queued in the client, and a disconnect before the broker
        # has acknowledged it all drops the rest (one full-suite run missed inputs this way: never sent, not lost)
        for info in infos:
            info.wait_for_publish(30)
        client.disconnect()

    infos: list = []
    publisher = threading.Thread(target=publish)
    publisher.start()
    publisher.join()
    assert all(info.is_published() for info in infos), "the broker did not acknowledge every input"
    ids = [str(i) for i in range(total)]
    assert out.wait_for_ids(ids, timeout=60), sorted(set(ids) - out.answers.by_id.keys(), key=int)[:20]
    answers = out.answers.by_id
    assert not out.json("/error"), out.json("/error")[:3]
    version = {i: answers[i].doc["model"]["version"] for i in answers}
    assert {version[str(i)] for i in range(total // 2 - 50)} == {"1"}
    late = [i for i, t in sent_at.items() if t > swapped_at[0] + poll_s + 0.5]
    assert late and {version[i] for i in late} == {"2"}, "every worker switched within one poll"
    for w in workers:
        assert w.metric("plcsense_model_info", route="pump", model="pump", version="2") == 1
        assert w.metric("plcsense_model_info", route="pump", model="pump", version="1") == 0
        assert w.metric("plcsense_model_loads_total", route="pump", outcome="loaded") == 2


def _seal_edit(bundle: Path, edit) -> None:
    manifest = read_manifest(bundle)
    edit(bundle, manifest)
    write_manifest(bundle, manifest)


def _golden_that_fails(bundle: Path, manifest) -> None:
    with np.load(bundle / "golden.npz") as golden:
        inputs, outputs = golden["inputs"], golden["outputs"]
    np.savez(bundle / "golden.npz", inputs=inputs, outputs=outputs + 1.0)


def _wrong_input_shape(bundle: Path, manifest) -> None:
    manifest.input.window = WINDOW + 5


@pytest.mark.parametrize(
    "breakage",
    [
        lambda b: (b / "manifest.json").write_text(
            (b / "manifest.json").read_text().replace('"threshold": ', '"threshold": 1')
        ),
        lambda b: _seal_edit(b, _golden_that_fails),
        lambda b: _seal_edit(b, _wrong_input_shape),
    ],
    ids=["bad-checksum", "failing-golden", "wrong-input-shape"],
)
def test_broken_version_is_refused_and_the_old_keeps_serving(
    tmp_path, broker, versions, run_worker, collectors, breakage
):
    repo = tmp_path / "repo" / "pump"
    repo.mkdir(parents=True)
    publish_version(repo, versions["1"], "1")
    worker = start_with(run_worker(broker, [route(repo, full_windows=True)], start=False), models={"poll_s": 0.3})
    out = Collector(broker, "plant/#")
    collectors.append(out)
    broken = tmp_path / "broken"
    shutil.copytree(versions["2"], broken)
    breakage(broken)
    publish_version(repo, broken, "2")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not worker.metric(
        "plcsense_model_loads_total", route="pump", outcome="refused"
    ):
        time.sleep(0.2)
    assert worker.metric("plcsense_model_loads_total", route="pump", outcome="refused") == 1
    publish_all(broker, "plant/d1/pump", [window_doc("after")])
    assert out.wait_for_ids(["after"])
    assert out.answers.by_id["after"].doc["model"]["version"] == "1"
    assert worker.get("/readyz")[0] == 200
    time.sleep(1)  # several polls: refused once, not again and again
    assert worker.metric("plcsense_model_loads_total", route="pump", outcome="refused") == 1


def test_shadow_candidate_reports_agreement_without_answering(tmp_path, broker, versions, run_worker, collectors):
    repo = tmp_path / "repo" / "pump"
    repo.mkdir(parents=True)
    publish_version(repo, versions["1"], "1")
    publish_version(repo, versions["2"], "2")
    worker = run_worker(broker, [route(repo, version="1", candidate="2", full_windows=True)])
    out = Collector(broker, "plant/#")
    collectors.append(out)
    publish_all(broker, "plant/d1/pump", [window_doc(i, shift=0.01 * i) for i in range(50)])
    assert out.wait_for_ids([str(i) for i in range(50)])
    assert {a.doc["model"]["version"] for a in out.answers.answers} == {"1"}
    # the shadow runs after its batch is answered: its figures may trail the answers by a moment
    tried = wait_metric(worker, "plcsense_shadow_inputs_total", 50, route="pump", version="2")
    agreed = worker.metric("plcsense_shadow_agreements_total", route="pump", version="2")
    assert tried == 50 and 0 <= agreed <= tried
    assert worker.metric("plcsense_shadow_score_difference_count", route="pump", version="2") == 50
    assert worker.metric("plcsense_inference_seconds_count", route="pump", model="pump", version="2") >= 1


def test_a_shadow_candidate_runs_after_its_batch_is_answered(tmp_path, versions):
    """The served answers never wait for the shadow: each candidate run sees its batch already answered."""
    repo = tmp_path / "repo" / "pump"
    repo.mkdir(parents=True)
    publish_version(repo, versions["1"], "1")
    publish_version(repo, versions["2"], "2")
    answered: list[Answer] = []
    settings = Settings(routes=[route(repo, version="1", candidate="2", full_windows=True, max_batch=8)])
    pipeline = Pipeline(settings, Metrics(), lambda i, a: answered.append(a))
    pipeline.load_models()
    r = pipeline.routes[0]
    seen: list[tuple[int, int]] = []  # (inputs the shadow has run so far, answers sent by then)
    model = r.candidate.bundle.model
    predict = model.predict

    def shadow_predict(inputs: np.ndarray) -> np.ndarray:
        seen.append(((seen[-1][0] if seen else 0) + len(inputs), len(answered)))
        return predict(inputs)

    model.predict = shadow_predict
    try:
        for i in range(40):
            assert pipeline.handle(Inbound("plant/d1/pump", window_doc(i).encode(), route=r)) is None
        deadline = time.monotonic() + 20
        while (not seen or seen[-1][0] < 40) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen and seen[-1][0] == 40 and len(answered) == 40
        assert all(shadowed <= sent for shadowed, sent in seen), seen
    finally:
        pipeline.close()


def test_canary_share_is_device_sticky_then_promote_and_rollback(tmp_path, broker, versions, run_worker, collectors):
    repo = tmp_path / "repo" / "pump"
    repo.mkdir(parents=True)
    publish_version(repo, versions["1"], "1")
    publish_version(repo, versions["2"], "2")
    percent = 30
    r = route(repo, version="1", candidate="2", candidate_mode="canary", canary_percent=percent, full_windows=True)
    worker = run_worker(broker, [r], client_id="canary-worker")
    out = Collector(broker, "plant/#")
    collectors.append(out)
    client = mqtt_client(broker)
    n, devices = 2000, 400
    for i in range(n):
        client.publish(f"plant/d{i % devices}/pump", window_doc(i), qos=1)
    assert out.wait_for_ids([str(i) for i in range(n)], timeout=60)
    by_device: dict[str, set[str]] = {}
    for answer in out.answers.answers:
        by_device.setdefault(answer.doc["topic"], set()).add(answer.doc["model"]["version"])
    assert all(len(v) == 1 for v in by_device.values()), "a device's readings stay on one model"
    share = sum(a.doc["model"]["version"] == "2" for a in out.answers.answers) / n
    assert abs(share - percent / 100) <= 0.05, share
    assert worker.metric("plcsense_canary_inputs_total", route="pump", version="2") == round(share * n)

    control = Collector(broker, "plcsense/canary-worker/control/reply")
    collectors.append(control)
    client.publish("plcsense/canary-worker/control", json.dumps({"command": "promote", "route": "pump"}), qos=1)
    assert control.wait_for(1)[0]["ok"]
    publish_all(broker, "plant/d1/pump", [window_doc("promoted")])
    assert out.wait_for_ids(["promoted"]) and out.answers.by_id["promoted"].doc["model"]["version"] == "2"
    client.publish("plcsense/canary-worker/control", json.dumps({"command": "rollback", "route": "pump"}), qos=1)
    reply = control.wait_for(2)[-1]
    assert reply["ok"] and "1" in reply["detail"]
    publish_all(broker, "plant/d1/pump", [window_doc("rolled-back")])
    assert out.wait_for_ids(["rolled-back"]) and out.answers.by_id["rolled-back"].doc["model"]["version"] == "1"
    client.disconnect()


def test_windows_survive_a_same_spec_swap_and_restart_on_another(tmp_path, versions):
    repo = tmp_path / "repo" / "pump"
    repo.mkdir(parents=True)
    publish_version(repo, versions["1"], "1")
    got: list[Answer] = []
    pipeline = Pipeline(Settings(routes=[route(repo)], models={"poll_s": 0}), Metrics(), lambda i, a: got.append(a))
    pipeline.load_models()
    r = pipeline.routes[0]
    rows = readings(WINDOW + 2)

    def feed(row: list[float]):
        return pipeline.handle(Inbound("plant/d1/pump", json.dumps(row).encode(), route=r))

    for row in rows[: WINDOW - 1]:
        feed(row)
    publish_version(repo, versions["2"], "2")  # same input spec: the window carries over
    pipeline.reload()
    assert r.serving.version == "2"
    assert feed(rows[WINDOW - 1]) is None  # completes the window begun under v1: on to inference
    publish_version(repo, versions["3"], "3")  # longer window: a new input spec
    pipeline.reload()
    reset = feed(rows[WINDOW])
    assert isinstance(reset, Answer) and json.loads(reset.body)["error"] == "window_reset"
    pipeline.close()


def test_capture_stays_bounded_and_trains_after_labelling(
    tmp_path, broker, image_bundle, image_data, run_worker, collectors
):
    import hashlib

    from plcsense.training.images import ImageTrainConfig, train_images

    captured = tmp_path / "captured"
    capture = {"dir": str(captured), "max_files": 30, "sample_percent": 100}
    worker = run_worker(
        broker,
        [{"name": "cam", "topic": "line/+/cam", "model": str(image_bundle), "encoding": "image", "capture": capture}],
    )
    out = Collector(broker, "line/#")
    collectors.append(out)
    truth: dict[str, str] = {}
    per_class = [sorted((image_data / c).glob("*.png")) for c in sorted(p.name for p in image_data.iterdir())]
    images = [files[i] for i in range(min(map(len, per_class))) for files in per_class]  # classes take turns
    payloads = []
    for path in images:
        data = path.read_bytes()
        truth[hashlib.sha256(data).hexdigest()] = path.parent.name
        payloads.append(data)
    publish_all(broker, "line/1/cam", payloads)
    assert len(out.wait(len(payloads), "/result", timeout=60)) == len(payloads)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and worker.metric("plcsense_captures_total", route="cam", outcome="written") < 30:
        time.sleep(0.1)
    files = [p for p in captured.rglob("*.png")]
    assert len(files) == 30, "within max_files under a sustained stream"
    assert worker.metric("plcsense_captures_total", route="cam", outcome="full") == len(payloads) - 30
    assert len((captured / "results.jsonl").read_text().splitlines()) == 30

    labelled = tmp_path / "labelled"  # the engineer's step: each file into the folder of its true class
    for f in files:
        target = labelled / truth[hashlib.sha256(f.read_bytes()).hexdigest()]
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target / f.name)
    bundle = train_images(
        labelled,
        tmp_path / "retrained",
        ImageTrainConfig(arch="scratch", image_size=16, epochs=2, batch_size=8, augment=None),
    )
    assert sorted(bundle.manifest.labels) == sorted(p.name for p in image_data.iterdir())


def test_captures_land_where_training_reads_them():
    """Every image format the worker decodes is saved under a suffix ``train images`` reads, and each answer's input
    goes to the folder of its verdict: a sensor classifier's label, an anomaly detector's normal/anomaly."""
    import io

    from PIL import Image

    from plcsense.training.data import IMAGE_SUFFIXES
    from plcsense.worker.capture import _folder, _image_suffix

    for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (90, 120, 30)).save(buffer, format=fmt)
        assert f".{_image_suffix(buffer.getvalue())}" in IMAGE_SUFFIXES, fmt
    assert _folder({"label": "stuck", "score": 0.9}) == "stuck"  # a sensor classifier's window
    assert _folder({"is_anomaly": True, "score": 3.0}) == "anomaly"
    assert _folder({"is_anomaly": False, "score": 0.1}) == "normal"
    assert _folder({"label": "stuck", "unknown": True}) == "unknown"
    assert _folder({"label": ".."}) == "unlabelled" and _folder({"label": "a/b"}) == "a_b"


def test_version_folder_must_match_the_manifest_and_a_trial_can_end(tmp_path, versions):
    repo = tmp_path / "repo" / "pump"
    repo.mkdir(parents=True)
    publish_version(repo, versions["1"], "1")
    publish_version(repo, versions["2"], "7")  # a bundle of version 2 under another name
    publish_version(repo, versions["2"], "2")
    metrics = Metrics()
    pipeline = Pipeline(Settings(routes=[route(repo, version="7", candidate="2")]), metrics, lambda i, a: None)
    pipeline.load_models()
    r = pipeline.routes[0]
    assert r.serving is None and "folder '7'" in r.load_error
    pipeline.close()

    pipeline = Pipeline(Settings(routes=[route(repo, version="1", candidate="2")]), Metrics(), lambda i, a: None)
    pipeline.load_models()
    r = pipeline.routes[0]
    assert r.candidate is not None and r.candidate.version == "2"
    assert pipeline.end_trial("pump") == "1" and r.candidate is None
    pipeline.reload()
    assert r.candidate is None and r.serving.version == "1", "an ended trial does not come back on the next poll"
    pipeline.close()


def test_a_version_or_candidate_on_a_single_bundle_is_refused_with_the_reason(tmp_path, versions):
    """``model`` naming one bundle has no versions: a pinned version would silently serve that bundle, and a
    candidate would shadow the model against itself."""
    bundle = tmp_path / "pump-bundle"
    shutil.copytree(versions["1"], bundle)
    pipeline = Pipeline(Settings(routes=[route(bundle, version="2")]), Metrics(), lambda i, a: None)
    pipeline.load_models()
    assert pipeline.routes[0].serving is None and "version '2' cannot apply" in pipeline.routes[0].load_error
    pipeline.close()
    pipeline = Pipeline(Settings(routes=[route(bundle, candidate="latest")]), Metrics(), lambda i, a: None)
    pipeline.load_models()
    r = pipeline.routes[0]
    assert r.serving is not None and r.candidate is None  # the model serves; the candidate is refused
    pipeline.close()


def test_a_candidate_that_no_longer_fits_the_serving_version_is_set_aside(tmp_path, versions):
    """The serving version moves on to another input (v3: a longer window): the shadow loaded beside v2 cannot run
    on v3's inputs and is refused, instead of failing on every batch."""
    repo = tmp_path / "repo" / "pump"
    repo.mkdir(parents=True)
    publish_version(repo, versions["1"], "1")
    publish_version(repo, versions["2"], "2")
    metrics = Metrics()
    pipeline = Pipeline(Settings(routes=[route(repo, candidate="1")], models={"poll_s": 0}), metrics, lambda i, a: 0)
    pipeline.load_models()
    r = pipeline.routes[0]
    try:
        assert r.serving.version == "2" and r.candidate is not None and r.candidate.version == "1"
        publish_version(repo, versions["3"], "3")
        pipeline.reload()
        assert r.serving.version == "3" and r.candidate is None
        assert (
            metrics.registry.get_sample_value("plcsense_model_loads_total", {"route": "pump", "outcome": "refused"})
            == 1
        )
    finally:
        pipeline.close()


def test_a_refused_rollback_says_so_and_a_new_copy_of_a_refused_version_is_tried_again(tmp_path, versions):
    repo = tmp_path / "repo" / "pump"
    repo.mkdir(parents=True)
    publish_version(repo, versions["1"], "1")
    (repo / "1" / "golden.npz").write_bytes(b"half a copy")  # v1 on disk is broken
    publish_version(repo, versions["2"], "2")
    pipeline = Pipeline(Settings(routes=[route(repo)], models={"poll_s": 0}), Metrics(), lambda i, a: None)
    pipeline.load_models()
    r = pipeline.routes[0]
    try:
        assert r.serving.version == "2"
        with pytest.raises(ValueError, match="version 1 was refused"):
            pipeline.rollback("pump")
        assert r.serving.version == "2" and r.policy == "latest", "a refused rollback changes nothing"
        shutil.rmtree(repo / "1")  # the operator copies v1 again, this time whole (same manifest as before)
        publish_version(repo, versions["1"], "1")
        assert pipeline.rollback("pump") == "1" and r.serving.version == "1"
    finally:
        pipeline.close()
