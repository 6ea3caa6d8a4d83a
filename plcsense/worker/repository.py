"""A model repository: ``<repo>/<name>/<version>/`` holds one bundle per version, as TensorFlow Serving and
Triton lay theirs out. A route names either one bundle directory or such a ``<repo>/<name>`` entry with a version
policy (``latest``, or a pinned version), so a new version is rolled out by copying it in beside the old one.
"""

from __future__ import annotations

import re
from pathlib import Path

from plcsense.models.bundle import MANIFEST, BundleError

LATEST = "latest"


def _order(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: ``2 < 10``, ``1.9 < 1.10``; non-numeric parts compare as text after numbers."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-_+]", version))


def is_bundle(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def versions(entry: Path) -> list[str]:
    """Complete versions of a repository entry, oldest first (a folder still being copied has no manifest yet)."""
    if not entry.is_dir():
        return []
    found = [p.name for p in entry.iterdir() if p.is_dir() and not p.name.startswith(".") and is_bundle(p)]
    return sorted(found, key=_order)


def resolve(model: Path, policy: str = LATEST, *, candidate: bool = False) -> Path:
    """The bundle directory a route serves: ``model`` itself when it is a bundle, else the version ``policy``
    picks from the repository entry ``model``. Versions and candidates need an entry: a single bundle has none
    to pick, and would only shadow itself."""
    if is_bundle(model):
        if candidate or policy != LATEST:
            what = f"candidate {policy!r}" if candidate else f"version {policy!r}"
            raise BundleError(
                f"{model} is one bundle, not a repository entry, so {what} cannot apply; point model at "
                f"<repo>/<name>, whose subfolders are the versions"
            )
        return model
    available = versions(model)
    if not available:
        raise BundleError(f"{model}: neither a bundle nor a repository entry with versions (<{model}>/<version>/)")
    if policy == LATEST:
        return model / available[-1]
    if policy not in available:
        raise BundleError(f"{model}: version {policy!r} not in the repository (has {', '.join(available)})")
    return model / policy


def previous(model: Path, current: str) -> str | None:
    """The version before ``current`` in the repository entry, for a rollback."""
    older = [v for v in versions(model) if _order(v) < _order(current)]
    return older[-1] if older else None
