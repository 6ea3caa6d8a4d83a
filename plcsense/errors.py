"""Error codes every answer, metric label, test, demo and bench share: one enum, so a code cannot drift."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The ``error`` field of an error document and the ``reason`` label of ``plcsense_errors_total``."""

    INVALID_JSON = "invalid_json"
    BAD_SHAPE = "bad_shape"
    NON_FINITE = "non_finite"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNDECODABLE_IMAGE = "undecodable_image"
    IMAGE_TOO_LARGE = "image_too_large"
    BAD_NPY = "bad_npy"
    BAD_SPARKPLUG = "bad_sparkplug"
    BAD_ENCODING = "bad_encoding"
    MODEL_UNAVAILABLE = "model_unavailable"
    LATE_READING = "late_reading"
    DUPLICATE_READING = "duplicate_reading"
    WINDOW_RESET = "window_reset"
    INFERENCE_FAILED = "inference_failed"
    INTERNAL = "internal"
