"""Payload decoding: bytes from a PLC into a float32 tensor, or an :class:`InputError` saying what was wrong."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from plcsense.models.bundle import ImageSpec, Manifest, SensorSpec
from plcsense.models.inputs import InputError, decode_image

Encoding = Literal["json", "npy", "image", "sparkplug"]


@dataclass(slots=True)
class Decoded:
    """A decoded payload: a full model input, or one reading for a windowed sensor model."""

    array: np.ndarray
    id: str | None = None
    ts: float | str | None = None
    is_reading: bool = False


def _json_id(value: Any) -> str | None:
    return None if value is None else str(value)


def _as_tensor(data: Any, spec: SensorSpec | ImageSpec) -> np.ndarray:
    if isinstance(data, dict) and isinstance(spec, SensorSpec):
        missing = [name for name in spec.channels if name not in data]
        if missing:
            raise InputError("bad_shape", f"reading lacks channels {missing}")
        data = [data[name] for name in spec.channels]
    try:
        array = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError):
        raise InputError("bad_shape", "data must be a number array of uniform shape") from None
    return array


def _decode_json(payload: bytes, spec: SensorSpec | ImageSpec) -> Decoded:
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError("invalid_json", f"payload is not valid JSON ({exc})") from None
    if isinstance(doc, dict):
        if "data" not in doc:
            raise InputError("invalid_json", 'a JSON object payload needs a "data" field')
        ts = doc.get("ts")
        if not (ts is None or isinstance(ts, (int, float, str))) or isinstance(ts, bool):
            raise InputError("invalid_json", '"ts" must be a number or a string')
        msg_id = _json_id(doc.get("id"))
        try:
            return Decoded(_as_tensor(doc["data"], spec), msg_id, ts)
        except InputError as exc:
            exc.id = msg_id
            raise
    if isinstance(doc, list):
        return Decoded(_as_tensor(doc, spec))
    raise InputError("invalid_json", "payload must be a JSON array of numbers or an object with a data field")


def _decode_npy(payload: bytes) -> Decoded:
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError("bad_npy", f"payload is not a readable .npy array ({exc})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise InputError("bad_npy", "npy payload must hold a numeric array")
    return Decoded(array)


def decode_metrics(metrics: dict[str, float], manifest: Manifest, *, msg_id: str | None, ts: float | None) -> Decoded:
    """A reading given as named metrics (Sparkplug B) mapped onto the model's channels by name."""
    spec = manifest.input
    if not isinstance(spec, SensorSpec):
        raise InputError("bad_encoding", "route encoding is sparkplug but the model takes images")
    try:
        return _checked(Decoded(_as_tensor(metrics, spec), msg_id, ts), spec)
    except InputError as exc:
        exc.id = msg_id
        raise


def decode(payload: bytes, encoding: Encoding, manifest: Manifest) -> Decoded:
    """Decode and validate one payload against the model's input spec."""
    spec = manifest.input
    if encoding == "image":
        if not isinstance(spec, ImageSpec):
            raise InputError("bad_encoding", "route encoding is image but the model takes sensor windows")
        return Decoded(decode_image(payload, spec))
    decoded = _decode_json(payload, spec) if encoding == "json" else _decode_npy(payload)
    try:
        return _checked(decoded, spec)
    except InputError as exc:
        exc.id = decoded.id
        raise


def _checked(decoded: Decoded, spec: SensorSpec | ImageSpec) -> Decoded:
    array = decoded.array
    if array.shape != spec.shape:
        if isinstance(spec, SensorSpec) and array.shape == (len(spec.channels),):
            decoded.is_reading = True
        else:
            single = f" or one reading of shape [{len(spec.channels)}]" if isinstance(spec, SensorSpec) else ""
            raise InputError("bad_shape", f"input shape {list(array.shape)}, model needs {list(spec.shape)}{single}")
    if not np.all(np.isfinite(array)):
        raise InputError("non_finite", "input contains NaN or infinity")
    if array.size and float(np.max(np.abs(array))) > float(np.finfo(np.float32).max):
        raise InputError("non_finite", "input values overflow float32")
    decoded.array = array.astype(np.float32)
    if isinstance(decoded.ts, float) and not math.isfinite(decoded.ts):
        decoded.ts = None
    return decoded
