"""Worker throughput and latency through a real Mosquitto, printed as JSON.

    .venv/bin/python bench/worker_throughput.py [--messages 5000] [--route eeg|camera] [--max-batch 16]

Uses the demo's bundles (trained on first use) and a private Mosquitto, starts ``plcsense serve`` as its own
process, publishes the messages as fast as the broker takes them, and reports messages per second end to end
and the per-message latency the worker measured (receipt to result publish). ``bench/echo_compare.py`` sets the
same worker beside a no-inference echo worker.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from plcsense.demo import prepare
from plcsense.harness import ResultCollector, WorkerProcess, close, start_broker, write_worker_config
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
    if args.route == "camera":
        payloads = [p for _, p in payloads_for(digits)]
    else:
        rows = np.loadtxt(eeg, delimiter=",", skiprows=1, dtype=np.float32)
        payloads = []
        for i in range(0, len(rows) - 20):
            buffer = io.BytesIO()
            np.save(buffer, rows[i : i + 20])
            payloads.append(buffer.getvalue())

    with tempfile.TemporaryDirectory() as tmp, start_broker(Path(tmp) / "broker", verbose_log=False) as broker:
        route = {
            "name": args.route,
            "topic": "bench/+/in",
            "model": str(workdir / "bundles" / ("eeg" if args.route == "eeg" else "digits")),
            "encoding": "image" if args.route == "camera" else "npy",
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
        }
        mqtt = {"url": broker.url, "client_id": "bench"}
        config, port = write_worker_config(Path(tmp) / "config.yaml", mqtt, [route])
        worker = WorkerProcess(config, port, Path(tmp) / "worker.log")
        try:
            worker.start(timeout=60)
            out = ResultCollector(broker.connect(), ["bench/+/in/result", "bench/+/in/error"])
            sender = broker.connect(max_inflight=1000)
            started = time.perf_counter()
            for i in range(args.messages):
                sender.publish("bench/1/in", payloads[i % len(payloads)], qos=1)
            out.wait_for(args.messages, 300)
            elapsed = time.perf_counter() - started
            metrics = worker.metrics()
            close(sender)
            out.close()
            worker.terminate(60)
        finally:
            worker.stop()
    batch_sum = sum(v for (name, _), v in metrics.items() if name == "plcsense_batch_size_sum")
    batch_n = sum(v for (name, _), v in metrics.items() if name == "plcsense_batch_size_count")
    lat = np.array([a.doc.get("latency_ms", float("nan")) for a in out.answers])
    print(
        json.dumps(
            {
                "route": args.route,
                "messages": args.messages,
                "answered": len(lat),
                "seconds": round(elapsed, 3),
                "messages_per_s": round(len(lat) / elapsed, 1),
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
                "latency_ms_p95": round(float(np.percentile(lat, 95)), 2),
                "latency_ms_p99": round(float(np.percentile(lat, 99)), 2),
                "mean_batch_size": round(batch_sum / batch_n, 2) if batch_n else None,
            }
        )
    )


if __name__ == "__main__":
    main()
