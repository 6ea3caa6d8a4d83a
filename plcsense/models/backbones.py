"""Image classifiers on Keras' ImageNet backbones, plus the from-scratch CNN (training only: imports Keras).

Every model takes raw float32 pixels 0..255 and does its own preprocessing inside the graph, so the LiteRT
export and the worker need to know nothing about an architecture's input convention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers

from plcsense.models.architectures import scratch_cnn


class WeightsError(ValueError):
    """Pretrained weights that cannot be had or do not fit; the message says what to do instead."""


@dataclass(frozen=True)
class Backbone:
    build: Callable[..., keras.Model]
    default_size: int
    min_size: int
    rescale: tuple[float, float] | None
    """(scale, offset) the architecture expects on 0..255 input; None when the model rescales itself."""


def _v3(builder: Callable[..., keras.Model]) -> Callable[..., keras.Model]:
    # MobileNetV3 carries its own Rescaling layer (include_preprocessing) and wants plain 0..255 input.
    def build(**kwargs: object) -> keras.Model:
        return builder(include_preprocessing=True, **kwargs)

    return build


BACKBONES: dict[str, Backbone] = {
    "mobilenet_v2": Backbone(keras.applications.MobileNetV2, 224, 32, (1 / 127.5, -1.0)),
    "mobilenet_v3_small": Backbone(_v3(keras.applications.MobileNetV3Small), 224, 32, None),
    "mobilenet_v3_large": Backbone(_v3(keras.applications.MobileNetV3Large), 224, 32, None),
    "efficientnet_b0": Backbone(keras.applications.EfficientNetB0, 224, 32, None),
    "inception_v3": Backbone(keras.applications.InceptionV3, 299, 75, (1 / 127.5, -1.0)),
}


def default_image_size(arch: str) -> int:
    return 128 if arch == "scratch" else BACKBONES[arch].default_size


def build_backbone(arch: str, input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    """The headless backbone with ``weights``: ``imagenet`` (Keras download), None, or a local ``.h5`` path.

    ``input_shape`` may leave height and width None: one backbone then serves every input resolution a training
    run tries (the convolutions do not depend on the size).
    """
    spec = BACKBONES[arch]
    if min(d or spec.min_size for d in input_shape[:2]) < spec.min_size:
        raise WeightsError(f"{arch} needs images of at least {spec.min_size} px; raise --image-size")
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise WeightsError(f"weights file {weights} not found")
    try:
        return spec.build(include_top=False, weights=weights, input_shape=input_shape)
    except (ValueError, OSError, KeyError) as exc:
        if weights == "imagenet":
            raise WeightsError(
                f"cannot get the ImageNet weights for {arch} ({exc}); without internet pass a local file with "
                "--weights PATH.h5, or --weights none to train from random weights"
            ) from None
        raise WeightsError(f"weights file {weights} does not fit {arch} ({exc})") from None
    except Exception as exc:  # Keras' downloader raises plain Exception when offline
        if weights != "imagenet":
            raise
        raise WeightsError(
            f"cannot download the ImageNet weights for {arch} ({exc}); pass --weights PATH.h5 for a local file"
        ) from None


POOLINGS = ("avg", "avgmax")
"""How the head pools the backbone's feature maps: their mean, or their mean and maximum side by side. The
maximum keeps a small defect's response that the mean over a large textured background dilutes."""


def pool(feature_maps: object, pooling: str) -> object:
    """Global pooling of (batch, h, w, c) feature maps into (batch, c) or (batch, 2c) features."""
    mean = layers.GlobalAveragePooling2D(name="pool")(feature_maps)
    if pooling == "avg":
        return mean
    peak = layers.GlobalMaxPooling2D(name="pool_max")(feature_maps)
    return layers.Concatenate(name="pool_avgmax")([mean, peak])


def head(
    feature_shape: tuple[int | None, ...], num_classes: int, *, pooling: str = "avg", dropout: float = 0.2
) -> keras.Model:
    """Feature maps to class probabilities: pooling, dropout, one dense softmax layer."""
    head_in = keras.Input(feature_shape, name="feature_maps")
    h = layers.Dropout(dropout, name="head_dropout")(pool(head_in, pooling))
    # float32 under mixed precision too: a softmax in 16 bits rounds probabilities near 1 and the loss with them
    probabilities = layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")
    return keras.Model(head_in, probabilities(h), name="head")


@dataclass
class Classifier:
    """A classifier on raw pixels, plus the parts transfer learning trains separately."""

    model: keras.Model
    backbone: keras.Model | None = None
    head: keras.Model | None = None
    """Feature maps to class probabilities."""


def preprocessed(arch: str, pixels: object) -> object:
    """Raw 0..255 pixels rescaled the way ``arch`` expects (a no-op for models that rescale themselves)."""
    spec = BACKBONES[arch]
    if spec.rescale:
        return layers.Rescaling(spec.rescale[0], offset=spec.rescale[1], name="preprocess")(pixels)
    return pixels


def classifier(
    arch: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: str | None = "imagenet",
    dropout: float = 0.2,
    pooling: str = "avg",
    backbone: keras.Model | None = None,
) -> Classifier:
    """Build the classifier; for a backbone, the head sits on top of the frozen pretrained network.

    The backbone is called with ``training=False`` so its BatchNorm layers stay in inference mode during
    fine-tuning: updating their statistics on a small batch of factory photos wrecks the pretrained features.
    ``backbone``: an already built (and possibly fine-tuned) backbone of ``arch`` to reuse instead of a new one.
    """
    if arch == "scratch":
        return Classifier(scratch_cnn(input_shape, num_classes))
    if backbone is None:
        backbone = build_backbone(arch, input_shape, weights)
        backbone.trainable = False
    inputs = keras.Input(input_shape, name="pixels")
    feature_maps = backbone(preprocessed(arch, inputs), training=False)
    top = head(feature_maps.shape[1:], num_classes, pooling=pooling, dropout=dropout)
    model = keras.Model(inputs, top(feature_maps), name=f"{arch}_classifier")
    return Classifier(model, backbone, top)


def top_part(backbone: keras.Model, cut: str | None) -> keras.Model:
    """The backbone from the output of layer ``cut`` to its end (the whole backbone when ``cut`` is None).

    The part shares its layers with ``backbone``: training it trains them. Raises ValueError when a layer above
    the cut also reads something from below it (a skip connection across the cut).
    """
    if cut is None:
        return backbone
    return keras.Model(backbone.get_layer(cut).output, backbone.output, name=f"above_{cut}")


def cut_near(backbone: keras.Model, fraction: float) -> str | None:
    """The deepest layer at or below ``fraction`` of the backbone's depth where the network can be cut in two.

    Above such a layer a part can be trained on its cached outputs; None when there is none (e.g. at 0).
    """
    names = [layer.name for layer in backbone.layers]
    for index in range(int(fraction * (len(names) - 1)), 0, -1):
        try:
            top_part(backbone, names[index])
        except ValueError:
            continue
        return names[index]
    return None


def unfreeze_above(backbone: keras.Model, cut: str | None) -> int:
    """Make the layers above ``cut`` (all when None) trainable, BatchNorm excepted; return how many are."""
    backbone.trainable = True
    names = [layer.name for layer in backbone.layers]
    start = names.index(cut) + 1 if cut else 0
    count = 0
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= start and bool(layer.weights) and not isinstance(layer, layers.BatchNormalization)
        count += layer.trainable
    return count


def augmentation(
    *,
    flip: bool = True,
    rotation: float = 0.05,
    zoom: float = 0.1,
    translation: float = 0.05,
    contrast: float = 0.1,
    brightness: float = 0.1,
    seed: int = 42,
) -> keras.Sequential:
    """Keras preprocessing layers; they act only in training, so the exported model never sees them."""
    steps: list[layers.Layer] = []
    if flip:
        steps.append(layers.RandomFlip("horizontal_and_vertical", seed=seed))
    if rotation:
        steps.append(layers.RandomRotation(rotation, fill_mode="reflect", seed=seed))
    if zoom:
        steps.append(layers.RandomZoom(zoom, fill_mode="reflect", seed=seed))
    if translation:
        steps.append(layers.RandomTranslation(translation, translation, fill_mode="reflect", seed=seed))
    if contrast:
        steps.append(layers.RandomContrast(contrast, value_range=(0, 255), seed=seed))
    if brightness:
        steps.append(layers.RandomBrightness(brightness, value_range=(0, 255), seed=seed))
    return keras.Sequential(steps, name="augmentation")
