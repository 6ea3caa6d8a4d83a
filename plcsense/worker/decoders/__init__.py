"""One decoder per payload encoding behind :class:`Decoder`; a new encoding is one small module and one line here."""

from __future__ import annotations

from pathlib import Path

from plcsense.models.bundle import Manifest
from plcsense.worker.decoders.base import Decoded, Decoder, Lifecycle
from plcsense.worker.decoders.image import ImageDecoder
from plcsense.worker.decoders.json_reading import JsonDecoder
from plcsense.worker.decoders.npy import NpyDecoder
from plcsense.worker.decoders.sparkplug import SparkplugDecoder
from plcsense.worker.settings import RouteSettings

DECODERS: dict[str, type[Decoder]] = {d.encoding: d for d in (JsonDecoder, NpyDecoder, ImageDecoder, SparkplugDecoder)}

__all__ = ["DECODERS", "Decoded", "Decoder", "Lifecycle", "decode", "make_decoder"]


def make_decoder(manifest: Manifest, route: RouteSettings) -> Decoder:
    return DECODERS[route.encoding](manifest, route)


def decode(payload: bytes, encoding: str, manifest: Manifest, topic: str = "") -> Decoded | Lifecycle:
    """Decode one payload outside a running worker (tools, tests), as a route with default settings would."""
    route = RouteSettings(name="adhoc", topic="#", model=Path("."), encoding=encoding)  # type: ignore[arg-type]
    return make_decoder(manifest, route).decode(topic, payload)
