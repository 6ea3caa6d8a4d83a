"""int8 export: full-integer, except the layers whose quantisation error the debugger measures over the cut."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from plcsense.training import export
from plcsense.training.export import Quantization, to_tflite


def int8_weights(flatbuffer: bytes) -> int:
    """How many weight matrices of the model are stored as int8."""
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_content=flatbuffer).get_tensor_details()
    return sum(d["dtype"] == np.int8 and len(d["shape"]) == 2 and d["shape"][0] > 1 for d in details)


@pytest.mark.parametrize(("cut", "int8_matrices"), [(float("inf"), 2), (0.2, 0), (-1.0, 2)])
def test_layers_whose_int8_error_exceeds_the_cut_stay_float(monkeypatch, cut, int8_matrices):
    """Both dense layers' int8 outputs are off by ~0.3 quantisation steps, the exp and sum after them by less:
    a cut of 0.2 keeps the two dense layers float and the rest int8; a cut nothing exceeds, or one everything
    exceeds (no int8 model would be left), gives full-integer int8."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).uniform(-1, 1, (300, 4)).astype(np.float32)
    inputs = keras.Input((4,))
    z = keras.layers.Dense(3)(keras.layers.Dense(16, activation="relu")(inputs))
    total = keras.layers.Lambda(lambda t: keras.ops.sum(t, axis=-1, keepdims=True))(keras.ops.exp(z))
    model = keras.Model(inputs, keras.layers.Concatenate()([z, total]))
    monkeypatch.setattr(export, "SENSITIVE_ERROR", cut)
    flatbuffer = to_tflite(model, Quantization("int8", x))
    assert int8_weights(flatbuffer) == int8_matrices
