"""The model bundle: the contract between training and the worker.

A bundle is a directory holding ``manifest.json`` (the schema below), ``model.tflite`` (what the worker runs),
``golden.npz`` (a few inputs with the outputs they produced at export, replayed as a self-test on load) and
optionally ``model.keras`` and a ``report/`` folder. Loading refuses anything that does not add up, with one line
that names the problem, so a half-copied or stale bundle never serves wrong answers on the line.

The manifest holds the sha256 of every other file, and ``bundle.sha256`` holds the digest of the manifest itself
(``sha256:`` + the sha256 of ``manifest.json``'s bytes, what ``sha256sum manifest.json`` prints), so that one
digest covers the whole bundle: an edited threshold or reordered labels no longer load. ``bundle.sha256`` only
catches edits made without rewriting it; against deliberate tampering a deployment pins the digest
(``load_bundle(path, expect_digest=...)``), which no one can change by writing into the bundle directory.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from plcsense.models.runtime import LiteRTModel

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.tflite"
GOLDEN_FILE = "golden.npz"
SEAL_FILE = "bundle.sha256"
MAX_MANIFEST_BYTES = 1 << 20
"""A real manifest is a few KB; anything this big is not one, and is refused before it is parsed."""
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
"""Form of a bundle digest, for settings that pin one."""
_FILE_SHA256 = r"^[0-9a-f]{64}$"
_Text = Annotated[str, Field(min_length=1, max_length=255)]
"""Names echoed in results and metric labels: bounded so a manifest cannot bloat every answer."""


class BundleError(Exception):
    """A bundle that cannot be served; the message is one line naming the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)


class ImageSpec(_Strict):
    """How raw image bytes become the model input (the worker and training share this code path)."""

    kind: Literal["image"] = "image"
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    color_mode: Literal["grayscale", "rgb"]
    resize: Literal["stretch", "exact"] = "stretch"
    """``stretch``: resize any image to height x width (bilinear); ``exact``: reject other sizes."""
    scale: Literal["0-255"] = "0-255"
    """Pixel values are fed as float32 0..255; rescaling lives inside the model graph."""
    sample_bits: Literal[10, 12, 14, 16] = 16
    """Significant bits of 16-bit greyscale samples (a 12-bit camera's photos in 16-bit files: 12), chosen by
    training from the photos: they become 0..255 by a shift of ``sample_bits - 8``, larger values clipped. 8-bit
    photos are unaffected."""

    @model_validator(mode="after")
    def _channels_match_mode(self) -> ImageSpec:
        if (self.channels == 1) != (self.color_mode == "grayscale"):
            raise ValueError("channels must be 1 for grayscale and 3 for rgb")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.height, self.width, self.channels)


class SensorSpec(_Strict):
    """A window of multichannel readings; normalisation is inside the model graph, recorded here for humans."""

    kind: Literal["sensor"] = "sensor"
    channels: list[_Text] = Field(min_length=1, max_length=1024)
    """Echoed per channel in every anomaly result, hence bounded."""
    window: int = Field(gt=0)
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _stats_per_channel(self) -> SensorSpec:
        if not len(self.mean) == len(self.std) == len(self.channels):
            raise ValueError("mean and std need one value per channel")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.window, len(self.channels))


InputSpec = Annotated[ImageSpec | SensorSpec, Field(discriminator="kind")]


Quantize = Literal["none", "float16", "int8"]
"""How the exported weights are stored: float32 (``none``), float16, or full-integer int8."""


class OodSpec(_Strict):
    """A classifier that says when an input is unlike its training data.

    The model's output then holds one element more than there are labels: the last one is the out-of-distribution
    score, computed inside the graph (so the worker runs no per-model code) and bounded to 0..1 (so int8 models,
    whose output tensor shares one quantisation scale, keep the probabilities' precision).
    """

    score: Literal["mahalanobis"]
    """How the score is computed: ``1 - exp(-d / scale)``, ``d`` the squared Mahalanobis distance of the
    penultimate features to the nearest class mean under the shared covariance of the training features."""
    threshold: float = Field(ge=0, le=1, allow_inf_nan=False)
    """Score above which an input is reported unknown, fitted on validation data only."""


class Manifest(_Strict):
    schema_version: int
    name: _Text
    version: Annotated[str, Field(min_length=1, max_length=128)]
    created_at: datetime
    task: Literal["classification", "anomaly"]
    input: InputSpec
    labels: list[_Text] | None = Field(None, max_length=10_000)
    threshold: float | None = Field(None, allow_inf_nan=False)
    """Anomaly score above which a window is reported as an anomaly."""
    score: Literal["mean_squared_error", "ar_innovation"] | None = None
    """What the per-channel outputs are (reconstruction errors or squared standardised AR innovations); the
    anomaly score is always their mean."""
    ood: OodSpec | None = None
    """Classifiers only: the output's last element is an out-of-distribution score (see :class:`OodSpec`)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Held-out figures of the exported model, measured with the LiteRT interpreter."""
    variants: dict[str, dict[str, float]] = Field(default_factory=dict)
    """The same figures for every variant measured at export (float32, float16, int8)."""
    quantization: Quantize = "none"
    files: dict[str, Annotated[str, Field(pattern=_FILE_SHA256)]] = Field(default_factory=dict)
    """sha256 of every file in the bundle except the manifest and ``bundle.sha256``, by relative POSIX path."""
    golden_atol: float = 1e-4

    @model_validator(mode="after")
    def _task_fields(self) -> Manifest:
        if self.task == "classification" and not self.labels:
            raise ValueError("a classification bundle needs labels")
        if self.task == "anomaly" and self.threshold is None:
            raise ValueError("an anomaly bundle needs a threshold")
        if self.task != "classification" and self.ood is not None:
            raise ValueError("only a classification bundle has an ood score")
        for name in self.files:
            if name.startswith("/") or "\\" in name or {"", ".", ".."} & set(name.split("/")):
                raise ValueError(f"files: {name!r} is not a plain relative path inside the bundle")
        return self


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest(manifest_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Record checksums of every file now in the bundle, write ``manifest.json`` and seal it in ``bundle.sha256``."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MANIFEST, SEAL_FILE))
    manifest.files = {p.relative_to(directory).as_posix(): sha256_file(p) for p in files}
    data = (manifest.model_dump_json(indent=2) + "\n").encode()
    (directory / MANIFEST).write_bytes(data)
    (directory / SEAL_FILE).write_text(_digest(data) + "\n")


def new_manifest(**fields: object) -> Manifest:
    return Manifest(schema_version=SCHEMA_VERSION, created_at=datetime.now(UTC), **fields)


def split_outputs(manifest: Manifest, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """A classifier's outputs ``(n, k)`` as class probabilities ``(n, labels)`` and ood scores ``(n,)`` (None
    without ``ood``): every consumer of a classifier's raw outputs goes through here, so the ood element never
    counts as a class."""
    if manifest.ood is None:
        return outputs, None
    return outputs[..., :-1], outputs[..., -1]


class Bundle:
    """A verified bundle: manifest plus a LiteRT model ready to run."""

    def __init__(self, path: Path, manifest: Manifest, model: LiteRTModel, digest: str) -> None:
        self.path = path
        self.manifest = manifest
        self.model = model
        self.digest = digest
        """``sha256:<hex>`` of the manifest, which covers every file: what a deployment pins."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.manifest.input.shape

    @property
    def label(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"


@contextmanager
def _one_line_errors(path: Path) -> Iterator[None]:
    """Turn anything unexpected while reading a bundle into a BundleError, so it only takes its own route down."""
    try:
        yield
    except BundleError:
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200]
        raise BundleError(f"bundle {path}: cannot be read ({type(exc).__name__}: {detail})") from None


def _inside(path: Path, name: str) -> Path:
    """``path / name``, refused when it (or a symlink on the way) leads out of the bundle directory."""
    file = path / name
    if not file.resolve().is_relative_to(path.resolve()):
        raise BundleError(f"bundle {path}: {name} points outside the bundle")
    return file


def _manifest_bytes(path: Path) -> bytes:
    if not path.is_dir():
        raise BundleError(f"bundle {path}: not a directory")
    file = _inside(path, MANIFEST)
    if not file.is_file():
        raise BundleError(f"bundle {path}: missing {MANIFEST}")
    with file.open("rb") as handle:
        data = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"bundle {path}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes, not a manifest")
    return data


def _parse_manifest(path: Path, data: bytes) -> Manifest:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {path}: {MANIFEST} is not valid JSON ({exc})") from None
    except RecursionError:
        raise BundleError(f"bundle {path}: {MANIFEST} is nested too deeply to be a manifest") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"bundle {path}: unknown schema_version {version!r} (this plcsense reads {SCHEMA_VERSION}); "
            "re-export the bundle or upgrade plcsense"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise BundleError(f"bundle {path}: invalid {MANIFEST}: {where}: {first['msg']}") from None


def read_manifest(path: Path) -> Manifest:
    """Parse and validate ``manifest.json`` (size-bounded); does not check the digest or the files."""
    with _one_line_errors(path):
        return _parse_manifest(path, _manifest_bytes(path))


def bundle_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of the bundle's manifest as it is now (equal to ``sha256sum manifest.json``)."""
    path = Path(path)
    with _one_line_errors(path):
        return _digest(_manifest_bytes(path))


def _verify_digest(path: Path, digest: str, expect_digest: str | None) -> None:
    """The manifest must match ``bundle.sha256`` and the pinned digest; a pin alone vouches for an unsealed one."""
    seal = _inside(path, SEAL_FILE)
    if seal.is_file():
        with seal.open("rb") as handle:
            sealed = (handle.read(256).decode("ascii", "replace").split() or [""])[0]
        if sealed != digest:
            raise BundleError(
                f"bundle {path}: {MANIFEST} changed after export (its digest is {digest}, {SEAL_FILE} says {sealed!r})"
            )
    elif expect_digest is None:
        raise BundleError(f"bundle {path}: missing {SEAL_FILE}; re-export the bundle or pin its digest")
    if expect_digest is None:
        return
    if not re.fullmatch(DIGEST_PATTERN, expect_digest):
        raise BundleError(f"bundle {path}: pinned digest {expect_digest!r} is not of the form sha256:<64 hex digits>")
    if digest != expect_digest:
        raise BundleError(f"bundle {path}: digest {digest} is not the pinned {expect_digest}")


def _verify_files(path: Path, manifest: Manifest) -> None:
    for required in (MODEL_FILE, GOLDEN_FILE):
        if required not in manifest.files:
            raise BundleError(f"bundle {path}: manifest lists no checksum for {required}")
    for name, expected in manifest.files.items():
        file = _inside(path, name)
        if not file.is_file():
            raise BundleError(f"bundle {path}: missing file {name}")
        if sha256_file(file) != expected:
            raise BundleError(f"bundle {path}: checksum mismatch for {name} (file changed after export)")


def _verify_spec(path: Path, manifest: Manifest, model: LiteRTModel) -> None:
    expected = manifest.input.shape
    if model.input_shape != expected:
        raise BundleError(
            f"bundle {path}: manifest input shape {list(expected)} does not match model input {list(model.input_shape)}"
        )
    out = model.output_shape
    if manifest.task == "classification":
        assert manifest.labels is not None
        expected = (len(manifest.labels) + (manifest.ood is not None),)
        if out != expected:
            ood = " plus an ood score" if manifest.ood else ""
            raise BundleError(
                f"bundle {path}: {len(manifest.labels)} labels{ood} but the model outputs shape {list(out)}"
            )
    elif out != (len(manifest.input.channels),):  # type: ignore[union-attr]
        raise BundleError(f"bundle {path}: anomaly model should output one error per channel, got {list(out)}")


def _verify_golden(path: Path, manifest: Manifest, model: LiteRTModel) -> None:
    try:
        with np.load(path / GOLDEN_FILE, allow_pickle=False) as golden:
            inputs, outputs = golden["inputs"], golden["outputs"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise BundleError(f"bundle {path}: unreadable {GOLDEN_FILE} ({exc})") from None
    got = model.predict(inputs.astype(np.float32))
    if got.shape != outputs.shape or not np.allclose(got, outputs, atol=manifest.golden_atol, rtol=1e-3):
        worst = float(np.max(np.abs(got - outputs))) if got.shape == outputs.shape else float("nan")
        raise BundleError(
            f"bundle {path}: golden samples no longer reproduce (max difference {worst:.3g}); "
            "the model file or the runtime changed since export"
        )


def load_bundle(path: str | Path, *, num_threads: int | None = None, expect_digest: str | None = None) -> Bundle:
    """Load and verify a bundle; raise :class:`BundleError` with one clear line when it is unusable.

    ``expect_digest`` (``sha256:<hex>``, see :func:`bundle_digest`) pins the exact bundle a deployment vetted.
    """
    path = Path(path)
    with _one_line_errors(path):
        data = _manifest_bytes(path)
        digest = _digest(data)
        _verify_digest(path, digest, expect_digest)
        manifest = _parse_manifest(path, data)
        _verify_files(path, manifest)
        try:
            model = LiteRTModel(path / MODEL_FILE, num_threads=num_threads)
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"bundle {path}: {MODEL_FILE} cannot be loaded by LiteRT ({exc})") from None
        _verify_spec(path, manifest, model)
        _verify_golden(path, manifest, model)
        return Bundle(path, manifest, model, digest)
