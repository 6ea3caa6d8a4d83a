"""LiteRT inference: the one runtime the worker, ``evaluate`` and ``predict`` share.

Only ``ai_edge_litert`` is imported here, never TensorFlow, so the serving install stays small.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter


class LiteRTModel:
    """A single-input, single-output LiteRT model that runs batches of any size.

    The interpreter is resized to each batch's exact size: after the largest batch has been allocated once, a
    resize costs well under a millisecond (the arena keeps its size), while padding a batch of 9 up to 16 would run
    7 images for nothing. Memory therefore follows the largest batch a caller runs (a route's ``max_batch``).
    """

    def __init__(self, path: Path, *, num_threads: int | None = None) -> None:
        self._interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self._lock = threading.Lock()
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected one input and one output, got {len(inputs)} and {len(outputs)}")
        self._input, self._output = inputs[0], outputs[0]
        self.input_shape = tuple(int(d) for d in self._input["shape"][1:])
        self.output_shape = tuple(int(d) for d in self._output["shape"][1:])
        self.input_dtype = self._input["dtype"]
        self._batch = 0

    def _resize(self, batch: int) -> None:
        self._interpreter.resize_tensor_input(self._input["index"], [batch, *self.input_shape])
        self._interpreter.allocate_tensors()
        self._batch = batch

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run ``batch`` (n, *input_shape) float32 and return (n, *output_shape)."""
        with self._lock:
            if batch.shape[0] != self._batch:
                self._resize(batch.shape[0])
            self._interpreter.set_tensor(self._input["index"], batch.astype(self.input_dtype, copy=False))
            self._interpreter.invoke()
            return self._interpreter.get_tensor(self._output["index"])  # a copy already


def predict_all(model: LiteRTModel, inputs: np.ndarray, batch: int = 64) -> np.ndarray:
    """Run any number of inputs in chunks of ``batch``: evaluation sets do not fit one interpreter allocation."""
    if not len(inputs):
        return np.zeros((0, *model.output_shape), np.float32)
    return np.concatenate([model.predict(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])
