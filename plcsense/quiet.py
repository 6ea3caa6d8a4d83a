"""TensorFlow's and LiteRT's notices kept out of the CLI's output, so that it says what a user needs to read.

``TF_CPP_MIN_LOG_LEVEL`` silences TensorFlow's C++ INFO and WARNING lines (converter and SavedModel loader
chatter) but has to be set before TensorFlow is imported, and even then the import prints absl's "All log
messages before absl::InitializeLog()" and oneDNN's "custom operations are on" before it reads the variable.
Those, the int8 converter's settings dump and LiteRT's "Created TensorFlow Lite XNNPACK delegate" come from C++
straight to file descriptor 2, below Python's ``sys.stderr``, so :func:`without_lines` captures that descriptor
around the code that prints them and passes every other line on. The CLI, training and the worker's first model
load use it (importing this module imports no TensorFlow).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

TF_STARTUP = re.compile(
    r"absl::InitializeLog\(\)|oneDNN custom operations are on|cpu_feature_guard|"
    r"^To enable the following instructions:|rebuild TensorFlow with the appropriate compiler flags"
)
CONVERTER = re.compile(r"^fully_quantize: \d")
LITERT_STARTUP = re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.")


@contextlib.contextmanager
def without_lines(noise: re.Pattern[str]) -> Iterator[None]:
    """Run the block with file descriptor 2 captured, then pass on to stderr every line that ``noise`` misses."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep clean
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not noise.search(line)))
            sys.stderr.flush()


def import_tensorflow_quietly() -> None:
    """Import Keras (and TensorFlow under it) without its start-up notices; call it before anything imports them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "keras" not in sys.modules:
        with without_lines(TF_STARTUP):
            import keras

            if keras.backend.backend() != "tensorflow" and importlib.util.find_spec("tensorflow"):
                import tensorflow  # noqa: F401  (another backend's Keras imports it too, to seed its generator)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # "Assets written to ..." at every export
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'"
