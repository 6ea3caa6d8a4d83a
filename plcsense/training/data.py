"""Loading users' data: image folders (one folder per class) and multichannel sensor CSV files."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plcsense.models.bundle import ImageSpec, SensorSpec
from plcsense.models.inputs import InputError, load_image_file

log = logging.getLogger("plcsense.training")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm"}


def varies(std: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Channels whose spread is more than rounding noise relative to their level (a constant channel does not).

    The bar is float32's: the worker feeds float32 readings (resolution ~6e-8 of the level) and Keras'
    Normalization floors a spread at 1e-7, so a smaller spread would be scored one way here and another there."""
    return std > 1e-6 * np.maximum(1.0, np.abs(mean))


def channel_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over every leading axis of ``values`` (..., C), float64; a constant
    channel gets std 1 (no scaling), so it standardises to 0 instead of to rounding noise blown up."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1, np.shape(values)[-1])
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    return mean, np.where(varies(std, mean), std, 1.0)


class DataError(ValueError):
    """Training or evaluation data that cannot be used; the message says what to fix."""


@dataclass
class ImageSet:
    images: np.ndarray  # (n, H, W, C) float32, 0..255
    labels: np.ndarray  # (n,) int
    classes: list[str]
    skipped: list[str]


def class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"{root} is not a directory (expected one sub-folder per class)")
    # hidden folders and macOS archive metadata are no classes
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")
    if not folders:
        raise DataError(f"{root} has no class sub-folders; put each class's images in {root}/<class>/")
    return folders


def class_files(
    root: Path, classes: list[str] | None, suffixes: Collection[str], kind: str
) -> tuple[list[str], list[tuple[int, list[Path]]]]:
    """The class names and, per class folder, its label and its files ending in one of ``suffixes`` (``kind``
    names them in errors). ``classes`` fixes the label order (a trained model's labels); a folder outside it is
    an error."""
    folders = class_folders(root)
    names = classes or [f.name for f in folders]
    found = []
    for folder in folders:
        if folder.name not in names:
            raise DataError(
                f"{folder}: class {folder.name!r} is not one the model knows ({', '.join(names)}); add photos of it "
                "to the training data, or leave this folder out"
            )
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"class folder {folder} holds no {kind}")
        found.append((names.index(folder.name), files))
    return names, found


IMAGES = f"images ({', '.join(sorted(IMAGE_SUFFIXES))})"


def require_examples(labels: np.ndarray, classes: list[str], where: Path, minimum: int = 2) -> None:
    """Every class needs ``minimum`` examples to learn from: one photo cannot be both fitted and validated on."""
    counts = np.bincount(labels, minlength=len(classes))
    few = [f"{name} ({n})" for name, n in zip(classes, counts, strict=True) if n < minimum]
    if few:
        raise DataError(
            f"{where}: class(es) {', '.join(few)} have fewer than {minimum} examples to learn from; add more (dozens "
            "per class learn well) or leave the folder out"
        )


SAMPLE_BITS = (10, 12, 14, 16)
"""What :attr:`ImageSpec.sample_bits` may be: the common depths of machine-vision cameras' greyscale data."""


def detect_sample_bits(files: list[Path], sample: int = 50) -> int:
    """Significant bits of the 16-bit greyscale photos among a sample of ``files`` (16 when there are none): the
    fewest of ``SAMPLE_BITS`` that hold their brightest value.

    One depth for the whole data set, kept in the bundle, so that the worker scales every photo the same way: a
    12-bit camera's photos in 16-bit files use 0..4095, and the fixed >> 8 of 16-bit data left them 16 grey levels.
    """
    from PIL import Image

    peak = None
    for file in files[:: max(1, len(files) // sample)]:
        try:
            with Image.open(file) as image:
                if image.mode.startswith("I;16") or image.mode == "I":
                    peak = max(peak or 0, int(np.max(np.asarray(image))))
        except (OSError, ValueError, Image.DecompressionBombError):  # loading it says why, once, by name
            continue
    if peak is None:
        return 16
    bits = next((b for b in SAMPLE_BITS if peak < 1 << b), 16)
    if bits < 16:
        log.info("16-bit photos use %d bits (brightest sampled value %d): scaled by >> %d", bits, peak, bits - 8)
    return bits


def load_image_folder(root: Path, spec: ImageSpec, classes: list[str] | None = None) -> ImageSet:
    """Load ``root/<class>/*.png|jpg...`` into arrays; corrupt files are skipped and listed."""
    names, per_class = class_files(root, classes, IMAGE_SUFFIXES, IMAGES)
    images, labels, skipped = [], [], []
    for label, files in per_class:
        for file in files:
            try:
                images.append(load_image_file(str(file), spec))
            except (InputError, OSError) as exc:
                skipped.append(f"{file}: {exc}")
                continue
            labels.append(label)
    if skipped:
        log.warning("skipped %d unreadable images:\n  %s", len(skipped), "\n  ".join(skipped))
    if not images:
        raise DataError(f"no readable images under {root}")
    return ImageSet(np.stack(images), np.asarray(labels), names, skipped)


TIME_COLUMNS = ("datetime", "timestamp", "time", "date")
"""Header names (any case) of the column kept as the rows' time stamps, e.g. in per-row predictions; never a
channel unless ``--columns`` names it (epoch seconds are numbers, but a model of them learns the clock)."""


@dataclass
class SensorTable:
    columns: list[str]
    values: np.ndarray  # (rows, channels) float64
    labels: np.ndarray | None  # (rows,) int, when a label column was named and present
    times: list[str] | None = None  # the first column named like TIME_COLUMNS, as text


def sniff_delimiter(sample: str) -> str:
    try:
        return csv.Sniffer().sniff(sample, delimiters=";,\t").delimiter
    except csv.Error:
        counts = {d: sample.count(d) for d in ";,\t"}
        return max(counts, key=counts.__getitem__)


def _to_float(text: str) -> float:
    try:
        return float(text) if text.strip() else math.nan
    except ValueError:
        return float(text.replace(",", "."))  # decimal comma, common in European PLC exports


def read_sensor_csv(
    path: Path,
    *,
    columns: list[str] | None = None,
    label_column: str | None = None,
    ignore: tuple[str, ...] = (),
) -> SensorTable:
    """Read a CSV with a header row; keep numeric columns (or ``columns``), drop timestamps and text."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # Excel and many PLC tools on Windows write their code page ("°C" as one byte)
        text = raw.decode("cp1252", errors="replace")
        log.warning("%s is not UTF-8; read as Windows-1252 (save it as UTF-8 to be sure of its header)", path)
    lines = text.splitlines()
    if lines and not any(d in lines[0] for d in ";,\t"):  # one column: a comma in it is a decimal comma
        delimiter, rows = "none", [[line] for line in lines]
    else:
        delimiter = sniff_delimiter(text[:8192])
        rows = list(csv.reader(lines, delimiter=delimiter))
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    repeated = sorted({h for h in header if h and header.count(h) > 1})
    if repeated:
        raise DataError(f"{path}: column name(s) {repeated} appear more than once; give every column its own name")
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    if any(len(r) != len(header) for r in body):
        bad = next(i for i, r in enumerate(body, 2) if len(r) != len(header))
        raise DataError(f"{path}: line {bad} has a different number of fields than the header")

    def column(name: str) -> np.ndarray | None:
        i = header.index(name)
        try:
            return np.array([_to_float(r[i]) for r in body])
        except ValueError:
            return None

    if columns:
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{path}: no column(s) {missing}; the header has {header}")
        chosen = columns
    else:
        # unnamed columns are a writer's row index (pandas) or a trailing delimiter, not sensors
        skip = {label_column, *ignore, ""}
        chosen = [h for h in header if h not in skip and h.lower() not in TIME_COLUMNS and column(h) is not None]
        if not chosen:
            raise DataError(f"{path}: no numeric columns found (delimiter {delimiter!r})")
    data = []
    for name in chosen:
        values = column(name)
        if values is None:
            raise DataError(f"{path}: column {name!r} is not numeric")
        data.append(values)
    values = np.stack(data, axis=1)
    if not np.all(np.isfinite(values)):
        row, col = (int(i) for i in np.argwhere(~np.isfinite(values))[0])
        raise DataError(
            f"{path}: empty or non-finite value in column {chosen[col]!r} at line {row + 2}; clean or interpolate it"
        )
    labels = None
    if label_column and label_column in header:
        raw = column(label_column)
        if raw is None or not np.all(np.isfinite(raw)):
            raise DataError(f"{path}: label column {label_column!r} must hold 0/1 numbers")
        labels = (raw > 0).astype(int)
    time_column = next((i for i, h in enumerate(header) if h.lower() in TIME_COLUMNS), None)
    times = [r[time_column].strip() for r in body] if time_column is not None else None
    return SensorTable(chosen, values, labels, times)


def read_sensor_sample(path: Path, spec: SensorSpec) -> np.ndarray:
    """One sample for a sensor classifier: the spec's channels, exactly its window of rows, float32."""
    table = read_sensor_csv(path, columns=spec.channels)
    if len(table.values) != spec.window:
        raise DataError(f"{path}: {len(table.values)} rows (time steps), but the model's window has {spec.window}")
    return table.values.astype(np.float32)


def sliding_windows(values: np.ndarray, window: int, stride: int = 1) -> np.ndarray:
    """(rows, C) -> (n, window, C), one window ending at each row from ``window - 1`` on."""
    if len(values) < window:
        raise DataError(f"only {len(values)} rows, fewer than the window of {window}")
    view = np.lib.stride_tricks.sliding_window_view(values, window, axis=0)  # (n, C, window)
    return np.ascontiguousarray(view[::stride].transpose(0, 2, 1))


@dataclass
class SensorSamples:
    inputs: np.ndarray  # (n, window, channels) float32
    labels: np.ndarray  # (n,) int
    classes: list[str]
    channels: list[str]
    files: list[Path]

    @property
    def window(self) -> int:
        return int(self.inputs.shape[1])


def load_sensor_folder(
    root: Path,
    *,
    columns: list[str] | None = None,
    classes: list[str] | None = None,
    window: int | None = None,
) -> SensorSamples:
    """Load ``root/<class>/*.csv`` (one CSV per sample) into one (n, window, channels) array.

    Every file must have the same number of rows (``window`` when given) and the same channels (``columns``
    when given, else those of the first file); a file that differs is named in the :class:`DataError`.
    ``classes`` fixes the label order (a trained model's labels); a folder outside it is an error.
    """
    names, per_class = class_files(root, classes, {".csv"}, ".csv files (one CSV per sample)")
    inputs: list[np.ndarray] = []
    labels: list[int] = []
    files: list[Path] = []
    channels = list(columns) if columns else None
    first: Path | None = None
    for label, paths in per_class:
        for path in paths:
            table = read_sensor_csv(path, columns=columns)
            if channels is None:
                channels = table.columns
            elif table.columns != channels:
                raise DataError(
                    f"{path}: channels {table.columns} differ from {channels} in {first}; "
                    "every sample needs the same columns (or choose them with --columns)"
                )
            rows = len(table.values)
            expected = window if window is not None else (len(inputs[0]) if inputs else rows)
            if rows != expected:
                where = "the model's window" if window is not None else f"{first}"
                raise DataError(
                    f"{path}: {rows} rows (time steps), but {where} has {expected}; "
                    "every sample must have the same length"
                )
            if first is None:
                first = path
            inputs.append(table.values)
            labels.append(label)
            files.append(path)
    assert channels is not None
    return SensorSamples(np.stack(inputs).astype(np.float32), np.asarray(labels), names, channels, files)
