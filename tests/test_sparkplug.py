"""Sparkplug B input, against payloads encoded by a real Sparkplug B library (pysparkplug), not by our own pb2."""

from __future__ import annotations

import pytest

from plcsense.models.inputs import InputError
from plcsense.worker.sparkplug import AliasTable, SparkplugReading, SparkplugTopic, decode_sparkplug, parse_topic

# Installed with --no-deps beside paho-mqtt 2 (its metadata asks for paho<2, only its MQTT client needs that).
spb = pytest.importorskip("pysparkplug")

DT = spb.DataType
TS = 1_700_000_000_123


def metric(name: str | None, datatype: object, value: object, alias: int | None = None, **kw: object) -> object:
    return spb.Metric(timestamp=TS, name=name, datatype=datatype, value=value, alias=alias, **kw)


def node_birth(*metrics: object, seq: int = 0) -> bytes:
    return spb.NBirth(timestamp=TS, seq=seq, metrics=metrics).encode()


def node_data(*metrics: object, seq: int = 1) -> bytes:
    return spb.NData(timestamp=TS, seq=seq, metrics=metrics).encode()


def test_ddata_float_double_int_bool_by_name() -> None:
    payload = spb.DData(
        timestamp=TS,
        seq=7,
        metrics=(
            metric("Pressure", DT.FLOAT, 1.5),
            metric("Temperature", DT.DOUBLE, 71.25),
            metric("Count", DT.UINT32, 42),
            metric("Total", DT.UINT64, 2**40),
            metric("Offset", DT.INT32, -3),
            metric("Running", DT.BOOLEAN, True),
            metric("Alarm", DT.BOOLEAN, False),
        ),
    ).encode(include_dtypes=True)
    reading = decode_sparkplug(payload)
    assert reading == SparkplugReading(
        {
            "Pressure": 1.5,
            "Temperature": 71.25,
            "Count": 42.0,
            "Total": float(2**40),
            "Offset": -3.0,
            "Running": 1.0,
            "Alarm": 0.0,
        },
        timestamp_ms=TS,
        seq=7,
    )
    assert all(isinstance(v, float) for v in reading.metrics.values())


def test_nbirth_aliases_then_alias_only_ndata() -> None:
    topic = parse_topic("spBv1.0/plant/NBIRTH/rig1")
    data_topic = parse_topic("spBv1.0/plant/NDATA/rig1")
    assert topic is not None and data_topic is not None
    table = AliasTable()
    birth = table.decode(
        topic,
        node_birth(
            metric("bdSeq", DT.INT64, 0),
            metric("Pressure", DT.FLOAT, 1.0, alias=1),
            metric("Level", DT.INT16, 0, alias=2),
            metric("Label", DT.STRING, "pump", alias=3),
        ),
    )
    assert birth.metrics == {"bdSeq": 0.0, "Pressure": 1.0, "Level": 0.0}
    assert table.aliases(topic.key) == {1: "Pressure", 2: "Level", 3: "Label"}
    assert table.resolve(topic.key, 2) == "Level" and table.alias_of(topic.key, "Pressure") == 1

    # DATA after the birth: aliases only, no datatypes (pysparkplug leaves them out, as the spec allows).
    data = node_data(
        metric(None, DT.FLOAT, 2.5, alias=1), metric(None, DT.INT16, -7, alias=2), metric(None, DT.STRING, "x", alias=3)
    )
    reading = table.decode(data_topic, data)
    assert reading.metrics == {"Pressure": 2.5, "Level": -7.0}  # the signed Int16 comes back from the birth's datatype
    assert reading.seq == 1 and reading.timestamp_ms == TS

    # The plain function with the learnt maps gives the same; without them the aliases are unknown.
    assert decode_sparkplug(data, aliases=table.aliases(topic.key)).metrics["Pressure"] == 2.5
    with pytest.raises(InputError) as err:
        decode_sparkplug(data)
    assert err.value.code == "bad_sparkplug" and "rebirth" in err.value.detail


def test_dbirth_aliases_are_per_device_and_nbirth_resets_the_node() -> None:
    table = AliasTable()
    dbirth = parse_topic("spBv1.0/plant/DBIRTH/rig1/pump1")
    assert dbirth is not None
    table.learn(dbirth, spb.DBirth(timestamp=TS, seq=1, metrics=(metric("Flow", DT.DOUBLE, 0.0, alias=5),)).encode())
    ddata = parse_topic("spBv1.0/plant/DDATA/rig1/pump1")
    other = parse_topic("spBv1.0/plant/DDATA/rig1/pump2")
    assert ddata is not None and other is not None
    payload = spb.DData(timestamp=TS, seq=2, metrics=(metric(None, DT.DOUBLE, 3.0, alias=5),)).encode()
    assert table.decode(ddata, payload).metrics == {"Flow": 3.0}
    with pytest.raises(InputError):
        table.decode(other, payload)  # pump2 never sent a DBIRTH

    nbirth = parse_topic("spBv1.0/plant/NBIRTH/rig1")
    assert nbirth is not None
    table.learn(nbirth, node_birth(metric("bdSeq", DT.INT64, 1)))
    assert table.aliases(ddata.key) == {}  # a new node session invalidates its devices' births
    with pytest.raises(InputError):
        table.decode(ddata, payload)

    table.learn(dbirth, spb.DBirth(timestamp=TS, seq=1, metrics=(metric("Flow", DT.DOUBLE, 0.0, alias=5),)).encode())
    table.learn(parse_topic("spBv1.0/plant/DDEATH/rig1/pump1"), spb.DDeath(timestamp=TS, seq=3).encode())
    assert table.aliases(ddata.key) == {}


def test_null_and_string_metrics_are_skipped() -> None:
    payload = node_data(
        metric("Pressure", DT.FLOAT, 1.25),
        metric("Speed", DT.DOUBLE, None, is_null=True),
        metric("Mode", DT.STRING, "auto"),
        metric("Blob", DT.BYTES, b"\x00\x01"),
    )
    assert decode_sparkplug(payload).metrics == {"Pressure": 1.25}


def test_payload_without_numeric_metrics_is_refused() -> None:
    payload = node_data(metric("Mode", DT.STRING, "auto"), metric("Speed", DT.DOUBLE, None, is_null=True))
    with pytest.raises(InputError) as err:
        decode_sparkplug(payload)
    assert err.value.code == "bad_sparkplug" and "no numeric metrics" in err.value.detail


def test_signed_integers_without_birth_datatype_need_the_metric_datatype() -> None:
    payload = node_data(
        metric("Int8", DT.INT8, -5), metric("Int64", DT.INT64, -(2**40)), metric("UInt8", DT.UINT8, 250)
    )
    # pysparkplug omits datatypes in DATA by default; with them included the sign is recovered without a birth.
    with_types = spb.NData(
        timestamp=TS,
        seq=1,
        metrics=(metric("Int8", DT.INT8, -5), metric("Int64", DT.INT64, -(2**40)), metric("UInt8", DT.UINT8, 250)),
    ).encode(include_dtypes=True)
    assert decode_sparkplug(with_types).metrics == {"Int8": -5.0, "Int64": float(-(2**40)), "UInt8": 250.0}
    known = {"Int8": int(DT.INT8), "Int64": int(DT.INT64), "UInt8": int(DT.UINT8)}
    assert decode_sparkplug(payload, datatypes=known).metrics == {
        "Int8": -5.0,
        "Int64": float(-(2**40)),
        "UInt8": 250.0,
    }


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b'{"data": [1, 2, 3]}', b"\x0a\x05ab", b""])
def test_garbage_bytes_are_bad_sparkplug(garbage: bytes) -> None:
    with pytest.raises(InputError) as err:
        decode_sparkplug(garbage)
    assert err.value.code == "bad_sparkplug"
    assert err.value.detail


def test_alias_table_refuses_messages_without_readings() -> None:
    topic = parse_topic("spBv1.0/plant/NDEATH/rig1")
    assert topic is not None
    with pytest.raises(InputError) as err:
        AliasTable().decode(topic, spb.NDeath(timestamp=TS, bd_seq_metric=metric("bdSeq", DT.INT64, 0)).encode())
    assert err.value.code == "bad_sparkplug" and "NDEATH" in err.value.detail


def test_alias_table_is_bounded() -> None:
    table = AliasTable(max_devices=2)
    for i in range(3):
        topic = parse_topic(f"spBv1.0/plant/NBIRTH/rig{i}")
        assert topic is not None
        table.learn(topic, node_birth(metric("x", DT.FLOAT, 0.0, alias=1)))
    assert len(table) == 2 and table.aliases(("plant", "rig0", None)) == {}


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("spBv1.0/plant/NDATA/rig1", SparkplugTopic("spBv1.0", "plant", "NDATA", "rig1")),
        ("spBv1.0/plant/DDATA/rig1/pump", SparkplugTopic("spBv1.0", "plant", "DDATA", "rig1", "pump")),
        ("spBv1.0/plant/NBIRTH/rig1", SparkplugTopic("spBv1.0", "plant", "NBIRTH", "rig1")),
        ("spBv1.0/plant/DBIRTH/rig1/pump", SparkplugTopic("spBv1.0", "plant", "DBIRTH", "rig1", "pump")),
        ("spBv1.0/plant/NDATA/rig1/pump", None),  # node message with a device level
        ("spBv1.0/plant/DDATA/rig1", None),  # device message without one
        ("spBv1.0/plant/XDATA/rig1", None),
        ("spBv1.0/STATE/host1", None),
        ("spBv2.0/plant/NDATA/rig1", None),
        ("plant/rig1/pump", None),
        ("spBv1.0//NDATA/rig1", None),
        ("spBv1.0/plant/DDATA/rig1/pump/extra", None),
        ("spBv1.0/+/NDATA/rig1", None),
        ("", None),
    ],
)
def test_parse_topic(topic: str, expected: SparkplugTopic | None) -> None:
    assert parse_topic(topic) == expected


def test_topic_key() -> None:
    node = parse_topic("spBv1.0/g/NDATA/n")
    device = parse_topic("spBv1.0/g/DDATA/n/d")
    assert node is not None and device is not None
    assert node.key == ("g", "n", None) and device.key == ("g", "n", "d")


def test_worker_serves_sparkplug_readings(broker, sensor_bundle, run_worker, collectors) -> None:
    """DBIRTH with aliases, then alias-only DDATA: mapped to the model's channels by name, windowed per device."""
    from tests.conftest import WINDOW, Collector, publish_all
    from tests.test_worker import readings, settled

    route = {"name": "spb", "topic": "spBv1.0/plant1/+/edge1/#", "model": str(sensor_bundle), "encoding": "sparkplug"}
    worker = run_worker(broker, [route])
    out = Collector(broker, "spBv1.0/plant1/+/edge1/#")
    collectors.append(out)
    names = ["vibration", "current", "pressure"]
    rows = readings(WINDOW + 2)

    def metrics(row: list[float], birth: bool) -> tuple:
        extra = (metric("Mode", DT.STRING, "auto"),) if birth else ()
        return (
            tuple(
                metric(n if birth else None, DT.DOUBLE, v, alias=i + 1)
                for i, (n, v) in enumerate(zip(names, row, strict=True))
            )
            + extra
        )

    payloads = [spb.DBirth(timestamp=TS, seq=0, metrics=metrics(rows[0], True)).encode(include_dtypes=True)]
    payloads += [
        spb.DData(timestamp=TS + 1000 * i, seq=i % 256, metrics=metrics(row, False)).encode()
        for i, row in enumerate(rows[1:], 1)
    ]
    publish_all(broker, "spBv1.0/plant1/DBIRTH/edge1/pump7", payloads[:1])
    publish_all(broker, "spBv1.0/plant1/DDATA/edge1/pump7", payloads[1:])
    publish_all(broker, "spBv1.0/plant1/DDATA/edge1/pump7", [b"\x00garbage"])
    publish_all(broker, "spBv1.0/plant1/DDEATH/edge1/pump7", [spb.DDeath(timestamp=TS, seq=0).encode()])
    results = out.wait_for(3, "/result")
    assert len(results) == 3 and {r["task"] for r in results} == {"anomaly"}
    assert results[0]["id"] == str(WINDOW - 1) and results[0]["topic"].endswith("DDATA/edge1/pump7")
    assert set(results[0]["channels"]) == set(names)
    [error] = out.wait_for(1, "/error")
    assert error["error"] == "bad_sparkplug"
    assert worker.metric("plcsense_messages_total", route="spb") == len(payloads) + 2
    assert settled(worker) == 0


def test_milliseconds_since_boot_keep_their_unit(broker, sensor_bundle, run_worker, collectors) -> None:
    """A controller without a synchronised clock stamps milliseconds since boot. Sparkplug fixes the unit, so one
    second between readings is one second, not 1000 s that `max_gap_s` would take for a stoppage every reading."""
    from tests.conftest import WINDOW, Collector, publish_all
    from tests.test_worker import readings

    route = {
        "name": "spb", "topic": "spBv1.0/plant1/+/edge1/#", "model": str(sensor_bundle), "encoding": "sparkplug",
        "max_gap_s": 5,
    }  # fmt: skip
    run_worker(broker, [route])
    out = Collector(broker, "spBv1.0/plant1/+/edge1/#")
    collectors.append(out)
    names = ["vibration", "current", "pressure"]
    boot = 90_000  # 90 s after power-on
    payloads = [
        spb.DData(
            timestamp=boot + 1000 * i,
            seq=i,
            metrics=tuple(metric(n, DT.DOUBLE, v) for n, v in zip(names, row, strict=True)),
        ).encode()
        for i, row in enumerate(readings(WINDOW + 1))
    ]
    publish_all(broker, "spBv1.0/plant1/DDATA/edge1/pump7", payloads)
    results = out.wait_for(2, "/result")
    assert [r["id"] for r in results] == [str(WINDOW - 1), str(WINDOW)]
    assert results[0]["ts"] == boot + 1000 * (WINDOW - 1)  # the result echoes the reading's own stamp


def test_a_new_model_version_keeps_the_devices_aliases(tmp_path, sensor_bundle) -> None:
    """Aliases are learnt from a device's DBIRTH; a hot swap to a new version must keep them, or every alias-only
    DDATA after it would be refused until the device happened to rebirth."""
    import json
    import shutil

    from plcsense.models.bundle import read_manifest, write_manifest
    from plcsense.worker.metrics import Metrics
    from plcsense.worker.pipeline import Answer, Inbound, Pipeline
    from plcsense.worker.settings import Settings
    from tests.conftest import WINDOW
    from tests.test_worker import readings

    repo = tmp_path / "repo" / "spb"
    shutil.copytree(sensor_bundle, repo / "1")
    route = {"name": "spb", "topic": "spBv1.0/plant1/+/edge1/#", "model": str(repo), "encoding": "sparkplug"}
    got: list[Answer] = []
    pipeline = Pipeline(Settings(routes=[route], models={"poll_s": 0}), Metrics(), lambda i, a: got.append(a))
    pipeline.load_models()
    r = pipeline.routes[0]
    names = ["vibration", "current", "pressure"]

    def send(kind: str, row: list[float], seq: int) -> object:
        metrics = tuple(
            metric(n if kind == "DBIRTH" else None, DT.DOUBLE, v, alias=i + 1)
            for i, (n, v) in enumerate(zip(names, row, strict=True))
        )
        message = spb.DBirth if kind == "DBIRTH" else spb.DData
        payload = message(timestamp=TS + 1000 * seq, seq=seq, metrics=metrics).encode(include_dtypes=kind == "DBIRTH")
        return pipeline.handle(Inbound(f"spBv1.0/plant1/{kind}/edge1/pump7", payload, route=r))

    try:
        rows = readings(WINDOW + 1)
        send("DBIRTH", rows[0], 0)
        shutil.copytree(repo / "1", tmp_path / "v2")  # the same model as version 2: a hot swap on the next reload
        manifest = read_manifest(tmp_path / "v2")
        manifest.version = "2"
        write_manifest(tmp_path / "v2", manifest)
        (tmp_path / "v2").rename(repo / "2")
        pipeline.reload()
        assert r.serving.version == "2"
        outcomes = [send("DDATA", row, i) for i, row in enumerate(rows[1:], 1)]
        errors = [json.loads(o.body) for o in outcomes if isinstance(o, Answer)]
        assert errors == [], errors
        assert sum(o is None for o in outcomes) >= 1  # a full window went on to inference
    finally:
        pipeline.close()
