"""``python -m plcsense.training.tfconvert FOLDER``: the LiteRT conversion of a model trained on another backend.

:func:`plcsense.training.backend.convert_elsewhere` starts this in a fresh process with
``KERAS_BACKEND=tensorflow`` (a process's Keras backend is fixed when Keras is first imported). ``FOLDER`` holds
``model.keras``, ``request.json`` (the quantisation mode, the plcsense modules whose layer classes the model
uses) and, for int8, ``representative.npy``; the process writes ``model.tflite`` beside them with the same
converter settings as a TensorFlow-trained model gets.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m plcsense.training.tfconvert FOLDER", file=sys.stderr)
        return 2
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        print("the LiteRT converter needs KERAS_BACKEND=tensorflow", file=sys.stderr)
        return 2
    from plcsense.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras

    from plcsense.training.export import Quantization, to_tflite

    folder = Path(argv[0])
    request = json.loads((folder / "request.json").read_text())
    for module in request["modules"]:
        if module.startswith("plcsense."):  # registers the model's own layer classes for loading
            importlib.import_module(module)
    model = keras.saving.load_model(folder / "model.keras", compile=False)
    samples = folder / "representative.npy"
    representative = np.load(samples) if samples.is_file() else None
    (folder / "model.tflite").write_bytes(to_tflite(model, Quantization(request["mode"], representative)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
