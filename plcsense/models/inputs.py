"""Turning raw inputs into model tensors, shared by training and the worker so both see identical pixels.

Image payloads come off the network, so :func:`decode_image` bounds the work before a pixel is decoded: only
common camera formats, a pixel budget checked against the header, a floor on the compressed size that a forged
header or a cut-short file cannot meet, and reduced-size JPEG decoding when the model needs far fewer pixels.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from plcsense.errors import ErrorCode
from plcsense.models.bundle import ImageSpec

FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM")
"""What cameras and vision tools send; Pillow's other decoders (EPS via Ghostscript, PSD, ICO...) stay unreachable."""
INPUT_AREA_FACTOR = 64
"""Default pixel budget, relative to the model input: 8x per side, beyond which the model sees under 1/64 of it."""
MIN_MAX_PIXELS = 4096 * 4096
"""The budget never goes below this, so a full frame of any common industrial camera (5 MP 2448x2048, 12 MP
4024x3036, 16 MP 4096x4096) reaches even a 224x224 model; a decoded frame this size is at most 64 MB (RGBA)."""
DRAFT_OVERSAMPLING = 2
"""JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 scale still at least twice the model input: measured on a
2000x2000 JPEG into 224x224, 0.4 grey levels mean difference from a full decode (1.3 at 1x), at a third of the
time and 1/16 to 1/64 of the memory."""
_ARITHMETIC_SOF = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_DEFLATE_MAX_RATIO = 1032
"""Deflate spends at least 2 bits on a 258-byte match, so no stream inflates more than 1032-fold."""

# Pillow pads a truncated file with grey when this is set (by anyone): refuse such files instead.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Backstop for any other Pillow use in the process; decode_image applies its own, stricter budget.
Image.MAX_IMAGE_PIXELS = 64_000_000
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
"""Pillow refuses larger images outright (DecompressionBombError), whatever budget a caller gives."""
# decode_image refuses oversize images from their header itself, so Pillow's warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class InputError(ValueError):
    """Input that cannot be fed to a model; ``code`` becomes the error metric's reason label."""

    def __init__(self, code: str, detail: str, id: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.id = id
        """The message id, when the payload was readable enough to have one."""


def default_max_pixels(spec: ImageSpec) -> int:
    """The pixel budget of :func:`decode_image` when the route sets none."""
    return min(max(INPUT_AREA_FACTOR * spec.height * spec.width, MIN_MAX_PIXELS), PILLOW_MAX_PIXELS)


def _check_exact_size(size: tuple[int, int], spec: ImageSpec) -> None:
    if spec.resize == "exact" and size != (spec.width, spec.height):
        raise InputError(
            ErrorCode.BAD_SHAPE, f"image is {size[0]}x{size[1]}, model needs exactly {spec.width}x{spec.height}"
        )


def image_to_array(image: Image.Image, spec: ImageSpec, dtype: type[np.generic] = np.float32) -> np.ndarray:
    """Convert to the spec's colour mode and size, return (H, W, C) with values 0..255 as ``dtype`` (the worker
    keeps uint8, a quarter of the memory for images waiting in a batch; the model casts on input)."""
    _check_exact_size(image.size, spec)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale (PNG, TIFF; PGM opens as 32-bit "I"): Pillow's own conversion clips at 255 instead of
        # scaling, which turns a whole photo white; a fixed >> 8 would leave 12-bit camera data 16 grey levels
        top = (1 << spec.sample_bits) - 1
        scaled = np.clip(np.asarray(image), 0, top) >> (spec.sample_bits - 8)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    image = image.convert("L" if spec.color_mode == "grayscale" else "RGB")
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=dtype)
    return array.reshape(spec.shape)


def _jpeg_too_short(data: bytes, width: int, height: int) -> bool:
    """A Huffman-coded JPEG spends at least one bit on each 8x8 block's DC code, so data shorter than that cannot
    hold the declared image (libjpeg would silently fill the rest with grey). Arithmetic coding has no such floor."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _ARITHMETIC_SOF:
            return False
        elif marker == 0xDA:  # start of scan: entropy-coded data follows
            return (len(data) - pos) * 8 < math.ceil(width / 8) * math.ceil(height / 8)
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def _png_too_short(data: bytes, width: int, height: int) -> bool:
    """The image data (IDAT) must be at least 1/1032 of the raw scanlines it declares; a shorter zlib stream that
    ends cleanly would otherwise decode with the missing rows left black."""
    bits = data[24] * _PNG_CHANNELS.get(data[25], 1)  # IHDR bit depth and colour type
    raw = height * (1 + math.ceil(width * bits / 8))
    idat, pos = 0, 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += min(length, len(data) - pos - 8)
        pos += 12 + length
    return idat * _DEFLATE_MAX_RATIO < raw


def _check_header(image: Image.Image, data: bytes, spec: ImageSpec, max_pixels: int) -> None:
    """Everything that can be refused from the header alone, before any pixel is decoded."""
    width, height = image.size
    if width * height > max_pixels:
        raise InputError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image declares {width}x{height} = {width * height:,} pixels, more than the {max_pixels:,} this route "
            "accepts (max_image_pixels)",
        )
    _check_exact_size(image.size, spec)
    too_short = {"JPEG": _jpeg_too_short, "PNG": _png_too_short}.get(image.format or "")
    if too_short is not None and too_short(data, width, height):
        raise InputError(
            ErrorCode.UNDECODABLE_IMAGE,
            f"image declares {width}x{height} but its {len(data):,} bytes cannot hold that: truncated or forged",
        )


def decode_image(
    data: bytes, spec: ImageSpec, *, max_pixels: int | None = None, dtype: type[np.generic] = np.float32
) -> np.ndarray:
    """Decode image bytes into the model's input tensor, refusing images over ``max_pixels`` (default
    :func:`default_max_pixels`) with ``image_too_large`` and anything unreadable or truncated with
    ``undecodable_image``."""
    budget = default_max_pixels(spec) if max_pixels is None else max_pixels
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            _check_header(image, data, spec, budget)
            if image.format == "JPEG" and spec.resize == "stretch":
                image.draft(None, (spec.width * DRAFT_OVERSAMPLING, spec.height * DRAFT_OVERSAMPLING))
            image.load()
            return image_to_array(image, spec, dtype)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:  # past Pillow's own limit, whatever the route allows
        raise InputError(
            ErrorCode.IMAGE_TOO_LARGE, f"{exc} (no route takes more than {PILLOW_MAX_PIXELS:,} pixels)"
        ) from None
    except UnidentifiedImageError:
        raise InputError(
            ErrorCode.UNDECODABLE_IMAGE, "payload is not a JPEG, PNG, BMP, TIFF, WebP or PNM/PGM image"
        ) from None
    except Exception as exc:  # Pillow's decoders raise many types on malformed data; all mean the same here
        raise InputError(ErrorCode.UNDECODABLE_IMAGE, f"cannot decode image ({type(exc).__name__}: {exc})") from None


def load_image_file(path: str, spec: ImageSpec) -> np.ndarray:
    """A local file (training, ``predict``, ``evaluate``): the user's own photo, so up to Pillow's own limit, not
    the budget that guards the worker against what arrives over MQTT."""
    with open(path, "rb") as handle:
        return decode_image(handle.read(), spec, max_pixels=PILLOW_MAX_PIXELS)
