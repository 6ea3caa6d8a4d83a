"""Out-of-distribution scoring for classifiers, fitted at export and computed inside the exported graph.

A classifier asked about a photo unlike anything it was trained on still answers one of its classes, often
with high confidence. The exported model therefore outputs one element more than there are classes: a score
that grows with the distance of the input's penultimate features, scaled to unit length, to the nearest class
mean under the covariance shared by all classes (the Mahalanobis score of Lee et al., NeurIPS 2018, on
normalised features as in Mueller and Hein's Mahalanobis++, 2025). Means and covariance come from the training
features; the threshold, the 99th percentile of the validation inputs' scores measured with the exported LiteRT
model, from validation data only: about 1 % of inputs like the training data are flagged, and the test data is
never looked at.

Chosen by measurement (threshold at the validation 99th / 95th percentile; share of foreign photos flagged, share
of the model's own test photos flagged): digits scratch CNN <- NEU steel photos: unit-length Mahalanobis
0.997 / 1.1 % (0.95: 1.000 / 2.2 %), energy score (Liu et al., NeurIPS 2020) 0.946 / 2.2 % (0.978 / 7.0 %), max
softmax 0.661 / 1.9 %, Mahalanobis on raw features 0.181 / 0 % (0.396 / 2.2 %); NEU MobileNetV2 probe <- digit
scans: every score 0.96-1.00 at 1-3 %. On the tests' tiny grey-picture CNN the energy score flagged none of the
noise and checkerboard pictures (a ReLU network is most confident far from its data); Mahalanobis all of them.
The 95th percentile flagged 7-10 % of NEU's own test photos, hence the 99th.
"""

from __future__ import annotations

import hashlib
import logging
import math

import keras
import numpy as np
from keras import layers

log = logging.getLogger("plcsense.training")

OOD_SCORE = "mahalanobis"
VALIDATION_QUANTILE = 0.99
"""Share of validation inputs scored at or below the threshold: about 1 % of in-distribution inputs flagged.
The validation distance at this quantile also maps to a score of 0.5, where an int8 output resolves best."""
QUANTILE_METHOD = "weibull"
"""The k-th of n sorted scores is exceeded by (n + 1 - k) / (n + 1) of new inputs on average, so the quantile is
read at position q (n + 1) (the largest score when that is past n). NumPy's default, at (n - 1) q + 1, flags about
1 - (0.99 (n - 1) + 1) / (n + 1) instead: 1.7 % with 144 validation photos, 3.6 % with 36."""
SATURATED = 1 - 1 / 255
"""A threshold at or above this is at the top of an int8 output's range (one quantisation step below 1)."""
INT8_NOTE = (
    "int8: the ood score's ranges are calibrated on training inputs only, and it misses some foreign inputs "
    "(measured: an int8 digit model flagged 93.5 % of NEU steel photos, its float model 100 %); "
    "export with --quantize float16 or none when unknown inputs matter"
)
"""Logged by every int8 export of a classifier."""
COMPONENTS = 128
"""Leading principal directions of the feature covariance kept in the graph (see :class:`MahalanobisScore`)."""
_EPS = 1e-12


def penultimate(model: keras.Model) -> keras.KerasTensor:
    """The features the final softmax layer reads, as a tensor of ``model``'s graph.

    The final layer is a ``Dense`` (scratch CNN, 1-D CNN) or a nested head model whose last layer is (backbone
    classifiers); for the nested case the head's inner graph is wrapped and called on the tensor the head reads.
    """
    last = model.layers[-1]
    if isinstance(last, layers.Dense):
        return last.input
    if isinstance(last, keras.Model):
        inner = keras.Model(last.inputs, penultimate(last))
        # Functional models override ``input`` with their own Input; the base property gives the tensor they were
        # first called on in the outer graph (the head is called once, when the classifier is built).
        return inner(keras.Operation.input.fget(last))
    raise ValueError(f"cannot find the penultimate features of {model.name}: its last layer is {type(last).__name__}")


FITTED = ("basis", "inv_variances", "means", "mean_norms", "centres", "residual_weight", "scale")
"""What :func:`fit_mahalanobis` (and the validation scale) fit, in the order of :class:`MahalanobisScore`'s
weights."""


@keras.saving.register_keras_serializable(package="plcsense")
class MahalanobisScore(layers.Layer):
    """``1 - exp(-d / scale)``: ``d`` the squared Mahalanobis distance of unit-length features to the nearest
    class mean, under the shared covariance.

    The covariance is kept as its ``components`` leading principal directions (``basis``, each with its
    variance) plus one variance for everything else (``residual_weight`` = 1 / that variance): the distance of
    probabilistic PCA. 1,280 MobileNetV2 features would otherwise need a 1,280 x 1,280 whitening matrix in
    every bundle, and measured on NEU and digits the leading 64 to 256 directions separate foreign inputs as well
    as the full matrix. The bounded transform keeps the score in 0..1 beside the class probabilities: an int8
    model quantises its one output tensor with one scale, and an unbounded distance would flatten them.
    """

    def __init__(self, classes: int, dims: int, components: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.classes, self.dims, self.components = classes, dims, components
        shapes = {
            "basis": (dims, components),
            "inv_variances": (components,),
            "means": (classes, dims),
            "mean_norms": (classes,),
            "centres": (classes, components),
            "residual_weight": (),
            "scale": (),
        }
        for name in FITTED:
            setattr(self, name, self.add_weight(shape=shapes[name], initializer="ones", trainable=False, name=name))

    def call(self, features: keras.KerasTensor) -> keras.KerasTensor:
        ops = keras.ops
        unit = features * ops.rsqrt(ops.sum(ops.square(features), axis=-1, keepdims=True) + _EPS)
        offsets = ops.expand_dims(ops.matmul(unit, self.basis), 1) - ops.expand_dims(self.centres, 0)
        along = ops.square(offsets)  # (n, classes, components): the offset to each mean along the basis
        # the squared offset to each mean in full, minus its part along the basis: what lies outside the basis
        total = ops.sum(ops.square(unit), -1, keepdims=True) - 2 * ops.matmul(unit, ops.transpose(self.means))
        outside = ops.relu(total + self.mean_norms - ops.sum(along, axis=-1))
        distance = ops.sum(along * self.inv_variances, axis=-1) + outside * self.residual_weight
        per_class = 1.0 - ops.exp(-distance / self.scale)
        # The bounded transform before the minimum over classes, not after: int8 calibrates every tensor's range
        # on training inputs, which lie near one centre and far from the others, so this (n, classes) tensor
        # spans 0..1 and a foreign input's score is not clipped to the small scores of training inputs.
        return ops.min(per_class, axis=-1, keepdims=True)

    def get_config(self) -> dict:
        return {**super().get_config(), "classes": self.classes, "dims": self.dims, "components": self.components}


def unit_length(features: np.ndarray) -> np.ndarray:
    """Features scaled to unit L2 norm, as :class:`MahalanobisScore` does inside the graph."""
    x = features.astype(np.float64)
    return x / np.sqrt(np.sum(x**2, axis=-1, keepdims=True) + _EPS)


def mahalanobis(unit: np.ndarray, fitted: dict[str, np.ndarray]) -> np.ndarray:
    """Squared distance of each unit-length feature vector to the nearest class mean: the graph's in NumPy."""
    offsets = (unit @ fitted["basis"])[:, None] - fitted["centres"][None]
    total = np.sum(unit**2, axis=1, keepdims=True) - 2 * unit @ fitted["means"].T + fitted["mean_norms"]
    outside = np.maximum(total - np.sum(offsets**2, axis=-1), 0)
    distance = np.sum(offsets**2 * fitted["inv_variances"], axis=-1) + outside * fitted["residual_weight"]
    return distance.min(axis=1)


def fit_mahalanobis(unit: np.ndarray, labels: np.ndarray, classes: int) -> dict[str, np.ndarray]:
    """Class means and the shared covariance's leading directions and variances, from unit-length features.

    The covariance is shrunk towards a multiple of the identity (Ledoit-Wolf): with fewer training samples than
    feature dimensions (1,280 for MobileNetV2) the plain estimate is singular. A class without training samples
    gets no centre (its mean would be undefined); it takes the overall mean's place.
    """
    from sklearn.covariance import LedoitWolf

    overall = unit.mean(axis=0)
    means = np.stack([unit[labels == c].mean(axis=0) if np.any(labels == c) else overall for c in range(classes)])
    covariance = LedoitWolf(assume_centered=True).fit(unit - means[labels]).covariance_
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values[::-1], max(values.max() * 1e-9, _EPS))  # flat features (a dead network) too
    k = min(COMPONENTS, len(values))
    basis = vectors[:, ::-1][:, :k]
    return {
        "basis": basis,
        "inv_variances": 1 / values[:k],
        "means": means,
        "mean_norms": np.sum(means**2, axis=1),
        "centres": means @ basis,
        "residual_weight": np.asarray(1 / values[k:].mean() if k < len(values) else 0.0),
    }


def _row_digest(row: np.ndarray) -> bytes:
    """A row's identity, compared as float32 (a trainer may hold its photos as uint8 and hand the validation part
    over as float32); a digest, not the bytes, so that the validation photos are not held a second time."""
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


def _rows_not_in(inputs: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Mask of the rows of ``inputs`` equal to no row of ``others``."""
    seen = {_row_digest(row) for row in others}
    return np.array([_row_digest(row) not in seen for row in inputs], dtype=bool)


def with_ood(
    model: keras.Model, train: tuple[np.ndarray, np.ndarray], val: np.ndarray, classes: int, batch_size: int
) -> keras.Model:
    """``model`` with the ood score appended to its output: (n, classes) -> (n, classes + 1), weights shared.

    Class centres and covariance come from the ``train`` features, leaving out any input that is also in ``val``
    (a final refit on training plus validation data passes both): the validation inputs must be ones the
    statistics have not seen, or their distances, the score's scale and the threshold come out too small. The
    scale is taken from the validation distances, the larger ones for a network that knows its training set.
    """
    features = penultimate(model)
    extract = keras.Model(model.inputs, features)

    def unit(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        # batch by batch, each cast to float32 on its own: Keras' predict() casts the whole array first (1.8 GB
        # for 1,800 uint8 photos of 288 px, the export's peak) and was slower too
        values = [
            extract.predict_on_batch(x[rows[i : i + batch_size]].astype(np.float32))
            for i in range(0, len(rows), batch_size)
        ]
        return unit_length(np.concatenate(values).reshape(len(rows), -1))

    own = np.flatnonzero(_rows_not_in(train[0], val))
    if not len(own) or not len(val):
        raise ValueError("the out-of-distribution score needs validation inputs and training inputs not among them")
    fitted = fit_mahalanobis(unit(train[0], own), train[1][own], classes)
    distances = mahalanobis(unit(val, np.arange(len(val))), fitted)
    quantile = float(np.quantile(distances, VALIDATION_QUANTILE, method=QUANTILE_METHOD))
    fitted["scale"] = np.asarray(max(quantile / math.log(2), _EPS))
    dims, components = fitted["basis"].shape
    score = MahalanobisScore(classes, dims, components, name="ood_score")
    flat = layers.Flatten(name="ood_features")(features) if len(features.shape) > 2 else features
    ood = score(flat)
    score.set_weights([fitted[name].astype(np.float32) for name in FITTED])
    outputs = layers.Concatenate(name="probabilities_and_ood")([model.outputs[0], ood])
    return keras.Model(model.inputs, outputs, name=f"{model.name}_ood")


def fit_threshold(validation_scores: np.ndarray) -> float:
    """The score above which an input is reported unknown: the ``VALIDATION_QUANTILE`` of the validation inputs.

    A threshold at the top of the score's range flags nothing. An int8 model can get there: its ranges are
    calibrated on training inputs, and on a tiny, trivially separable set the distances are all near zero or
    far beyond the threshold, so the quantised score only takes its two end values.
    """
    threshold = float(np.quantile(validation_scores, VALIDATION_QUANTILE, method=QUANTILE_METHOD))
    if threshold >= SATURATED:
        log.warning(
            "the exported model's ood score is saturated on validation inputs (threshold %.4f): no input can be "
            "flagged unknown; export with --quantize float16 or none to detect foreign inputs",
            threshold,
        )
    return threshold
