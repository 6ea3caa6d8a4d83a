"""A flood against one worker at its default settings: every reading answered, intake bounded, memory bounded.

    .venv/bin/python bench/flood.py [--messages 60000] [--publishers 3] [--max-inflight N]

Each publisher sends its share of one-reading JSON messages (the demo's EEG recording, one device per publisher)
as fast as a private Mosquitto takes them (Debian's 2.0.11 ignores Receive Maximum once acks flow). Prints the
answers received against the answers owed (every reading once its device's window is full), the highest
``plcsense_inflight_messages`` seen by scraping every 20 ms, the worker's peak RSS and the elapsed time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from plcsense.demo import prepare
from plcsense.harness import ResultCollector, WorkerProcess, close, start_broker, write_worker_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--publishers", type=int, default=3)
    parser.add_argument("--max-inflight", type=int, default=None, help="default: the worker's own default")
    args = parser.parse_args()

    workdir = Path(".demo").resolve()
    _, eeg = prepare(workdir)
    bundle = workdir / "bundles" / "eeg"
    window = json.loads((bundle / "manifest.json").read_text())["input"]["window"]
    rows = np.loadtxt(eeg, delimiter=",", skiprows=1, dtype=np.float32)
    per = args.messages // args.publishers
    data = [json.dumps(rows[i % len(rows)].tolist()) for i in range(per)]
    owed = args.publishers * (per - window + 1)

    with tempfile.TemporaryDirectory() as tmp, start_broker(Path(tmp) / "broker", verbose_log=False) as broker:
        mqtt = {"url": broker.url, "client_id": "flood"}
        if args.max_inflight:
            mqtt["max_inflight"] = args.max_inflight
        route = {"name": "eeg", "topic": "flood/+/in", "model": str(bundle), "encoding": "json"}
        config, port = write_worker_config(Path(tmp) / "config.yaml", mqtt, [route])
        worker = WorkerProcess(config, port, Path(tmp) / "worker.log")
        worker.start(timeout=60)
        try:
            out = ResultCollector(broker.connect(), ["flood/+/in/result", "flood/+/in/error"])
            peak, done = [0.0], threading.Event()

            def scrape() -> None:
                while not done.is_set():
                    with contextlib.suppress(OSError):
                        peak[0] = max(peak[0], worker.metric("plcsense_inflight_messages"))
                    time.sleep(0.02)

            def publish(p: int) -> None:
                sender = broker.connect(max_inflight=1000)
                payloads = (f'{{"id": "{p}-{i}", "data": {row}}}' for i, row in enumerate(data))  # ids unique per run
                infos = [sender.publish(f"flood/{p}/in", payload, qos=1) for payload in payloads]
                for info in infos:
                    info.wait_for_publish(120)
                close(sender)

            scraper = threading.Thread(target=scrape, daemon=True)
            scraper.start()
            started = time.perf_counter()
            threads = [threading.Thread(target=publish, args=(p,)) for p in range(args.publishers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            complete = out.wait_for(owed, 600)
            elapsed = time.perf_counter() - started
            done.set()
            scraper.join()
            answered = len(out.answers)
            ready = worker.get("/readyz")[0]
            rss = worker.peak_rss_mb()
            out.close()
            worker.terminate(60)
        finally:
            worker.stop()
    print(
        json.dumps(
            {
                "messages": per * args.publishers,
                "publishers": args.publishers,
                "answers_owed": owed,
                "answered": answered,
                "complete": complete,
                "seconds": round(elapsed, 1),
                "answers_per_s": round(answered / elapsed, 1),
                "peak_inflight": peak[0],
                "max_inflight": args.max_inflight or "default",
                "peak_rss_mb": rss,
                "readyz_after": ready,
            }
        )
    )


if __name__ == "__main__":
    main()
