"""Worker throughput and latency through a real Mosquitto, printed as JSON.

    .venv/bin/python bench/worker_throughput.py [--messages 5000] [--route eeg|camera] [--max-batch 16]

Uses the demo's bundles (trained on first use) and a private Mosquitto (or PLCSENSE_MQTT_URL), starts
``plcsense serve`` as its own process, publishes the messages as fast as the broker takes them, and reports
messages per second end to end and the per-message latency the worker measured (receipt to result publish).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from plcsense.demo import _free_port, _wait_port, prepare, start_broker
from plcsense.mqtt_url import client_for, host_port
from plcsense.simulate import payloads_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--route", choices=["eeg", "camera"], default="eeg")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args()

    workdir = Path(".demo").resolve()
    digits, eeg = prepare(workdir)
    tmp = Path(tempfile.mkdtemp())
    url, broker = start_broker(tmp)
    port = _free_port()
    bundle = workdir / "bundles" / ("eeg" if args.route == "eeg" else "digits")
    route = {
        "name": args.route,
        "topic": "bench/+/in",
        "model": str(bundle),
        "encoding": "image" if args.route == "camera" else "npy",
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
    }
    config = tmp / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "mqtt": {"url": url, "client_id": "bench"},
                "metrics": {"port": port, "host": "127.0.0.1"},
                "routes": [route],
            }
        )
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "plcsense", "serve", "--config", str(config)], stderr=subprocess.DEVNULL
    )
    _wait_port(port, 60)
    time.sleep(1)

    if args.route == "camera":
        payloads = [p for _, p in payloads_for(digits)]
    else:
        import io

        rows = np.loadtxt(eeg, delimiter=",", skiprows=1, dtype=np.float32)
        payloads = []
        for i in range(0, len(rows) - 20):
            buffer = io.BytesIO()
            np.save(buffer, rows[i : i + 20])
            payloads.append(buffer.getvalue())

    latencies: list[float] = []
    done = threading.Event()

    def on_message(client, userdata, msg) -> None:
        latencies.append(json.loads(msg.payload).get("latency_ms", float("nan")))
        if len(latencies) >= args.messages:
            done.set()

    listener = client_for(url)
    listener.on_message = on_message
    listener.connect(*host_port(url))
    listener.subscribe([("bench/+/in/result", 1), ("bench/+/in/error", 1)])
    listener.loop_start()
    sender = client_for(url)
    sender.max_inflight_messages_set(1000)
    sender.connect(*host_port(url))
    sender.loop_start()
    time.sleep(0.5)
    started = time.perf_counter()
    for i in range(args.messages):
        sender.publish("bench/1/in", payloads[i % len(payloads)], qos=1)
    done.wait(300)
    elapsed = time.perf_counter() - started
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        metrics = resp.read().decode()
    batch_sum = sum(
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("plcsense_batch_size_sum")
    )
    batch_n = sum(
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("plcsense_batch_size_count")
    )
    worker.terminate()
    worker.wait(60)
    sender.disconnect()
    listener.disconnect()
    if broker:
        broker.terminate()
    lat = np.array(latencies)
    print(
        json.dumps(
            {
                "route": args.route,
                "messages": args.messages,
                "answered": len(latencies),
                "seconds": round(elapsed, 3),
                "messages_per_s": round(len(latencies) / elapsed, 1),
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
                "latency_ms_p95": round(float(np.percentile(lat, 95)), 2),
                "latency_ms_p99": round(float(np.percentile(lat, 99)), 2),
                "mean_batch_size": round(batch_sum / batch_n, 2) if batch_n else None,
            }
        )
    )


if __name__ == "__main__":
    main()
