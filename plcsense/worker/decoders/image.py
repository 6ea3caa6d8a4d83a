"""``encoding: image``: JPEG/PNG/BMP bytes, decoded with the same code training used, so pixels match."""

from __future__ import annotations

import numpy as np

from plcsense.errors import ErrorCode
from plcsense.models.bundle import ImageSpec
from plcsense.models.inputs import InputError, decode_image
from plcsense.worker.decoders.base import Decoded, Decoder


class ImageDecoder(Decoder):
    encoding = "image"

    def decode(self, topic: str, payload: bytes) -> Decoded:
        if not isinstance(self.spec, ImageSpec):
            raise InputError(ErrorCode.BAD_ENCODING, "route encoding is image but the model takes sensor windows")
        return Decoded(decode_image(payload, self.spec, max_pixels=self.route.max_image_pixels, dtype=np.uint8))
