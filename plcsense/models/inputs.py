"""Turning raw inputs into model tensors, shared by training and the worker so both see identical pixels."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from plcsense.models.bundle import ImageSpec

# Decompression bombs from a misbehaving camera must fail cleanly instead of eating the gateway's memory.
Image.MAX_IMAGE_PIXELS = 64_000_000


class InputError(ValueError):
    """Input that cannot be fed to a model; ``code`` becomes the error metric's reason label."""

    def __init__(self, code: str, detail: str, id: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.id = id
        """The message id, when the payload was readable enough to have one."""


def image_to_array(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Convert to the spec's colour mode and size, return float32 (H, W, C) with values 0..255."""
    if spec.resize == "exact" and image.size != (spec.width, spec.height):
        raise InputError(
            "bad_shape",
            f"image is {image.width}x{image.height}, model needs exactly {spec.width}x{spec.height}",
        )
    image = image.convert("L" if spec.color_mode == "grayscale" else "RGB")
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32)
    return array.reshape(spec.shape)


def decode_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode JPEG/PNG/BMP bytes into the model's input tensor."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image_to_array(image, spec)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(
            "undecodable_image", "payload is not an image format Pillow reads (JPEG, PNG, BMP...)"
        ) from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError("undecodable_image", f"cannot decode image ({exc})") from None


def load_image_file(path: str, spec: ImageSpec) -> np.ndarray:
    with open(path, "rb") as handle:
        return decode_image(handle.read(), spec)
