"""The ``plcsense`` command: train, evaluate, serve, simulate, demo.

Heavy imports (TensorFlow, scikit-learn) happen inside the subcommands that need them, so ``serve`` and
``simulate`` start fast on an edge gateway that has neither installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ARCHS = ["scratch", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "inception_v3"]


# The `plcsense train` options each training reads. One it does not read is refused, not silently ignored;
# --out, --name and --model-version apply to all of them.
TRAIN_OPTIONS: dict[str, set[str]] = {
    "train images": {  # on a backbone: its settings are chosen by validation; the input is RGB
        "arch", "weights", "image_size", "fine_tune_epochs", "fine_tune_layers", "fine_tune_learning_rate",
        "batch_size", "seed", "val_split", "test_split", "augment", "no_augment", "no_class_weights", "tensorboard",
        "quantize", "min_agreement", "time_budget",
    },
    "train images --arch scratch": {
        "arch", "image_size", "color_mode", "epochs", "batch_size", "learning_rate", "seed", "val_split",
        "test_split", "augment", "no_augment", "no_class_weights", "tensorboard", "quantize", "min_agreement",
        "time_budget",
    },
    "train sensors --task classify": {
        "task", "columns", "epochs", "batch_size", "learning_rate", "seed", "val_split", "test_split",
        "no_class_weights", "tensorboard", "quantize", "min_agreement",
    },
    "train sensors --detector auto": {"task", "detector", "window", "columns", "label_column", "time_budget"},
    "train sensors --detector ar": {"task", "detector", "window", "columns", "label_column"},
    "train sensors --detector autoencoder": {
        "task", "detector", "window", "columns", "label_column", "epochs", "batch_size", "learning_rate", "seed",
        "time_budget",
    },
}  # fmt: skip


def _positive(text: str) -> float:
    """A rate or a budget: a finite number above 0 (argparse names the option in its error)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number above 0")
    return value


def _training(args: argparse.Namespace) -> str:
    if args.kind == "images":
        return "train images --arch scratch" if args.arch == "scratch" else "train images"
    if args.task in ("classify", "classification"):
        return "train sensors --task classify"
    return f"train sensors --detector {args.detector or 'auto'}"


def _train_usage_problem(args: argparse.Namespace) -> str | None:
    """One line saying why these ``train`` arguments cannot be used as given, or None when they can."""
    training = _training(args)
    one_folder = training.startswith("train images") or training == "train sensors --task classify"
    if one_folder and len(args.data) > 1:
        return "give one data folder (of class folders, or with train/ val/ test/)"
    reads = TRAIN_OPTIONS[training]
    every = set().union(*TRAIN_OPTIONS.values())
    ignored = sorted(d for d in every - reads if getattr(args, d) is not None and getattr(args, d) is not False)
    if not ignored:
        return None
    flags = ", ".join("--" + d.replace("_", "-") for d in ignored)
    takes = ", ".join("--" + d.replace("_", "-") for d in sorted(reads - {"task", "detector"}))
    return f"{flags} {'does' if len(ignored) == 1 else 'do'} not apply to {training} (it takes {takes})"


def _given(**fields: object) -> dict[str, object]:
    """The config fields whose options were given; the configs keep their own defaults for the others."""
    return {name: value for name, value in fields.items() if value is not None}


def _train(args: argparse.Namespace) -> int:
    from plcsense.training.backend import configure

    configure()  # logs the backend, device and precision; mixed precision on a GPU that computes it
    common = _given(name=args.name, version=args.model_version)
    columns = args.columns.split(",") if args.columns else None
    tensorboard = Path(args.tensorboard) if args.tensorboard else None
    class_weights = False if args.no_class_weights else None
    classifier = _given(  # what both classifier trainers take
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        val_split=args.val_split,
        test_split=args.test_split,
        class_weights=class_weights,
        tensorboard=tensorboard,
        quantize=args.quantize,
        min_agreement=args.min_agreement,
    )
    training = _training(args)
    if training.startswith("train images"):
        from plcsense.training.image_config import Augment, ImageTrainConfig
        from plcsense.training.images import train_images

        cfg = ImageTrainConfig(
            **common,
            **_given(
                arch=args.arch,
                weights=args.weights,
                image_size=args.image_size,
                color_mode=args.color_mode,
                fine_tune_epochs=args.fine_tune_epochs,
                fine_tune_layers=args.fine_tune_layers,
                fine_tune_learning_rate=args.fine_tune_learning_rate,
                time_budget=args.time_budget,
            ),
            **classifier,
        )
        cfg.augment = Augment.parse("none" if args.no_augment else args.augment or "auto", cfg.arch)
        bundle = train_images(Path(args.data[0]), Path(args.out), cfg)
    elif training == "train sensors --task classify":
        from plcsense.training.sensor_classify import SensorClassifyConfig, train_sensor_classifier

        cfg = SensorClassifyConfig(**common, **_given(columns=columns), **classifier)
        bundle = train_sensor_classifier(Path(args.data[0]), Path(args.out), cfg)
    else:
        from plcsense.training.detectors import ARSettings
        from plcsense.training.sensors import AutoencoderSettings, SensorTrainConfig, train_sensor_anomaly

        detector: ARSettings | AutoencoderSettings | None = None  # auto: chosen by validation
        if args.detector == "ar":
            detector = ARSettings()
        elif args.detector == "autoencoder":
            fit = _given(
                epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed
            )
            detector = AutoencoderSettings(**fit)
        cfg = SensorTrainConfig(
            detector=detector,
            **common,
            **_given(window=args.window, columns=columns, label_column=args.label_column, time_budget=args.time_budget),
        )
        bundle = train_sensor_anomaly([Path(p) for p in args.data], Path(args.out), cfg)
    m = bundle.manifest
    print(
        f"bundle {bundle.path}: {m.name} v{m.version} ({m.task}); "
        + ", ".join(f"{k} {v:.4g}" for k, v in m.metrics.items())
    )
    if m.threshold is not None:
        print(f"anomaly threshold {m.threshold:.6g}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from plcsense.models.bundle import load_bundle
    from plcsense.quiet import LITERT_STARTUP, without_lines
    from plcsense.training.evaluate import evaluate, format_table

    with without_lines(LITERT_STARTUP):
        bundle = load_bundle(args.bundle)
    if bundle.manifest.task == "anomaly":
        from plcsense.training.anomaly_eval import evaluate_anomaly, write_predictions

        rows, verdicts = {}, []
        for data in args.data:
            rows[data], judged = evaluate_anomaly(bundle, Path(data), label_column=args.label_column)
            verdicts += judged
        if args.out:
            written = write_predictions(Path(args.out), verdicts)
            print(f"{written} row predictions written to {args.out}", file=sys.stderr)
    elif args.out:
        print(
            f"plcsense: --out writes the row predictions of anomaly bundles; {args.bundle} is a classifier",
            file=sys.stderr,
        )
        return 2
    else:
        rows = {data: evaluate(bundle, Path(data), label_column=args.label_column) for data in args.data}
    if args.json:
        print(json.dumps(next(iter(rows.values())) if len(rows) == 1 else rows))
    else:
        print(format_table(rows))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from plcsense.models.bundle import ImageSpec, load_bundle, split_outputs
    from plcsense.models.inputs import InputError, load_image_file
    from plcsense.quiet import LITERT_STARTUP, without_lines
    from plcsense.training.data import DataError, read_sensor_sample

    with without_lines(LITERT_STARTUP):
        bundle = load_bundle(args.bundle)
    spec, labels = bundle.manifest.input, bundle.manifest.labels
    if not labels:
        print(
            f"plcsense: {args.bundle} is an anomaly detector; for per-row scores of CSV files run "
            f"plcsense evaluate {args.bundle} DATA --out predictions.csv",
            file=sys.stderr,
        )
        return 2
    failed = 0
    for path in args.files:
        try:
            sample = (
                load_image_file(path, spec) if isinstance(spec, ImageSpec) else read_sensor_sample(Path(path), spec)
            )
            probabilities, ood = split_outputs(bundle.manifest, bundle.model.predict(sample[None]))
        except (InputError, DataError, OSError) as exc:
            print(f"{path}\terror: {exc}")
            failed += 1
            continue
        best = int(probabilities[0].argmax())
        line = f"{path}\t{labels[best]}\t{probabilities[0, best]:.4f}"
        ood_spec = bundle.manifest.ood
        if ood is not None and ood_spec is not None and ood[0] > ood_spec.threshold:
            line += f"\tunknown: unlike the training data (ood score {ood[0]:.3g} > {ood_spec.threshold:.3g})"
        print(line)
    return 1 if failed else 0


def _serve(args: argparse.Namespace) -> int:
    from plcsense.worker.main import serve

    return serve(Path(args.config) if args.config else None)


def _simulate(args: argparse.Namespace) -> int:
    from plcsense.simulate import simulate

    sent = simulate(
        Path(args.source),
        url=args.url,
        topic=args.topic,
        rate=args.rate,
        protocol=args.protocol,
        columns=args.columns.split(",") if args.columns else None,
        limit=args.limit,
        loop=args.loop,
        encoding=args.encoding,
        qos=args.qos,
    )
    print(f"simulate: published {sent} messages to {args.topic}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from plcsense.demo import run_demo

    return run_demo()


def _pack(args: argparse.Namespace) -> int:
    from plcsense.models.fetch import FetchError, pack
    from plcsense.quiet import LITERT_STARTUP, without_lines

    try:
        with without_lines(LITERT_STARTUP):
            sha256, bundle = pack(Path(args.bundle), Path(args.out))
    except FetchError as exc:
        print(f"plcsense: {exc}", file=sys.stderr)
        return 2
    m = bundle.manifest
    print(f"packed {m.name} v{m.version} ({bundle.digest})", file=sys.stderr)
    print(f"{sha256}  {args.out}")  # sha256sum's format: `sha256sum -c` checks it
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from plcsense.models.fetch import FetchError, fetch
    from plcsense.quiet import LITERT_STARTUP, without_lines

    try:
        with without_lines(LITERT_STARTUP):
            done = fetch(
                args.url,
                args.sha256,
                Path(args.into),
                expect_digest=args.expect_digest,
                **_given(max_bytes=args.max_bytes, timeout_s=args.timeout),
            )
    except FetchError as exc:
        print(f"plcsense: {exc}", file=sys.stderr)
        return 2
    m = done.bundle.manifest
    state = "installed" if done.fresh else "already installed"
    print(f"{state}: {m.name} v{m.version} at {done.path} ({done.bundle.digest})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plcsense", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    # Training options default to None: the configs hold the defaults, and an option that was given can be told
    # apart from one that was not (a given option the chosen training ignores is refused).
    train = sub.add_parser("train", help="train a model and export a bundle")
    train.add_argument("kind", choices=["images", "sensors"])
    train.add_argument("data", nargs="+", help="images: a folder of class folders; sensors: CSV file(s)")
    train.add_argument("--out", required=True, help="bundle directory to write")
    train.add_argument(
        "--task",
        choices=["anomaly", "classify", "classification"],
        help="sensors: anomaly (default) or classify (DATA: a folder of class folders of CSVs, one per sample)",
    )
    train.add_argument("--epochs", type=int, help="default 30 for images, 150 for classify, 60 for the autoencoder")
    train.add_argument("--batch-size", type=int, help="default 32, 64 for the autoencoder")
    train.add_argument("--seed", type=int, help="default 42")
    train.add_argument("--name", help="model name in the manifest (default: from the data)")
    train.add_argument("--model-version", help="default 1")
    images = train.add_argument_group("images")
    images.add_argument(
        "--arch",
        choices=ARCHS,
        help="scratch CNN or an ImageNet backbone for transfer learning (default mobilenet_v2)",
    )
    images.add_argument(
        "--weights",
        help="imagenet (default: Keras download and cache), none, or a local .h5 file (offline machines)",
    )
    images.add_argument(
        "--fine-tune-layers",
        type=int,
        help="backbone layers fine-tuned from the top (default: chosen by validation; 0: head only)",
    )
    images.add_argument("--fine-tune-epochs", type=int, help="at most this many fine-tuning epochs (default 15)")
    images.add_argument(
        "--fine-tune-learning-rate",
        type=_positive,
        help="peak learning rate of fine-tuning (default: 1e-5 or 1e-4, chosen by validation)",
    )
    images.add_argument(
        "--time-budget",
        type=_positive,
        help="seconds for the whole run on this machine: backbones plan the settings they try to fit it (default "
        "600 up to 1,500 photos at 224 px, in proportion above, at most 3600) and the scratch CNN ends its epochs "
        "in time (default 600); sensors choose and fit the anomaly detector within it (default 300)",
    )
    images.add_argument("--learning-rate", type=_positive, help="head/scratch/1-D CNN/autoencoder learning rate (1e-3)")
    images.add_argument(
        "--augment",
        help="auto (default: flips, kept for backbones when validation agrees), none, or a list of "
        "flip,rotation,zoom,translation,contrast,brightness",
    )
    images.add_argument("--no-augment", action="store_true", help="same as --augment none")
    images.add_argument(
        "--no-class-weights", action="store_true", help="do not rebalance classes (default: chosen by validation)"
    )
    images.add_argument("--tensorboard", help="write TensorBoard logs to this directory")
    images.add_argument("--quantize", choices=["none", "float16", "int8"], help="default none")
    images.add_argument(
        "--min-agreement",
        type=float,
        help="quantised export fails below this top-1 agreement with the float model (default 0.98)",
    )
    images.add_argument(
        "--image-size", type=int, help="default: chosen by validation (backbone's and photos' own size), 128 scratch"
    )
    images.add_argument("--color-mode", choices=["auto", "grayscale", "rgb"], help="default auto")
    images.add_argument("--val-split", type=float, help="default 0.15 (images: k-fold below 600 photos, else 0.2)")
    images.add_argument("--test-split", type=float, help="default 0.15 (images on a backbone: 0, use a test/ folder)")
    sensors = train.add_argument_group("sensors")
    sensors.add_argument(
        "--window",
        type=int,
        help="readings per window (default: the detector's own, 27 for the default ar, 30 for the autoencoder)",
    )
    sensors.add_argument(
        "--detector",
        choices=["auto", "ar", "autoencoder"],
        help="anomaly detector: auto (default: the AR settings that validate best on your later normal rows), "
        "ar (per-channel autoregressive innovations; least squares, so no epochs, batches or seed) or autoencoder",
    )
    sensors.add_argument("--columns", help="comma-separated channel columns (default: every numeric column)")
    sensors.add_argument(
        "--label-column",
        help="0/1 column marking anomalies (default anomaly); labelled rows are left out of training",
    )
    train.set_defaults(func=_train)

    ev = sub.add_parser(
        "evaluate",
        help="score a bundle's LiteRT model on labelled data (classifiers: accuracy, loss, per-class figures; "
        "anomaly detectors: F1, false and missed alarm rates per row)",
    )
    ev.add_argument("bundle")
    ev.add_argument("data", nargs="+", help="image folder(s) of class folders, or sensor CSV file(s)/folder(s)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.add_argument("--label-column", default="anomaly", help="sensors: the 0/1 column of anomalous rows")
    ev.add_argument(
        "--out",
        help="anomaly bundles: write one CSV line per scored row (file, row, timestamp, score, predicted, label)",
    )
    ev.set_defaults(func=_evaluate)

    pred = sub.add_parser("predict", help="label files with a classifier bundle, through the worker's LiteRT path")
    pred.add_argument("bundle")
    pred.add_argument("files", nargs="+", help="images, or one CSV per sample for a sensor classifier")
    pred.set_defaults(func=_predict)

    serve = sub.add_parser("serve", help="run the MQTT worker")
    serve.add_argument("--config", help="YAML settings file (environment PLCSENSE_... overrides it)")
    serve.set_defaults(func=_serve)

    sim = sub.add_parser("simulate", help="publish a folder of images or the rows of a CSV like a PLC")
    sim.add_argument("source", help="an image folder (searched recursively) or a CSV file")
    sim.add_argument("--url", default="mqtt://127.0.0.1:1883")
    sim.add_argument("--topic", required=True)
    sim.add_argument("--rate", type=float, default=10.0, help="messages per second; 0 = as fast as possible")
    sim.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    sim.add_argument("--columns", help="CSV columns to send (default: every numeric column)")
    sim.add_argument("--encoding", choices=["json", "npy"], default="json", help="CSV rows as JSON or .npy")
    sim.add_argument("--limit", type=int, default=None, help="stop after this many messages")
    sim.add_argument("--loop", action="store_true", help="start over at the end")
    sim.add_argument("--qos", type=int, choices=[0, 1, 2], default=1)
    sim.set_defaults(func=_simulate)

    demo = sub.add_parser("demo", help="train, serve and replay real data on this machine")
    demo.set_defaults(func=_demo)

    pk = sub.add_parser("pack", help="pack a bundle into a reproducible .tar.gz and print its sha256 (to publish)")
    pk.add_argument("bundle", help="bundle directory (loaded and checked first)")
    pk.add_argument("--out", required=True, help="archive to write, e.g. pump-3.tar.gz")
    pk.set_defaults(func=_pack)

    fe = sub.add_parser(
        "fetch",
        help="download a packed bundle, check its sha256, unpack it safely and install it into a model repository "
        "in one rename (what a site's init container runs); exits 0 when that version is already there",
    )
    fe.add_argument("url", help="file://, http:// or https:// URL of the archive")
    fe.add_argument("--sha256", required=True, help="the archive's sha256 (plcsense pack prints it)")
    fe.add_argument("--into", required=True, help="<repo>/<name>/<version>; the bundle's version must be <version>")
    fe.add_argument("--expect-digest", help="also pin the bundle's seal (sha256:..., bundle.sha256)")
    fe.add_argument("--max-bytes", type=int, help="limit of the archive and of its contents (default 1 GiB)")
    fe.add_argument("--timeout", type=float, help="seconds the download may take (default 300)")
    fe.set_defaults(func=_fetch)

    schema = sub.add_parser("schema", help="print the JSON Schema of the worker config or of a bundle manifest")
    schema.add_argument("which", choices=["config", "manifest"])
    schema.set_defaults(func=_schema)
    return parser


def _schema(args: argparse.Namespace) -> int:
    """JSON Schema with every field's documentation, for editors (YAML language server) and reviews."""
    if args.which == "config":
        from plcsense.worker.settings import Settings as model
    else:
        from plcsense.models.bundle import Manifest as model
    print(json.dumps(model.model_json_schema(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "train":
        if problem := _train_usage_problem(args):
            print(f"plcsense: {problem}", file=sys.stderr)
            return 2
        from plcsense.quiet import import_tensorflow_quietly

        import_tensorflow_quietly()  # before anything imports TensorFlow: its start-up notices bury useful lines
    from plcsense.models.bundle import BundleError
    from plcsense.training.data import DataError

    expected: tuple[type[Exception], ...] = (BundleError, DataError, FileExistsError, FileNotFoundError)
    if args.command == "simulate":
        expected += (OSError,)  # the broker is unreachable
    if args.command == "train":
        from plcsense.models.backbones import WeightsError
        from plcsense.training.backend import BackendError
        from plcsense.training.export import ExportError

        expected += (WeightsError, ExportError, BackendError)
    try:
        return args.func(args)
    except expected as exc:
        print(f"plcsense: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        print(
            f"plcsense: {exc.name} is not installed; training and evaluation need pip install 'plcsense[train]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
