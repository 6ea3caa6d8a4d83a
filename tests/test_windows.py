"""Streaming windows: per device, strides, gaps, late and repeated readings, bounded state, restarts."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from plcsense.models.inputs import InputError
from plcsense.worker.windows import CLOCK_RESET_S, WindowStore, reading_time
from tests.conftest import WINDOW, Collector, publish_all
from tests.test_worker import readings, sensor_route


def r(value: float) -> np.ndarray:
    return np.array([value, -value], np.float32)


def test_window_fills_then_slides():
    store = WindowStore(3, 2)
    assert store.push("a", r(1), 1).window is None
    assert store.push("a", r(2), 2).window is None
    assert store.push("a", r(3), 3).window[:, 0].tolist() == [1, 2, 3]
    assert store.push("a", r(4), 4).window[:, 0].tolist() == [2, 3, 4]


def test_stride():
    store = WindowStore(2, 2, stride=3)
    out = [store.push("a", r(i), i).window for i in range(1, 9)]
    assert [w is not None for w in out] == [False, True, False, False, True, False, False, True]


def test_late_and_duplicate_readings_do_not_corrupt_the_window():
    store = WindowStore(3, 2)
    for i in (1, 2, 3):
        store.push("a", r(i), i)
    with pytest.raises(InputError) as dup:
        store.push("a", r(99), 3)
    assert dup.value.code == "duplicate_reading"
    with pytest.raises(InputError) as late:
        store.push("a", r(99), 2.5)
    assert late.value.code == "late_reading"
    assert store.push("a", r(4), 4).window[:, 0].tolist() == [2, 3, 4]


def test_a_clock_that_went_back_restarts_the_window_instead_of_refusing_every_later_reading():
    """One reading stamped far in the future (a PLC clock glitch, milliseconds sent as seconds) must not make
    every later, correctly stamped reading 'late'."""
    store = WindowStore(2, 2)
    store.push("a", r(1), 1000)
    store.push("a", r(2), 1001)
    store.push("a", r(3), 1_000_000)  # the glitch
    with pytest.raises(InputError) as late:  # a late delivery, within CLOCK_RESET_S: still refused
        store.push("a", r(9), 1_000_000 - CLOCK_RESET_S)
    assert late.value.code == "late_reading"
    pushed = store.push("a", r(4), 1002)  # the clock is right again
    assert pushed.clock_back_s == 1_000_000 - 1002 and pushed.window is None  # restarted from this reading
    assert store.push("a", r(5), 1003).window[:, 0].tolist() == [4, 5]
    gapped = WindowStore(2, 2, max_gap_s=3600)  # a longer max_gap_s widens what still counts as late
    gapped.push("a", r(1), 10_000)
    with pytest.raises(InputError):
        gapped.push("a", r(2), 10_000 - 3000)
    assert gapped.push("a", r(3), 10_000 - 4000).clock_back_s == 4000


def test_gap_restarts_the_window():
    store = WindowStore(2, 2, max_gap_s=10)
    store.push("a", r(1), 100)
    assert store.push("a", r(2), 105).window is not None
    pushed = store.push("a", r(3), 130)
    assert pushed.gap_s == 25 and pushed.window is None
    assert store.push("a", r(4), 131).window[:, 0].tolist() == [3, 4]


def test_devices_are_independent_and_bounded():
    store = WindowStore(2, 2, max_devices=2)
    store.push("a", r(1))
    store.push("b", r(1))
    store.push("a", r(2))
    store.push("c", r(1))  # b is the least recently seen: forgotten
    assert len(store) == 2 and store.evicted == 1
    assert store.push("b", r(2)).window is None  # b starts again from an empty window
    assert store.push("c", r(2)).window is not None  # c kept its reading


def test_reading_time_formats():
    assert reading_time(1700000000) == 1700000000
    assert reading_time(1700000000123) == pytest.approx(1700000000.123)
    assert reading_time("2026-01-01T00:00:00Z") == reading_time("2026-01-01T00:00:00+00:00")
    with pytest.raises(InputError):
        reading_time("yesterday")


def test_worker_reports_gaps_and_duplicates(broker, sensor_bundle, run_worker, collectors):
    worker = run_worker(broker, [sensor_route(sensor_bundle, max_gap_s=30)])
    out = Collector(broker, "plant/#")
    collectors.append(out)
    rows = readings(WINDOW + 5)
    msgs = [json.dumps({"data": row, "id": f"r{i}", "ts": 1000 + i}) for i, row in enumerate(rows[:WINDOW])]
    msgs.append(json.dumps({"data": rows[0], "id": "dup", "ts": 1000 + WINDOW - 1}))  # repeated delivery
    msgs.append(json.dumps({"data": rows[WINDOW], "id": "after-stop", "ts": 5000}))  # machine stood still
    publish_all(broker, "plant/d1/pump", msgs)
    errors = out.wait_for(2, "/error")
    assert [(e["error"], e["id"]) for e in errors] == [("duplicate_reading", "dup"), ("window_reset", "after-stop")]
    results = out.wait_for(1, "/result")
    assert [x["id"] for x in results] == [f"r{WINDOW - 1}"]
    assert worker.metric("plcsense_errors_total", route="pump", reason="window_reset") == 1


def test_after_a_restart_the_window_refills_without_false_alarms(broker, sensor_bundle, run_worker, collectors):
    """Windows live in memory: after a crash the worker waits for a full window again instead of scoring a
    partial one (which would look like an anomaly)."""
    worker = run_worker(broker, [sensor_route(sensor_bundle)], client_id="restarter")
    out = Collector(broker, "plant/+/pump/result")
    collectors.append(out)
    rows = readings(3 * WINDOW)
    publish_all(broker, "plant/d1/pump", [json.dumps({"data": r, "id": f"a{i}"}) for i, r in enumerate(rows[:WINDOW])])
    assert len(out.wait_for(1)) == 1
    worker.kill()
    worker.start()
    later = rows[WINDOW : 3 * WINDOW]
    publish_all(broker, "plant/d1/pump", [json.dumps({"data": r, "id": f"b{i}"}) for i, r in enumerate(later)])
    last = f"b{2 * WINDOW - 1}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and last not in {r["id"] for r in out.json()}:
        time.sleep(0.1)
    after = [r for r in out.json() if r["id"].startswith("b")]
    first = int(after[0]["id"][1:])
    # The window refills from scratch; the one reading the killed worker had not yet acknowledged comes back
    # from the broker and may count towards it, never more.
    assert first in (WINDOW - 2, WINDOW - 1)
    assert [r["id"] for r in after] == [f"b{i}" for i in range(first, 2 * WINDOW)]
    assert not any(r["is_anomaly"] for r in after)
