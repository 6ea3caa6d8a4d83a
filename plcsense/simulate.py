"""``plcsense simulate``: a PLC stand-in that replays images or sensor rows over MQTT."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from itertools import cycle, islice
from pathlib import Path

import numpy as np

from plcsense.harness import close, connect
from plcsense.training.data import IMAGE_SUFFIXES, DataError, read_sensor_csv


def image_payloads(folder: Path) -> list[tuple[str, bytes]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images under {folder}")
    return [(str(p.relative_to(folder)), p.read_bytes()) for p in files]


def csv_payloads(path: Path, columns: list[str] | None, encoding: str) -> list[tuple[str, bytes]]:
    table = read_sensor_csv(path, columns=columns, label_column="anomaly", ignore=("changepoint",))
    payloads = []
    for i, row in enumerate(table.values):
        msg_id = f"{path.stem}-{i}"
        if encoding == "npy":
            buffer = io.BytesIO()
            np.save(buffer, row.astype(np.float32), allow_pickle=False)
            payloads.append((msg_id, buffer.getvalue()))
        else:
            payloads.append((msg_id, json.dumps({"data": row.tolist(), "id": msg_id}).encode()))
    return payloads


def payloads_for(source: Path, columns: list[str] | None = None, encoding: str = "json") -> list[tuple[str, bytes]]:
    if source.is_dir():
        return image_payloads(source)
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return [(source.name, source.read_bytes())]
    return csv_payloads(source, columns, encoding)


def simulate(
    source: Path,
    *,
    url: str,
    topic: str,
    rate: float = 10.0,
    protocol: str = "5",
    columns: list[str] | None = None,
    limit: int | None = None,
    loop: bool = False,
    encoding: str = "json",
    qos: int = 1,
) -> int:
    """Publish every payload of ``source`` to ``topic`` at ``rate`` per second; return how many were sent.

    A broker that is unreachable or refuses the connection raises :class:`plcsense.harness.MqttConnectError`
    before anything is published (paho alone would queue the messages and drop them silently).
    """
    payloads = payloads_for(source, columns, encoding)
    stream: Iterator[tuple[str, bytes]] = cycle(payloads) if loop else iter(payloads)
    client = connect(url, protocol=protocol)
    sent, started = 0, time.monotonic()
    infos = []
    try:
        for _, payload in islice(stream, limit):
            if rate > 0:
                time.sleep(max(0.0, started + sent / rate - time.monotonic()))
            infos.append(client.publish(topic, payload, qos=qos))
            sent += 1
            if len(infos) > 1000:
                infos = [i for i in infos if not i.is_published()]
        for info in infos:
            info.wait_for_publish(timeout=30)
    finally:
        close(client)
    return sent
