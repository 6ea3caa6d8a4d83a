"""paho's Properties with shared tables (plcsense/worker/paho_speedup.py) still pack, unpack, validate and clear
as paho's own do; the worker's request/response tests cover them end to end through Mosquitto."""

from __future__ import annotations

import pytest
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from plcsense.worker.paho_speedup import share_property_tables


@pytest.fixture(autouse=True, scope="module")
def shared() -> None:
    assert share_property_tables(), "paho-mqtt's Properties changed: look at paho_speedup.py"


def test_properties_round_trip_and_stay_per_object():
    sent = Properties(PacketTypes.PUBLISH)
    sent.ResponseTopic = "plant/d1/reply"
    sent.CorrelationData = b"\x00\x01abc"
    sent.MessageExpiryInterval = 30
    sent.UserProperty = [("line", "3"), ("shift", "night")]
    got = Properties(PacketTypes.PUBLISH)
    got.unpack(sent.pack())
    assert got.ResponseTopic == "plant/d1/reply" and got.CorrelationData == b"\x00\x01abc"
    assert got.MessageExpiryInterval == 30 and got.UserProperty == [("line", "3"), ("shift", "night")]
    assert not hasattr(Properties(PacketTypes.PUBLISH), "ResponseTopic")  # nothing leaks through shared tables

    got.unpack(Properties(PacketTypes.PUBLISH).pack())  # unpack clears what the object held
    assert not hasattr(got, "ResponseTopic") and got.isEmpty() and got.packetType == PacketTypes.PUBLISH


def test_properties_still_refuse_what_paho_refuses():
    props = Properties(PacketTypes.PUBLISH)
    with pytest.raises(MQTTException, match="must be one of"):
        props.NoSuchProperty = 1
    with pytest.raises(MQTTException, match="does not apply"):
        props.ReceiveMaximum = 10  # a CONNECT property
    connect = Properties(PacketTypes.CONNECT)
    with pytest.raises(MQTTException, match="range"):
        connect.ReceiveMaximum = 0
