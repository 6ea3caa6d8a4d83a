"""Training in the cluster as shipped (deploy/train): a hadolint-clean training image whose build context is what it
copies, the Job for CPU and GPU nodes rendered by kustomize and validated strictly, and train-job run for real: it
publishes versions into the model repository in one rename, never replaces one, and what it packs installs on a
site with ``plcsense fetch`` and serves from the worker's repository."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from plcsense.models.bundle import load_bundle
from plcsense.worker.repository import resolve, versions
from tests.conftest import write_sensor_csv
from tests.deploy_tools import DEPLOY, ROOT, run, tool

TRAIN = DEPLOY / "train"
DOCKERFILE = TRAIN / "Dockerfile"
SCRIPT = TRAIN / "train-job.sh"
KUSTOMIZATIONS = [TRAIN / "k8s" / "cpu", TRAIN / "k8s" / "gpu"]
VERSIONS = ("1.30.0", "1.37.0")  # as tests/test_deploy_k8s.py: oldest Kubernetes supported, newest schema known


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_dockerfile_passes_hadolint() -> None:
    run([tool("hadolint"), str(DOCKERFILE)])


def test_image_base_is_pinned_dependencies_come_before_the_source_and_it_runs_as_non_root() -> None:
    steps = instructions()
    base = next(args for op, args in steps if op == "ARG" and args.startswith("BASE="))
    assert re.fullmatch(r"BASE=python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    assert [args for op, args in steps if op == "FROM"] == ["${BASE}"]
    labels = " ".join(args for op, args in steps if op == "LABEL")
    for name in ("title", "description", "version", "revision", "created", "source", "licenses", "base.name"):
        assert f"org.opencontainers.image.{name}=" in labels
    copies = [args for op, args in steps if op == "COPY"]
    deps = copies.index("pyproject.toml README.md LICENSE /tmp/deps/")
    source = copies.index("plcsense /tmp/src/plcsense")
    assert deps < source, "a source change must not rebuild the dependency layer"
    installs = [args for op, args in steps if op == "RUN" and "pip install" in args]
    assert '"/tmp/deps[${EXTRA}]"' in installs[0] and "--no-deps /tmp/src" in installs[1]
    assert next(args for op, args in steps if op == "USER").split(":")[0] not in ("0", "root")
    assert next(args for op, args in steps if op == "ENTRYPOINT") == '["train-job"]'


def test_build_context_is_what_the_dockerfile_copies() -> None:
    build = pytest.importorskip("docker.utils.build", reason="pip install docker (make deploy-tools)")
    ignore = Path(f"{DOCKERFILE}.dockerignore")  # BuildKit's ignore file of this Dockerfile; the context is ROOT
    patterns = [p for p in ignore.read_text().splitlines() if p and not p.startswith("#")]
    context = set(build.exclude_paths(str(ROOT), patterns, dockerfile=str(DOCKERFILE.relative_to(ROOT))))
    for op, args in instructions():
        if op == "COPY":
            for source in [a for a in args.split() if not a.startswith("--")][:-1]:
                assert source in context or any(f.startswith(source + "/") for f in context), source
    top = {f.split("/", 1)[0] for f in context}
    assert top <= {"pyproject.toml", "README.md", "LICENSE", "plcsense", "deploy", ".dockerignore"}  # docker-py's
    assert {f for f in context if f.startswith("deploy/")} == {"deploy/train/train-job.sh", "deploy/train/Dockerfile"}
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in context)


def test_train_job_script_passes_shellcheck() -> None:
    run([tool("shellcheck"), str(SCRIPT)])


def rendered_job(path: Path) -> dict:
    objects = [d for d in yaml.safe_load_all(run([tool("kubectl"), "kustomize", str(path)])) if d]
    (job,) = [o for o in objects if o["kind"] == "Job"]
    return job


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_job_renders_and_validates_strictly(path: Path, tmp_path: Path) -> None:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(run([tool("kubectl"), "kustomize", str(path)]))
    validate = tool("kubernetes-validate")
    for version in VERSIONS:
        run([validate, "--strict", "--quiet", "-k", version, str(rendered)])


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_job_reads_the_data_read_only_and_writes_only_the_repository_and_tmp(path: Path) -> None:
    job = rendered_job(path)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"]
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert mounts[env["DATA"]]["readOnly"] and volumes[mounts[env["DATA"]]["name"]]["persistentVolumeClaim"]["readOnly"]
    repository = volumes[mounts[env["REPO"]]["name"]]["persistentVolumeClaim"]["claimName"]
    assert repository == "plcsense-model-repository" and not mounts[env["REPO"]].get("readOnly")
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # KERAS_HOME, MPLCONFIGDIR and the converter's files
    writable = {p for p, m in mounts.items() if not m.get("readOnly")}
    assert writable == {env["REPO"], "/tmp"}
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    if path.name == "gpu":
        assert gpus == 1 and env["KERAS_BACKEND"] == "jax" and container["image"].endswith("-gpu")
    else:
        assert gpus is None and "KERAS_BACKEND" not in env  # the image's own: TensorFlow


def train_job(env: dict[str, str], repo: Path, data: str) -> subprocess.CompletedProcess:
    """train-job with the rendered Job's environment, its volumes at ``repo`` and ``data``, this venv's plcsense."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    full = {**os.environ, **env, "REPO": str(repo), "DATA": data, "PATH": path}
    return subprocess.run(["sh", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=300, check=False)


def test_train_job_publishes_versions_a_worker_serves_and_a_site_fetches(tmp_path: Path, sensor_bundle: Path) -> None:
    (container,) = rendered_job(TRAIN / "k8s" / "cpu")["spec"]["template"]["spec"]["containers"]
    env = container_env(container)
    env.update(MODEL_NAME="pump", KIND="sensors", TRAIN_ARGS="--task anomaly --window 24")  # a detector: seconds
    write_sensor_csv(tmp_path / "normal.csv")
    repo = tmp_path / "repository"
    shutil.copytree(sensor_bundle, repo / "pump" / "7")  # an earlier version

    published = train_job(env, repo, str(tmp_path / "normal.csv"))
    assert published.returncode == 0, published.stderr[-3000:]
    assert versions(repo / "pump") == ["7", "8"]  # the next version
    assert resolve(repo / "pump") == repo / "pump" / "8"  # what a worker's route on the entry serves (latest)
    manifest = load_bundle(repo / "pump" / "8").manifest
    assert (manifest.name, manifest.version, manifest.task) == ("pump", "8", "anomaly")
    assert sorted(p.name for p in (repo / "pump").iterdir()) == ["7", "8", "pump-8.tar.gz", "pump-8.tar.gz.sha256"]

    # the pin it prints is the archive's sha256, which a site's init container checks before installing it
    archive = repo / "pump" / "pump-8.tar.gz"
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert (repo / "pump" / "pump-8.tar.gz.sha256").read_text() == f"{sha256}  pump-8.tar.gz\n"
    assert f"MODEL_NAME=pump MODEL_VERSION=8 MODEL_SHA256={sha256}" in published.stdout
    site = tmp_path / "site-models" / "pump" / "8"
    fetch = [sys.executable, "-m", "plcsense", "fetch", archive.as_uri(), "--sha256", sha256, "--into", str(site)]
    fetched = subprocess.run(fetch, capture_output=True, text=True, timeout=120, check=False)
    assert fetched.returncode == 0, fetched.stderr
    assert load_bundle(site).digest == load_bundle(repo / "pump" / "8").digest

    # a published version is never replaced, and a failed run publishes nothing
    before = load_bundle(repo / "pump" / "8").digest
    again = train_job({**env, "MODEL_VERSION": "8"}, repo, str(tmp_path / "normal.csv"))
    assert again.returncode == 2 and "never replaced" in again.stderr
    assert load_bundle(repo / "pump" / "8").digest == before
    failed = train_job(env, repo, str(tmp_path / "missing.csv"))
    assert failed.returncode != 0 and "missing.csv" in failed.stderr
    assert versions(repo / "pump") == ["7", "8"]
    assert not (repo / "pump" / "pump-9.tar.gz").exists()
