"""The worker image as shipped: hadolint-clean Dockerfile, base pinned by digest, OCI labels, dependencies from a
hashed lock in their own layer before the source, a build context of exactly what it copies, a lock that matches
pyproject.toml, a multi-arch build script, and a healthcheck that asks the port the worker's config says (run
against a real worker)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from plcsense.harness import WorkerProcess, free_port, write_worker_config
from tests.deploy_tools import DEPLOY, ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"
LOCK = DEPLOY / "image" / "requirements.txt"
HEALTHCHECK = DEPLOY / "image" / "healthcheck.py"
OCI_LABELS = ("title", "description", "version", "revision", "created", "source", "licenses", "base.name")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#"))
    )
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_dockerfile_passes_hadolint():
    run([tool("hadolint"), str(DOCKERFILE)])


def test_base_is_pinned_by_digest_and_labelled():
    steps = instructions()
    (base,) = [args for op, args in steps if op == "FROM"]
    digest = re.fullmatch(r"python:3\.11-slim-bookworm@(sha256:[0-9a-f]{64})", base)
    assert digest, f"base {base!r} is not pinned by digest"
    labels = " ".join(args for op, args in steps if op == "LABEL")
    for name in OCI_LABELS:
        assert f"org.opencontainers.image.{name}=" in labels
    assert f'org.opencontainers.image.base.digest="{digest[1]}"' in labels


def test_dependencies_come_from_the_lock_in_a_layer_before_the_source():
    steps = instructions()
    copies = [args for op, args in steps if op == "COPY"]
    runs = [args for op, args in steps if op == "RUN"]
    lock_copy = copies.index("deploy/image/requirements.txt /tmp/requirements.txt")
    source_copy = next(i for i, c in enumerate(copies) if c.startswith("plcsense "))
    assert lock_copy < source_copy
    installs = [r for r in runs if "pip install" in r]
    assert "--require-hashes" in installs[0] and "-r /tmp/requirements.txt" in installs[0]
    assert "--no-deps" in installs[1], "the package must not pull dependencies past the lock"
    user = next(args for op, args in steps if op == "USER")
    assert user.split(":")[0] not in ("0", "root")


def test_build_context_is_what_the_dockerfile_copies():
    build = pytest.importorskip("docker.utils.build", reason="pip install docker (make deploy-tools)")
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    context = set(build.exclude_paths(str(ROOT), patterns))
    for op, args in instructions():
        if op == "COPY":
            for source in args.split()[:-1]:
                assert source in context or any(f.startswith(source + "/") for f in context), source
    top = {f.split("/", 1)[0] for f in context}
    assert top <= {"pyproject.toml", "README.md", "LICENSE", "plcsense", "deploy", "Dockerfile", ".dockerignore"}
    assert {f for f in context if f.startswith("deploy/")} == {
        "deploy/image/requirements.txt",
        str(HEALTHCHECK.relative_to(ROOT)),
    }
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in context)


def lock() -> dict[str, tuple[str, int]]:
    """name -> (pinned version, number of hashes)."""
    pinned: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=\S)", LOCK.read_text()):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            pinned[match[1].lower().replace("_", "-")] = (match[2], block.count("--hash=sha256:"))
    return pinned


def test_lock_pins_every_runtime_dependency_with_hashes_and_nothing_for_training():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = lock()
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{name} is not in {LOCK.name}: run deploy/image/update-lock.sh"
        assert req.specifier.contains(pinned[name][0]), f"{name}=={pinned[name][0]} does not satisfy {spec}"
    assert all(hashes for _, hashes in pinned.values())
    training = {Requirement(s).name.lower() for s in project["optional-dependencies"]["train"]}
    assert not training & pinned.keys(), "the serving image must not carry training packages"


def test_multi_arch_build_script(tmp_path):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    script = str(DEPLOY / "build-image.sh")
    command = run(["sh", script, "registry.example:5000/plcsense", "--dry-run"]).split()
    assert command[:3] == ["docker", "buildx", "build"]
    assert command[command.index("--platform") + 1] == "linux/amd64,linux/arm64"
    assert f"VERSION={version}" in command and "--push" in command
    assert command[command.index("--tag") + 1] == f"registry.example:5000/plcsense:{version}"
    refused = subprocess.run(["sh", script, "x", "--load", "--dry-run"], capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "one platform" in refused.stderr


# ----------------------------------------------------------------------------- the healthcheck, for real
def healthcheck(config: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PLCSENSE_")}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), str(config)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def worker(tmp_path, broker):
    """A worker whose metrics listen on a port of its config (its route's model is missing: alive, not ready)."""
    route = {"name": "pump", "topic": "plant/+/pump", "model": str(tmp_path / "no-such-bundle")}
    config, port = write_worker_config(tmp_path / "config.yaml", broker.mqtt_settings(), [route])
    proc = WorkerProcess(config, port, tmp_path / "worker.log").start(wait=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if proc.get("/healthz")[0] == 200:
                break
        except OSError:
            time.sleep(0.1)
    else:
        pytest.fail(f"worker never served /healthz:\n{proc.log()}")
    yield proc
    proc.stop()


def test_healthcheck_asks_the_configured_port(worker):
    ok = healthcheck(worker.config)
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stdout + ok.stderr
    assert worker.metrics_port != 9108
    # An override in the container's environment counts as it does for the worker.
    moved = healthcheck(worker.config, PLCSENSE_METRICS__PORT=str(free_port()))
    assert moved.returncode == 1 and "unhealthy" in moved.stdout
    worker.kill()
    assert healthcheck(worker.config).returncode == 1


def test_healthcheck_finds_the_config_on_the_worker_command_line(worker):
    import importlib.util

    spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    assert module.config_from_cmdline(module.worker_cmdline(worker.pid)) == worker.config
    assert module.config_from_cmdline(["plcsense", "serve"]) == module.DEFAULT_CONFIG
    assert module.healthz_url("0.0.0.0", 9200) == "http://127.0.0.1:9200/healthz"
    assert module.healthz_url("::", 9200) == "http://[::1]:9200/healthz"
