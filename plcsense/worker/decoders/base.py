"""The one interface every payload encoding implements, and the checks all of them share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import numpy as np

from plcsense.errors import ErrorCode
from plcsense.models.bundle import ImageSpec, Manifest, SensorSpec
from plcsense.models.inputs import InputError
from plcsense.worker.settings import RouteSettings


@dataclass(slots=True)
class Decoded:
    """A decoded payload: a full model input, or one reading for a windowed sensor model."""

    array: np.ndarray
    id: str | None = None
    ts: float | str | None = None
    is_reading: bool = False
    device: str | None = None
    """The window this reading belongs to, when the encoding names devices itself (Sparkplug); else the topic."""
    seconds: float | None = None
    """The reading's time in seconds, when the encoding fixes the unit of ``ts`` (Sparkplug: milliseconds); else
    windows guess it from ``ts``'s size, which mistakes a controller's milliseconds since boot for seconds."""


@dataclass(slots=True)
class Lifecycle:
    """A protocol message that is not an input (Sparkplug DEATH/CMD): nothing to answer."""

    forget: str | None = None
    """A device (or node) whose windows end here: readings from before and after must not share one."""


class Decoder(ABC):
    """Turns one payload into a model input for one route (the route's bundle fixes the input spec)."""

    encoding: ClassVar[str]

    def __init__(self, manifest: Manifest, route: RouteSettings) -> None:
        self.manifest = manifest
        self.spec = manifest.input
        self.route = route

    @abstractmethod
    def decode(self, topic: str, payload: bytes) -> Decoded | Lifecycle:
        """Decode and validate, or raise :class:`InputError` saying what is wrong with the payload."""

    def continue_from(self, previous: Decoder) -> None:  # noqa: B027 (an optional hook: most decoders keep no state)
        """Take over what ``previous`` (the serving version's decoder) learnt from the stream, when a new version
        swaps in or a candidate serves beside it; stateless decoders have nothing to take."""


def message_id(value: Any) -> str | None:
    return None if value is None else str(value)[:200]


def checked_ts(ts: Any) -> float | str | None:
    """A reading's own time: a finite number (s or ms since the epoch) or an ISO 8601 string, else refused."""
    if ts is None:
        return None
    if isinstance(ts, bool) or not isinstance(ts, (int, float, str)):
        raise InputError(ErrorCode.INVALID_JSON, '"ts" must be a number or an ISO 8601 string')
    if isinstance(ts, str):
        try:
            datetime.fromisoformat(ts.replace("Z", "+00:00"))
        except ValueError:
            raise InputError(
                ErrorCode.INVALID_JSON, f'"ts" {ts[:40]!r} is neither a number nor an ISO 8601 time'
            ) from None
        return ts
    try:
        value = float(ts)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):  # 1e400 in JSON: no time at all, and it would skip the late/duplicate checks
        raise InputError(ErrorCode.INVALID_JSON, f'"ts" {str(ts)[:40]} is not a finite number')
    return value


def as_tensor(data: Any, spec: SensorSpec | ImageSpec) -> np.ndarray:
    if isinstance(data, dict) and isinstance(spec, SensorSpec):
        missing = [name for name in spec.channels if name not in data]
        if missing:
            raise InputError(ErrorCode.BAD_SHAPE, f"reading lacks channels {missing}")
        data = [data[name] for name in spec.channels]
    try:
        return np.asarray(data, dtype=np.float64)
    except OverflowError:
        raise InputError(ErrorCode.NON_FINITE, "input values overflow float32") from None
    except (ValueError, TypeError):
        raise InputError(ErrorCode.BAD_SHAPE, "data must be a number array of uniform shape") from None


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def checked(decoded: Decoded, spec: SensorSpec | ImageSpec) -> Decoded:
    """Shape (a full input, or one reading of a windowed model), finiteness and float32 range."""
    array = decoded.array
    if array.shape != spec.shape:
        if isinstance(spec, SensorSpec) and array.shape == (len(spec.channels),):
            decoded.is_reading = True
        else:
            single = f" or one reading of shape [{len(spec.channels)}]" if isinstance(spec, SensorSpec) else ""
            raise InputError(
                ErrorCode.BAD_SHAPE, f"input shape {list(array.shape)}, model needs {list(spec.shape)}{single}"
            )
    # One reduction checks NaN (max propagates it), infinities and values beyond float32's range together.
    if array.size and not np.abs(array).max() <= _FLOAT32_MAX:
        if not np.isfinite(array).all():
            raise InputError(ErrorCode.NON_FINITE, "input contains NaN or infinity")
        raise InputError(ErrorCode.NON_FINITE, "input values overflow float32")
    decoded.array = array.astype(np.float32, copy=False)
    return decoded
