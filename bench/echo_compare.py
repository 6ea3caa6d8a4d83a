"""``plcsense serve`` beside a no-inference echo worker on one private Mosquitto, with the ratios, in one run.

    .venv/bin/python bench/echo_compare.py [--messages 20000] [--repeat 5] [--images 600] [--no-images] [--out F]

Sensor table: 8 devices publish 8-float JSON readings (``{"id": .., "data": [8 floats]}``, SKAB's anomaly-free
recording) at QoS 1. Each worker answers on ``{topic}/result``:

- echo: paho-mqtt 2, MQTT 5, persistent session, Receive Maximum (64 as plcsense's default, and 1000), no
  inference; it acknowledges an input only once the broker has accepted its reply (as plcsense does); replies
  on the input connection, or on a second one as plcsense does. The fastest echo row is the reference.
  (Mosquitto before 2.0.13 stops honouring Receive Maximum once acks flow: ``mosquitto -h`` tells the version.)
- plcsense at its default settings, and with ``max_inflight: 1000``, serving a tiny stateless 8-channel
  anomaly bundle (a dense autoencoder over windows of one reading, trained once and cached under .bench/).

Figures: msgs/s end to end (first publish to last answer received, after a warm-up; the median of ``--repeat``
bursts: bursts of 5,000 last under a second and vary by 10 %), p99 latency of a paced publisher at half of
plcsense's default rate (publish to answer received), and the worker's peak RSS (VmHWM). The load generator is
two processes, a publisher and a collector, with their garbage collectors off: as one process it was the
bottleneck (about 7,500 msg/s whatever the worker) and its full collections were every worker's p99.
Image route: a MobileNetV2 224 px bundle (ImageNet weights from ../shared/weights, a head trained on a few NEU
images, cached), PNG payloads: img/s and peak RSS through the worker, against decode + LiteRT batch 16 in one
loop. Every process has its own broker; the machine's other load shows in ``loadavg``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from plcsense.harness import (
    Broker,
    ResultCollector,
    WorkerProcess,
    close,
    connect,
    peak_rss_mb,
    start_broker,
    write_worker_config,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CACHE = ROOT / ".bench"
SKAB_NORMAL = SHARED / "data" / "skab" / "anomaly-free" / "anomaly-free.csv"
NEU = SHARED / "data" / "neu-det"
MOBILENET = SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5"
DEVICES = 8
INPUTS = "bench/+/in"
WARMUP = 200
DEFAULT_INFLIGHT = 64  # plcsense's mqtt.max_inflight default, given to the echo worker as the same window


# ----------------------------------------------------------------------------- bundles (trained once, cached)
def sensor_bundle() -> Path:
    out = CACHE / "sensor8"
    if not (out / "manifest.json").exists():
        from plcsense.training.sensors import AutoencoderSettings, SensorTrainConfig, train_sensor_anomaly

        if not SKAB_NORMAL.exists():
            raise SystemExit(f"echo_compare: needs SKAB at {SKAB_NORMAL} (see shared/data/README.md)")
        cfg = SensorTrainConfig(detector=AutoencoderSettings(epochs=10), window=1, name="bench8")
        train_sensor_anomaly([SKAB_NORMAL], out, cfg)
    return out


def image_bundle(per_class: int = 12) -> Path:
    out = CACHE / "neu-mnv2"
    if not (out / "manifest.json").exists():
        from plcsense.training.images import ImageTrainConfig, train_images

        few = CACHE / "neu-few"
        for folder in sorted(p for p in NEU.iterdir() if p.is_dir()):
            (few / folder.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(folder.glob("*.jpg"))[:per_class]:
                if not (few / folder.name / f.name).exists():
                    (few / folder.name / f.name).symlink_to(f)
        cfg = ImageTrainConfig(
            arch="mobilenet_v2",
            weights=str(MOBILENET),
            image_size=224,
            epochs=2,
            fine_tune_epochs=0,
            augment=None,
            name="neu-bench",
        )
        train_images(few, out, cfg)
    return out


@functools.cache
def skab_rows() -> np.ndarray:
    return np.loadtxt(SKAB_NORMAL, delimiter=";", skiprows=1, usecols=range(1, 9))


def sensor_payloads(run: str, count: int) -> list[tuple[str, str, bytes]]:
    """``(topic, id, payload)`` round-robin over the devices, readings from SKAB's anomaly-free file."""
    rows = skab_rows()
    out = []
    for i in range(count):
        msg_id = f"{run}-{i}"
        doc = {"id": msg_id, "data": [round(float(v), 6) for v in rows[i % len(rows)]]}
        out.append((f"bench/d{i % DEVICES}/in", msg_id, json.dumps(doc).encode()))
    return out


def png_payloads(limit: int = 60) -> list[bytes]:
    from PIL import Image

    every = sorted(NEU.glob("*/*.jpg"))
    files = every[:: max(1, len(every) // limit)][:limit]  # spread over the classes
    payloads = []
    for f in files:
        buffer = io.BytesIO()
        with Image.open(f) as image:
            image.save(buffer, format="PNG")
        payloads.append(buffer.getvalue())
    return payloads


# ----------------------------------------------------------------------------- the echo worker (a subprocess)
def run_echo(url: str, client_id: str, receive_maximum: int, answer_connections: int) -> None:
    """Answer every input with a small result document; ack the input once the reply's PUBACK is in.

    With ``answer_connections`` 2 the replies go out on a second connection (as plcsense's do), so reading
    inputs and sending replies no longer share one paho network thread.
    """
    pending: dict[int, tuple[int, int]] = {}  # reply mid -> (input mid, input qos)
    early: set[int] = set()  # PUBACKs that came before publish() returned
    lock = threading.Lock()  # never held across publish(): paho calls on_publish under its own lock

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        doc = json.loads(msg.payload)
        reply = json.dumps({"id": doc.get("id"), "topic": msg.topic, "task": "echo"}, separators=(",", ":"))
        mid = answers.publish(f"{msg.topic}/result", reply, qos=1).mid
        with lock:
            if mid not in early:
                pending[mid] = (msg.mid, msg.qos)
                return
            early.discard(mid)
        intake.ack(msg.mid, msg.qos)

    def on_publish(_c: mqtt.Client, _u: Any, mid: int, _reason: Any, _props: Any) -> None:
        with lock:
            source = pending.pop(mid, None)
            if source is None:
                early.add(mid)
                return
        intake.ack(*source)

    intake = connect(
        url,
        client_id=client_id,
        session_expiry_s=3600,
        receive_maximum=receive_maximum,
        max_inflight=receive_maximum,
        manual_ack=True,
        on_message=on_message,
    )
    if answer_connections == 1:
        answers = intake
    else:
        answers = connect(url, client_id=f"{client_id}-answers", max_inflight=receive_maximum)
    answers.on_publish = on_publish
    subscribed = threading.Event()
    intake.on_subscribe = lambda *_a: subscribed.set()
    intake.subscribe(INPUTS, options=SubscribeOptions(qos=1, noLocal=True))
    if not subscribed.wait(10):
        raise SystemExit("echo: no SUBACK")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_a: stop.set())
    print("ready", flush=True)
    stop.wait()
    for client in {intake, answers}:
        close(client)


@contextmanager
def echo_worker(broker: Broker, receive_maximum: int, connections: int) -> Iterator[int]:
    """The echo worker as its own process (its own interpreter and GIL, as plcsense's); yields its pid."""
    client_id = f"echo-{receive_maximum}-{connections}"
    cmd = [sys.executable, __file__, "echo", broker.url, client_id, str(receive_maximum), str(connections)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"echo worker did not start (exit {proc.wait(10)})")
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def plcsense_worker(broker: Broker, workdir: Path, route: dict[str, Any], **mqtt_extra: Any) -> Iterator[int]:
    name = f"plcsense-{len(list(workdir.glob('*.json')))}"
    config, port = write_worker_config(
        workdir / f"{name}.json", {"url": broker.url, "client_id": name, **mqtt_extra}, [route]
    )
    worker = WorkerProcess(config, port, workdir / f"{name}.log")
    try:
        worker.start(timeout=120)
        yield worker.pid
        worker.terminate(60)
    finally:
        worker.stop()


# ----------------------------------------------------------------------------- load and measure
def publish(
    client: mqtt.Client, messages: list[tuple[str, str, bytes]], rate: float | None, sent_at: dict[str, float]
) -> list[mqtt.MQTTMessageInfo]:
    """Publish every message, as fast as paho takes them or paced at ``rate`` per second."""
    started = time.perf_counter()
    infos = []
    for i, (topic, msg_id, payload) in enumerate(messages):
        if rate:
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        sent_at[msg_id] = time.perf_counter()
        infos.append(client.publish(topic, payload, qos=1))
    return infos


def run_publisher(url: str, phase: str, count: int, rate: float) -> None:
    """The load generator's publishing half, in a process of its own: one GIL cannot both publish and collect
    7,000+ messages a second, and a collector that is the bottleneck measures its own cost of parsing each answer
    (plcsense's are five times the echo's). Prints when each id was sent (perf_counter is system-wide)."""
    gc.disable()
    messages = sensor_payloads(phase, count)
    client = connect(url, client_id=f"bench-publisher-{os.getpid()}", max_inflight=1000)
    sent_at: dict[str, float] = {}
    print("ready", flush=True)
    sys.stdin.readline()
    for info in publish(client, messages, rate or None, sent_at):
        info.wait_for_publish(60)  # the broker has each one before the process ends
    close(client)
    print(json.dumps(sent_at), flush=True)


def published(broker: Broker, phase: str, count: int, rate: float | None) -> tuple[list[str], dict[str, float]]:
    """Run the publisher process for ``count`` readings; their ids in order, and when each was sent."""
    cmd = [sys.executable, __file__, "publish", broker.url, phase, str(count), str(rate or 0)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"publisher did not start (exit {proc.wait(10)})")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    sent_at = json.loads(proc.stdout.readline())
    proc.wait(30)
    return [f"{phase}-{i}" for i in range(count)], sent_at


def sensor_run(broker: Broker, pid: int, args: argparse.Namespace, paced_rate: float | None) -> dict:
    """Warm-up, ``args.repeat`` full-speed bursts of ``args.messages`` (the median counts), then a paced run at
    ``paced_rate`` per second (None: half of the median burst rate); figures for one worker."""
    out = ResultCollector(broker.connect(), "bench/+/in/result")
    # The collector keeps every answer: a full collection of this process's growing heap paused it for 30-150 ms
    # every second, which showed as the echo workers' and plcsense's p99 alike. The workers keep their collector on.
    gc.collect()
    gc.disable()

    def run(phase: str, count: int, rate: float | None) -> tuple[list[str], dict[str, float]]:
        ids, sent_at = published(broker, phase, count, rate)
        if not out.wait_for(ids, 300):
            raise SystemExit(f"{phase}: {count - sum(i in out.by_id for i in ids)} inputs unanswered")
        return ids, sent_at

    def burst(phase: str, count: int) -> float:
        """Publish ``count`` readings at once; answers per second from the first publish to the last answer."""
        ids, sent_at = run(phase, count, None)
        return count / (max(out.by_id[i].received for i in ids) - sent_at[ids[0]])

    try:
        burst("warm", WARMUP)
        rates = sorted(burst(f"burst{i}", args.messages) for i in range(args.repeat))
        rate = float(np.median(rates))
        paced = paced_rate or rate / 2
        ids, sent_at = run("paced", max(100, int(paced * args.paced_seconds)), paced)
        latency = np.array([(out.by_id[i].received - sent_at[i]) * 1000 for i in ids])
        return {
            "msgs_per_s": round(rate, 1),
            "msgs_per_s_range": [round(rates[0], 1), round(rates[-1], 1)],
            "paced_rate": round(paced, 1),
            "p50_ms": round(float(np.percentile(latency, 50)), 2),
            "p99_ms": round(float(np.percentile(latency, 99)), 2),
            "peak_rss_mb": round(peak_rss_mb(pid) or float("nan"), 1),
            "duplicates": out.duplicates,
        }
    finally:
        gc.enable()
        out.close()


def image_run(broker: Broker, pid: int, payloads: list[bytes], count: int) -> dict:
    out = ResultCollector(broker.connect(), ["bench/+/cam/result", "bench/+/cam/error"])
    sender = broker.connect(max_inflight=1000)
    try:
        warm = 32
        for i in range(warm):
            sender.publish(f"bench/d{i % DEVICES}/cam", payloads[i % len(payloads)], qos=1)
        if not out.wait_for(warm, 120):
            raise SystemExit("image warm-up unanswered")
        started = time.perf_counter()
        for i in range(count):
            sender.publish(f"bench/d{i % DEVICES}/cam", payloads[i % len(payloads)], qos=1)
        if not out.wait_for(warm + count, 600):
            raise SystemExit(f"images: {warm + count - len(out.answers)} unanswered")
        last = max(a.received for a in out.answers)
        return {
            "img_per_s": round(count / (last - started), 1),
            "errors": len(out.errors),
            "peak_rss_mb": round(peak_rss_mb(pid) or float("nan"), 1),
        }
    finally:
        close(sender)
        out.close()


def in_loop(bundle: Path, count: int, batch: int) -> None:
    """Decode PNGs and run LiteRT in batches in one loop, no MQTT: the image route's reference."""
    from plcsense.models.bundle import load_bundle
    from plcsense.models.inputs import decode_image

    model = load_bundle(bundle)
    payloads = png_payloads()
    spec = model.manifest.input
    model.model.predict(np.stack([decode_image(payloads[0], spec)] * batch))  # warm-up
    started = time.perf_counter()
    for i in range(0, count, batch):
        chunk = [payloads[j % len(payloads)] for j in range(i, min(count, i + batch))]
        model.model.predict(np.stack([decode_image(p, spec) for p in chunk]))
    rate = count / (time.perf_counter() - started)
    print(json.dumps({"img_per_s": round(rate, 1), "peak_rss_mb": round(peak_rss_mb(os.getpid()) or 0, 1)}))


# ----------------------------------------------------------------------------- the table
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5, help="bursts per worker; the median is reported")
    parser.add_argument("--paced-seconds", type=float, default=6.0)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--no-images", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    CACHE.mkdir(exist_ok=True)
    sensor = sensor_bundle()
    route = {"name": "sensor8", "topic": INPUTS, "model": str(sensor), "encoding": "json"}
    report: dict[str, Any] = {"loadavg_before": os.getloadavg()[0], "messages": args.messages}
    rows: dict[str, dict] = {}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def broker(name: str) -> Broker:
            return start_broker(work / name, verbose_log=False)

        # plcsense at defaults first: every other paced run goes at half of its rate (its own half for 1000)
        for name, extra in (("plcsense default", {}), ("plcsense max_inflight 1000", {"max_inflight": 1000})):
            with broker(name) as b, plcsense_worker(b, work, route, **extra) as pid:
                rows[name] = sensor_run(b, pid, args, None)
        half = rows["plcsense default"]["paced_rate"]
        for window, connections in ((DEFAULT_INFLIGHT, 1), (1000, 1), (DEFAULT_INFLIGHT, 2), (1000, 2)):
            name = f"echo, {connections} conn, Receive Max {window}"
            with broker(name) as b, echo_worker(b, window, connections) as pid:
                rows[name] = sensor_run(b, pid, args, half)

        if not args.no_images:
            images = image_bundle()
            payloads = png_payloads()
            cam = {"name": "cam", "topic": "bench/+/cam", "model": str(images), "encoding": "image"}
            with broker("images") as b, plcsense_worker(b, work, cam) as pid:
                report["image_route"] = image_run(b, pid, payloads, args.images)
            loop = subprocess.run(
                [sys.executable, __file__, "in-loop", str(images), str(args.images), "16"],
                capture_output=True,
                text=True,
                check=True,
            )
            report["image_in_loop_batch16"] = json.loads(loop.stdout.strip().splitlines()[-1])

    reference = max(v["msgs_per_s"] for k, v in rows.items() if k.startswith("echo"))
    for row in rows.values():
        row["ratio_to_echo"] = round(row["msgs_per_s"] / reference, 2)
    report |= {"sensor": rows, "echo_reference_msgs_per_s": reference, "loadavg_after": os.getloadavg()[0]}
    if "image_route" in report:
        ratio = report["image_route"]["img_per_s"] / report["image_in_loop_batch16"]["img_per_s"]
        report["image_route"]["ratio_to_in_loop"] = round(ratio, 2)
    print_table(report)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{'':32} {'msgs/s':>6} {'(min-max)':>11} {'ratio':>5} {'paced/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'RSS MB':>6}"
    )
    for name, r in report["sensor"].items():
        low, high = r["msgs_per_s_range"]
        print(
            f"{name:32} {r['msgs_per_s']:6.0f} {f'({low:.0f}-{high:.0f})':>11} {r['ratio_to_echo']:5.2f} "
            f"{r['paced_rate']:7.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {r['peak_rss_mb']:6.1f}"
        )
    if "image_route" in report:
        image, loop = report["image_route"], report["image_in_loop_batch16"]
        print(
            f"image route (MobileNetV2 224, PNG): {image['img_per_s']:.1f} img/s, RSS {image['peak_rss_mb']:.0f} MB; "
            f"decode + LiteRT batch 16 in one loop: {loop['img_per_s']:.1f} img/s, RSS {loop['peak_rss_mb']:.0f} MB; "
            f"ratio {image['ratio_to_in_loop']:.2f}"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["echo"]:
        run_echo(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1:2] == ["publish"]:
        run_publisher(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    elif sys.argv[1:2] == ["in-loop"]:
        in_loop(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
