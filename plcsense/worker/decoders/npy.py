"""``encoding: npy``: NumPy ``.npy`` bytes, read without unpickling and with the header checked first."""

from __future__ import annotations

import io
import math

import numpy as np

from plcsense.errors import ErrorCode
from plcsense.models.inputs import InputError
from plcsense.worker.decoders.base import Decoded, Decoder, checked


def _declared_bytes(payload: bytes) -> int:
    """Bytes the header promises; a header that cannot be read is refused before NumPy allocates anything."""
    stream = io.BytesIO(payload)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except Exception as exc:
        detail = str(exc)[:200] or type(exc).__name__
        raise InputError(
            ErrorCode.BAD_NPY, f"payload is not a readable .npy array ({detail}); send np.save() bytes of numbers"
        ) from None
    if dtype.kind not in "biuf":
        raise InputError(ErrorCode.BAD_NPY, f"npy payload must hold a numeric array, not {dtype}")
    return math.prod(shape) * dtype.itemsize


class NpyDecoder(Decoder):
    encoding = "npy"

    def decode(self, topic: str, payload: bytes) -> Decoded:
        declared = _declared_bytes(payload)
        if declared > len(payload):
            raise InputError(ErrorCode.BAD_NPY, f"header declares {declared} bytes of data, payload has {len(payload)}")
        try:
            array = np.load(io.BytesIO(payload), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(ErrorCode.BAD_NPY, f"payload is not a readable .npy array ({exc})") from None
        return checked(Decoded(array), self.spec)
