"""Import hygiene: no cycles among plcsense's modules, and no TensorFlow behind ``evaluate`` and ``predict``.

TensorFlow takes seconds to import and is not installed on a serving gateway; scoring a bundle needs LiteRT only.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import plcsense
from tests.conftest import WINDOW, write_sensor_csv
from tests.test_sensor_classify import write_folder
from tests.test_training import write_labelled_csv

PACKAGE = Path(plcsense.__file__).resolve().parent
TENSORFLOW = ("tensorflow", "keras", "tf_keras")

# Runs the CLI in this interpreter, then writes every module it loaded to the file named first.
PROBE = """
import json, sys
from plcsense.cli import main
try:
    code = main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as fh:
        json.dump(sorted(sys.modules), fh)
sys.exit(code)
"""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the plcsense modules it imports anywhere (top level, inside functions, under TYPE_CHECKING)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..models import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_sees_a_cycle_and_a_clean_chain() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_among_plcsense_modules() -> None:
    graph = import_graph()
    assert {"plcsense.cli", "plcsense.training.evaluate", "plcsense.models.runtime"} <= set(graph)
    assert "plcsense.models.runtime" in graph["plcsense.training.evaluate"]  # the parser sees real edges
    assert cycles(graph) == []


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, sensor_bundle, image_bundle, image_data) -> dict[str, tuple[Path, Path, Path]]:
    """Bundle kind -> (bundle, evaluation data, one file to predict), every bundle tiny and trained here or once."""
    from plcsense.training.sensor_classify import SensorClassifyConfig, train_sensor_classifier
    from plcsense.training.sensors import AutoencoderSettings, SensorTrainConfig, train_sensor_anomaly

    root = tmp_path_factory.mktemp("kinds")
    write_sensor_csv(root / "normal.csv")
    labelled = write_labelled_csv(root / "labelled.csv", seed=3)
    autoencoder = root / "autoencoder"
    train_sensor_anomaly(
        [root / "normal.csv"], autoencoder, SensorTrainConfig(detector=AutoencoderSettings(epochs=2), window=WINDOW)
    )
    cycles_dir = write_folder(root / "cycles", {"leak": 6, "normal": 6}, seed=0)
    classifier = root / "classifier"
    train_sensor_classifier(cycles_dir, classifier, SensorClassifyConfig(epochs=2, batch_size=4))
    sample = next((cycles_dir / "leak").glob("*.csv"))
    image = next((image_data / "dark").glob("*.png"))
    return {
        "image classifier": (image_bundle, image_data, image),
        "sensor anomaly ar": (sensor_bundle, labelled, labelled),
        "sensor anomaly autoencoder": (autoencoder, labelled, labelled),
        "sensor classifier": (classifier, cycles_dir, sample),
    }


def run_probe(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    modules = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(modules), *args], capture_output=True, text=True, timeout=120
    )
    return proc, json.loads(modules.read_text())


@pytest.mark.parametrize(
    "kind", ["image classifier", "sensor anomaly ar", "sensor anomaly autoencoder", "sensor classifier"]
)
def test_evaluate_and_predict_import_no_tensorflow(kind: str, bundles, tmp_path: Path) -> None:
    bundle, data, one = bundles[kind]
    proc, modules = run_probe(tmp_path, "evaluate", str(bundle), str(data), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = json.loads(proc.stdout)
    assert scores["n"] > 0 and ("accuracy" in scores or "f1" in scores)
    assert "plcsense.models.runtime" in modules  # the probe saw the scoring path
    assert [m for m in modules if m.split(".")[0] in TENSORFLOW] == []

    proc, modules = run_probe(tmp_path, "predict", str(bundle), str(one))
    if kind.startswith("sensor anomaly"):
        assert proc.returncode == 2 and "--out" in proc.stderr  # detectors are scored with evaluate
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        path, label, probability = proc.stdout.strip().split("\t")[:3]  # a 4th column says unknown
        assert path == str(one) and label in json.loads((bundle / "manifest.json").read_text())["labels"]
        assert 0 <= float(probability) <= 1
    assert [m for m in modules if m.split(".")[0] in TENSORFLOW] == []


def test_predict_names_a_sensor_sample_of_the_wrong_length(bundles, tmp_path: Path) -> None:
    bundle, _, one = bundles["sensor classifier"]
    short = tmp_path / "short.csv"
    short.write_text("\n".join(one.read_text().splitlines()[:-3]) + "\n")
    proc, _ = run_probe(tmp_path, "predict", str(bundle), str(one), str(short))
    assert proc.returncode == 1
    good, bad = proc.stdout.strip().splitlines()
    assert good.startswith(f"{one}\t") and bad.startswith(f"{short}\terror: ") and "window has" in bad
    assert len(good.split("\t")) in (3, 4)
