"""Payload decoding against a model's input spec, without a broker."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import numpy as np
import pytest
from PIL import Image

from plcsense.models.bundle import ImageSpec, Manifest, SensorSpec
from plcsense.models.inputs import InputError
from plcsense.worker.decoders import decode

SENSOR = Manifest(
    schema_version=1,
    name="m",
    version="1",
    created_at=datetime.now(UTC),
    task="anomaly",
    threshold=1.0,
    input=SensorSpec(channels=["a", "b"], window=3, mean=[0, 0], std=[1, 1]),
)
IMAGE = Manifest(
    schema_version=1,
    name="m",
    version="1",
    created_at=datetime.now(UTC),
    task="classification",
    labels=["x", "y"],
    input=ImageSpec(height=4, width=6, channels=3, color_mode="rgb"),
)


def npy(array: np.ndarray, **kw: object) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kw)
    return buffer.getvalue()


def png(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def test_json_array_reading_and_window():
    reading = decode(b"[1, 2.5]", "json", SENSOR)
    assert reading.is_reading and reading.array.dtype == np.float32 and reading.array.tolist() == [1, 2.5]
    window = decode(b"[[1,2],[3,4],[5,6]]", "json", SENSOR)
    assert not window.is_reading and window.array.shape == (3, 2)


def test_json_object_with_id_ts_and_named_channels():
    decoded = decode(b'{"data": {"b": 2, "a": 1, "extra": 9}, "id": 17, "ts": "2026-01-01T00:00:00Z"}', "json", SENSOR)
    assert decoded.array.tolist() == [1, 2] and decoded.id == "17" and decoded.ts == "2026-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b'"text"', "invalid_json"),
        (b'{"id": 1}', "invalid_json"),
        (b'{"data": [1, 2], "ts": [1]}', "invalid_json"),
        (b'{"data": [1, 2], "ts": 1e400}', "invalid_json"),  # no time: it would skip the late/duplicate checks
        (b"[1, 2, 3]", "bad_shape"),
        (b"[[1, 2], [3]]", "bad_shape"),
        (b'["a", "b"]', "bad_shape"),
        (b'{"data": {"a": 1}}', "bad_shape"),
        (b"[NaN, 1]", "non_finite"),
        (b"[Infinity, 1]", "non_finite"),
        (b"[1e39, 1]", "non_finite"),
        (b"[" * 100_000, "invalid_json"),
    ],
)
def test_bad_json(payload, code):
    with pytest.raises(InputError) as exc:
        decode(payload, "json", SENSOR)
    assert exc.value.code == code and exc.value.detail


def pickled_npy() -> bytes:
    """An object-dtype .npy as NumPy writes one (header, then a pickle), built by hand so nothing here pickles."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    return header.getvalue() + b"\x80\x04N."  # a pickle of None after the header


def test_npy_numeric_and_pickle_refused():
    assert decode(npy(np.ones((3, 2), np.float64)), "npy", SENSOR).array.shape == (3, 2)
    with pytest.raises(InputError) as exc:
        decode(pickled_npy(), "npy", SENSOR)
    assert exc.value.code == "bad_npy"
    with pytest.raises(InputError) as exc:
        decode(b"\x93NUMPY garbage", "npy", SENSOR)
    assert exc.value.code == "bad_npy"
    with pytest.raises(InputError) as exc:
        decode(npy(np.array([np.nan, 1.0])), "npy", SENSOR)
    assert exc.value.code == "non_finite"


def test_images_resized_and_converted():
    """The worker keeps decoded images as uint8 (a quarter of float32's memory); the model casts on input."""
    array = decode(png(60, 40, "L"), "image", IMAGE).array
    assert array.shape == (4, 6, 3) and array.dtype == np.uint8 and np.all(array == 128)


def test_image_exact_size_rule():
    strict = IMAGE.model_copy(update={"input": IMAGE.input.model_copy(update={"resize": "exact"})})
    assert decode(png(6, 4, "RGB"), "image", strict).array.shape == (4, 6, 3)
    with pytest.raises(InputError) as exc:
        decode(png(7, 4, "RGB"), "image", strict)
    assert exc.value.code == "bad_shape"


@pytest.mark.parametrize("payload", [b"", b"hello", png(6, 4)[:40]])
def test_corrupt_images(payload):
    with pytest.raises(InputError) as exc:
        decode(payload, "image", IMAGE)
    assert exc.value.code == "undecodable_image"


def test_image_encoding_on_a_sensor_model():
    with pytest.raises(InputError) as exc:
        decode(png(6, 4), "image", SENSOR)
    assert exc.value.code == "bad_encoding"
