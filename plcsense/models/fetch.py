"""Bundles to the fleet: pack a bundle into one archive, and fetch it onto a site by URL and pinned sha256.

A site's manifests name each model version by URL and the archive's sha256 (``plcsense pack`` prints it), and an
init container runs ``plcsense fetch`` before the worker starts. The archive is checked against the pin before a
byte of it is unpacked, unpacked with tarfile's ``data`` filter (no absolute paths, no ``..``, no devices) and
without links or oversized contents, loaded as a bundle (seal, checksums, golden samples), and only then renamed
into ``<repo>/<name>/<version>`` in one step: until that rename it lives in hidden ``.<version>.*`` siblings, which
the worker's repository never reads. Several pods may fetch the same version at once; the first rename wins and
the others find the same bundle there. A version, once installed, never changes: another archive for it is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from plcsense.models.bundle import MANIFEST, Bundle, BundleError, bundle_digest, load_bundle

MAX_BYTES = 1 << 30
"""Default limit of the archive and, separately, of its unpacked contents (a bundle is tens of MB)."""
MAX_MEMBERS = 10_000
TIMEOUT_S = 300.0
SCHEMES = ("file", "http", "https")
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FetchError(Exception):
    """A bundle that cannot be fetched or installed; the message is one line, and nothing was installed."""


@dataclass(frozen=True)
class Installed:
    path: Path
    bundle: Bundle
    fresh: bool
    """False when the version was already there with the same digest (nothing was changed)."""


# ----------------------------------------------------------------------------- pack
def pack(bundle_dir: Path, out: Path) -> tuple[str, Bundle]:
    """Write ``bundle_dir`` as a gzipped tar with the bundle's files at its top; return its sha256 and the bundle.

    The bundle is loaded first, so what would be refused on site is never published. The archive is reproducible
    (sorted members, owner 0, fixed modes, every time the manifest's ``created_at``), so packing the same bundle
    twice gives the same sha256.
    """
    bundle = load_bundle(bundle_dir)
    stamp = int(bundle.manifest.created_at.timestamp())
    paths = sorted(bundle_dir.rglob("*"))
    for path in paths:
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise FetchError(f"{path}: only plain files and folders go into a bundle archive")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as raw:
        try:
            with (
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for path in paths:
                    info = tarfile.TarInfo(path.relative_to(bundle_dir).as_posix())
                    info.mtime, info.uid, info.gid, info.uname, info.gname = stamp, 0, 0, "", ""
                    if path.is_dir():
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(info)
                    else:
                        info.mode, info.size = 0o644, path.stat().st_size
                        with path.open("rb") as handle:
                            tar.addfile(info, handle)
            raw.flush()
            os.fsync(raw.fileno())
            os.replace(raw.name, out)
        except BaseException:
            Path(raw.name).unlink(missing_ok=True)
            raise
    return _sha256(out), bundle


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- fetch
def fetch(
    url: str,
    sha256: str,
    into: Path,
    *,
    expect_digest: str | None = None,
    max_bytes: int = MAX_BYTES,
    timeout_s: float = TIMEOUT_S,
) -> Installed:
    """Install the bundle archive at ``url`` as ``into`` (``<repo>/<name>/<version>``), or find it there already.

    ``sha256`` pins the archive (checked before unpacking), ``expect_digest`` optionally the bundle's seal
    (``sha256:...``); with it, a version already installed is checked in place and nothing is downloaded.
    """
    sha256 = sha256.lower()
    if not _SHA256.fullmatch(sha256):
        raise FetchError(f"--sha256 {sha256!r} is not 64 hex digits (the archive's sha256, as plcsense pack prints)")
    version = into.name
    if not version or version.startswith("."):
        raise FetchError(f"{into}: the last folder is the version and must be a plain name (<repo>/<name>/<version>)")
    existing = _existing(into)
    if existing is not None and expect_digest is not None:
        return Installed(into, _installed(into, expect_digest), fresh=False)
    into.parent.mkdir(parents=True, exist_ok=True)
    download = partial = None
    try:
        download = _download(url, into.parent, f".{version}.download-", max_bytes, timeout_s)
        got = _sha256(download)
        if got != sha256:
            raise FetchError(f"{url}: sha256 {got} is not the pinned {sha256}; nothing installed")
        partial = Path(tempfile.mkdtemp(dir=into.parent, prefix=f".{version}.partial-"))
        root = _unpack(download, partial, url, max_bytes)
        bundle = _load(root, expect_digest, url)
        if bundle.manifest.version != version:
            raise FetchError(
                f"{url}: the bundle is version {bundle.manifest.version!r}, not {version!r} (the worker knows a "
                "version by its folder name); fix the URL or --into"
            )
        if existing is not None:
            return Installed(into, _same(into, bundle), fresh=False)
        _sync_tree(root)
        try:
            root.rename(into)
        except OSError:  # another fetch of the same version renamed first
            if _existing(into) is None:
                raise
            return Installed(into, _same(into, bundle), fresh=False)
        _sync(into.parent)
        return Installed(into, bundle, fresh=True)
    finally:
        if download is not None:
            download.unlink(missing_ok=True)
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)


def _existing(into: Path) -> Path | None:
    """``into`` when a bundle is installed there; None when the version is free (absent or an empty folder)."""
    if (into / MANIFEST).is_file():
        return into
    if into.is_dir() and not any(into.iterdir()):
        return None
    if into.exists() or into.is_symlink():
        raise FetchError(f"{into} exists and is not a bundle; remove it to fetch this version")
    return None


def _load(path: Path, expect_digest: str | None, what: str) -> Bundle:
    try:
        return load_bundle(path, expect_digest=expect_digest)
    except BundleError as exc:
        raise FetchError(f"{what}: not a usable bundle: {exc}") from None


def _same(into: Path, bundle: Bundle) -> Bundle:
    """The installed bundle when it is the one fetched; versions never change once installed."""
    installed = bundle_digest(into)
    if installed != bundle.digest:
        raise FetchError(
            f"{into} is already installed with digest {installed}, the archive holds {bundle.digest}; "
            "a version never changes once installed: publish this bundle as a new version"
        )
    return _installed(into, bundle.digest)


def _installed(into: Path, digest: str) -> Bundle:
    """The version in place, checked like any load (its files may have been damaged since it was installed)."""
    return _load(into, digest, f"installed version {into} (remove it to fetch again)")


def _download(url: str, directory: Path, prefix: str, max_bytes: int, timeout_s: float) -> Path:
    """Stream ``url`` into a hidden file in ``directory`` (the repository's filesystem: a bundle may not fit in
    ``/tmp``), refusing more than ``max_bytes`` and giving up after about ``timeout_s``."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise FetchError(f"{url}: only {', '.join(s + '://' for s in SCHEMES)} URLs are fetched")
    deadline = time.monotonic() + timeout_s
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise FetchError(f"{url}: {int(length)} bytes, more than the limit of {max_bytes}")
            size = 0
            while block := response.read(_CHUNK):
                size += len(block)
                if size > max_bytes:
                    raise FetchError(f"{url}: more than the limit of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchError(f"{url}: not downloaded within {timeout_s:g} s")
                out.write(block)
    except urllib.error.HTTPError as exc:
        path.unlink(missing_ok=True)
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        path.unlink(missing_ok=True)
        raise FetchError(f"{url}: cannot be read ({exc.reason})") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed URL
        path.unlink(missing_ok=True)
        raise FetchError(f"{url}: cannot be read ({_one_line(exc)})") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _unpack(archive: Path, partial: Path, url: str, max_bytes: int) -> Path:
    """Unpack into ``partial`` after checking every member; return the bundle folder (the archive's top, or its
    one top folder, so that ``tar czf pump-3.tar.gz 3/`` works too)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members, total = [], 0
            for member in tar:
                members.append(member)
                total += member.size
                if len(members) > MAX_MEMBERS or total > max_bytes:
                    raise FetchError(f"{url}: unpacks to more than {MAX_MEMBERS} files or {max_bytes} bytes")
                if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts:
                    raise FetchError(f"{url}: {member.name!r} would land outside the bundle folder")
                if not (member.isfile() or member.isdir()):
                    raise FetchError(f"{url}: {member.name!r} is a link or special file; a bundle has neither")
                try:
                    tarfile.data_filter(member, str(partial))
                except tarfile.FilterError as exc:
                    raise FetchError(f"{url}: unsafe archive member ({exc})") from None
            tar.extractall(partial, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:  # truncated, corrupt, or not an archive
        raise FetchError(f"{url}: not a readable bundle archive ({_one_line(exc)})") from None
    if (partial / MANIFEST).is_file():
        return partial
    top = list(partial.iterdir())
    if len(top) == 1 and (top[0] / MANIFEST).is_file():
        return top[0]
    raise FetchError(f"{url}: no {MANIFEST} at the archive's top or in its one top folder")


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())[:200]


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """Everything on disk before the rename makes it visible (a site losing power must not keep half a version)."""
    for path in sorted(root.rglob("*"), reverse=True):
        _sync(path)
    _sync(root)
