"""Sparkplug B input: protobuf payloads on ``spBv1.0/<group>/<type>/<edge node>[/<device>]`` topics.

Sparkplug B (Eclipse Tahu) is what many PLC gateways speak instead of plain JSON. A payload carries many metrics;
the numeric ones become one reading (metric name -> value). After a BIRTH message an edge node may send metrics by
alias only, so :class:`AliasTable` remembers each node's and device's name<->alias map (and datatypes, which DATA
messages usually omit but signed integers need) from NBIRTH/DBIRTH.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from plcsense.models.inputs import InputError
from plcsense.worker import sparkplug_b_pb2

NAMESPACE = "spBv1.0"
NODE_TYPES = frozenset({"NBIRTH", "NDEATH", "NDATA", "NCMD"})
DEVICE_TYPES = frozenset({"DBIRTH", "DDEATH", "DDATA", "DCMD"})

# Sparkplug datatype ids (DataType enum in sparkplug_b.proto). Signed integers travel as two's complement in the
# unsigned int_value/long_value fields, so the bit width is needed to get the sign back.
_SIGNED_BITS = {1: 8, 2: 16, 3: 32, 4: 64}  # Int8, Int16, Int32, Int64
_UNSIGNED = frozenset({5, 6, 7, 8})  # UInt8..UInt64
_NUMERIC = frozenset({*_SIGNED_BITS, *_UNSIGNED, 9, 10, 11})  # + Float, Double, Boolean
_UNKNOWN = 0

DeviceKey = tuple[str, str, str | None]
"""(group, edge node, device or None for the node itself): whose aliases a message uses."""


@dataclass(frozen=True, slots=True)
class SparkplugTopic:
    """The parts of a Sparkplug B topic; ``device`` is None for node-level messages (N*)."""

    namespace: str
    group: str
    message_type: str
    edge_node: str
    device: str | None = None

    @property
    def key(self) -> DeviceKey:
        return (self.group, self.edge_node, self.device)


@dataclass(frozen=True, slots=True)
class SparkplugReading:
    """The numeric metrics of one payload, by metric name, with the payload's own time and sequence number."""

    metrics: dict[str, float]
    timestamp_ms: int | None = None
    seq: int | None = None


def parse_topic(topic: str) -> SparkplugTopic | None:
    """Split a Sparkplug B node/device topic; None for anything else (other topics, STATE, malformed levels).

    Device messages (D*) need the device level and node messages (N*) must not have one, as the spec says.
    """
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != NAMESPACE or any(not p or p in ("+", "#") for p in parts):
        return None
    _, group, message_type, edge_node, *rest = parts
    device = rest[0] if rest else None
    if (device is None and message_type not in NODE_TYPES) or (device is not None and message_type not in DEVICE_TYPES):
        return None
    return SparkplugTopic(NAMESPACE, group, message_type, edge_node, device)


def _parse(payload: bytes) -> Any:
    try:
        return sparkplug_b_pb2.Payload.FromString(payload)
    except (DecodeError, ValueError, RecursionError) as exc:
        raise InputError("bad_sparkplug", f"payload is not a Sparkplug B protobuf ({exc})") from None


def _signed(value: int, bits: int) -> int:
    # Mask first: some encoders sign-extend Int8/Int16 to 32 bits, others (pysparkplug) keep only the type's bits.
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _numeric_value(metric: Any, datatype: int) -> float | None:
    """The metric's value as a float, or None where it is null, non-numeric or absent."""
    if metric.is_null or (datatype != _UNKNOWN and datatype not in _NUMERIC):
        return None
    field = metric.WhichOneof("value")
    if field in ("int_value", "long_value"):
        value = getattr(metric, field)
        bits = _SIGNED_BITS.get(datatype)
        return float(_signed(value, bits) if bits else value)
    if field in ("float_value", "double_value"):
        return float(getattr(metric, field))
    if field == "boolean_value":
        return 1.0 if metric.boolean_value else 0.0
    return None  # string, bytes (arrays, files), dataset, template, extension, or no value at all


def _reading(message: Any, aliases: dict[int, str] | None, datatypes: dict[str, int] | None) -> SparkplugReading:
    metrics: dict[str, float] = {}
    unknown_aliases: list[int] = []
    for metric in message.metrics:
        name = metric.name
        if not name and metric.HasField("alias"):
            name = (aliases or {}).get(metric.alias, "")
            if not name:
                unknown_aliases.append(metric.alias)
                continue
        if not name:
            continue
        datatype = metric.datatype or (datatypes or {}).get(name, _UNKNOWN)
        value = _numeric_value(metric, datatype)
        if value is not None:
            metrics[name] = value  # a repeated metric (e.g. historical values) keeps its last value
    if not metrics:
        if unknown_aliases:
            detail = (
                f"metric aliases {sorted(set(unknown_aliases))[:10]} are unknown: no NBIRTH/DBIRTH seen for this "
                "node or device since the worker started (ask the edge node to rebirth)"
            )
        elif not message.metrics:
            detail = "payload has no numeric metrics: it holds no metrics at all"
        else:
            detail = (
                f"payload has no numeric metrics: its {len(message.metrics)} metric(s) are null, unnamed, "
                "or strings, datetimes, bytes, datasets or templates"
            )
        raise InputError("bad_sparkplug", detail)
    timestamp = message.timestamp if message.HasField("timestamp") else None
    seq = message.seq if message.HasField("seq") else None
    return SparkplugReading(metrics, timestamp, seq)


def decode_sparkplug(
    payload: bytes, aliases: dict[int, str] | None = None, datatypes: dict[str, int] | None = None
) -> SparkplugReading:
    """Decode one Sparkplug B payload into its numeric metrics.

    ``aliases`` (alias -> name) resolves metrics sent by alias only; ``datatypes`` (name -> Sparkplug datatype id)
    supplies the datatype DATA messages usually leave out, which signed integers need. Both come from the BIRTH
    message: :meth:`AliasTable.decode` passes them. Floats, doubles, integers and booleans (as 0/1) are kept;
    strings, datetimes, bytes (arrays), datasets, templates, null metrics and unresolvable aliases are skipped.

    Raises InputError("bad_sparkplug") when the bytes are not a Sparkplug B protobuf or hold no numeric metric.
    """
    return _reading(_parse(payload), aliases, datatypes)


class AliasTable:
    """Name<->alias maps per (group, edge node, device), learnt from NBIRTH/DBIRTH, used to resolve DATA metrics.

    An NBIRTH starts a new session for the whole edge node, so it also drops what its devices' old DBIRTHs said;
    NDEATH/DDEATH drop the node's or device's entries. Memory stays bounded: beyond ``max_devices`` keys the least
    recently used one is forgotten (its next DATA fails until it rebirths). Safe to share between threads.
    """

    def __init__(self, max_devices: int = 10_000) -> None:
        self.max_devices = max_devices
        self._entries: OrderedDict[DeviceKey, tuple[dict[int, str], dict[str, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def aliases(self, key: DeviceKey) -> dict[int, str]:
        """alias -> metric name for ``key`` (a copy; empty when no BIRTH was seen)."""
        with self._lock:
            entry = self._entries.get(key)
            return dict(entry[0]) if entry else {}

    def resolve(self, key: DeviceKey, alias: int) -> str | None:
        """The metric name behind ``alias`` for ``key``, or None when unknown."""
        with self._lock:
            entry = self._entries.get(key)
            return entry[0].get(alias) if entry else None

    def alias_of(self, key: DeviceKey, name: str) -> int | None:
        """The alias the BIRTH gave metric ``name`` for ``key``, or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry:
                for alias, known in entry[0].items():
                    if known == name:
                        return alias
            return None

    def learn(self, topic: SparkplugTopic, payload: bytes) -> None:
        """Record a BIRTH's aliases and datatypes, or forget on a DEATH; other message types are ignored."""
        if topic.message_type in ("NBIRTH", "DBIRTH"):
            self._learn_birth(topic, _parse(payload))
        elif topic.message_type in ("NDEATH", "DDEATH"):
            self.forget(topic)

    def forget(self, topic: SparkplugTopic) -> None:
        """Drop a device's entry, or for a node-level topic the node's and all its devices' entries."""
        with self._lock:
            self._forget_locked(topic)

    def decode(self, topic: SparkplugTopic, payload: bytes) -> SparkplugReading:
        """Decode a BIRTH or DATA payload for ``topic``, learning from BIRTHs first (they carry current values too).

        Other message types (DEATH, CMD) carry no readings: a DEATH still clears state, then InputError is raised.
        """
        if topic.message_type in ("NDEATH", "DDEATH"):
            self.forget(topic)
        if topic.message_type not in ("NBIRTH", "DBIRTH", "NDATA", "DDATA"):
            raise InputError("bad_sparkplug", f"{topic.message_type} messages carry no sensor readings")
        message = _parse(payload)
        if topic.message_type in ("NBIRTH", "DBIRTH"):
            self._learn_birth(topic, message)
        with self._lock:
            entry = self._entries.get(topic.key)
            if entry:
                self._entries.move_to_end(topic.key)
        aliases, datatypes = entry if entry else (None, None)
        return _reading(message, aliases, datatypes)

    def _learn_birth(self, topic: SparkplugTopic, message: Any) -> None:
        aliases: dict[int, str] = {}
        datatypes: dict[str, int] = {}
        for metric in message.metrics:
            if not metric.name:
                continue  # a BIRTH must name every metric; a nameless one teaches nothing
            if metric.HasField("alias"):
                aliases[metric.alias] = metric.name
            if metric.datatype:
                datatypes[metric.name] = metric.datatype
        with self._lock:
            if topic.message_type == "NBIRTH":
                self._forget_locked(topic)
            self._entries[topic.key] = (aliases, datatypes)
            self._entries.move_to_end(topic.key)
            while len(self._entries) > self.max_devices:
                self._entries.popitem(last=False)

    def _forget_locked(self, topic: SparkplugTopic) -> None:
        if topic.device is not None:
            self._entries.pop(topic.key, None)
            return
        for key in [k for k in self._entries if k[0] == topic.group and k[1] == topic.edge_node]:
            del self._entries[key]
