"""`plcsense pack` and `plcsense fetch`, as a site's init container runs them: a packed bundle fetched by URL and
pinned sha256 (file:// and a real HTTP server) lands in the model repository in one rename; a wrong sha256, a
broken archive, an unsafe member, a bundle that does not load or the wrong version installs nothing; fetching
again, or twice at once, leaves the one installed version in place."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from plcsense.cli import main
from plcsense.models.bundle import bundle_digest, load_bundle, read_manifest, write_manifest
from plcsense.worker import repository


def plcsense(*args: object) -> subprocess.CompletedProcess:
    """The command line in this process (a process per call would spend most of the test starting Python)."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def packed(bundle: Path, out: Path) -> str:
    """``plcsense pack``; returns the sha256 it printed (checked against the file)."""
    proc = plcsense("pack", bundle, "--out", out)
    assert proc.returncode == 0, proc.stderr
    sha256, name = proc.stdout.split()
    assert name == str(out) and sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    return sha256


def refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2 with one line on stderr that says why."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plcsense: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]


def nothing_installed(repo: Path) -> None:
    """The repository holds no version and no leftovers (download or partial folders)."""
    assert not repo.exists() or list(repo.iterdir()) == [], sorted(repo.iterdir())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def archive(sensor_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The session's sensor bundle (version 1) packed, with the sha256 pack printed."""
    out = tmp_path_factory.mktemp("archive") / "pump-1.tar.gz"
    return out, packed(sensor_bundle, out)


def tar_of(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def bundle_members(bundle: Path, prefix: str = "") -> list[tuple[tarfile.TarInfo, bytes | None]]:
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    return [(tarfile.TarInfo(prefix + p.relative_to(bundle).as_posix()), p.read_bytes()) for p in files]


def rebuilt(bundle: Path, where: Path, **changes: object) -> Path:
    """A copy of ``bundle`` with manifest fields changed and the seal rewritten (a real, different bundle)."""
    copy = where / "rebuilt"
    shutil.copytree(bundle, copy)
    write_manifest(copy, read_manifest(copy).model_copy(update=changes))
    return copy


def test_pack_is_reproducible_and_fetch_installs_by_file_url(tmp_path, sensor_bundle, archive):
    path, sha256 = archive
    assert packed(sensor_bundle, tmp_path / "again.tar.gz") == sha256, "same bundle, same archive"
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert "manifest.json" in names and all(not n.startswith(("/", "..")) for n in names)
        assert {m.uid for m in tar} == {0} and {m.uname for m in tar} == {""}

    repo = tmp_path / "models" / "pump"
    proc = plcsense("fetch", path.as_uri(), "--sha256", sha256, "--into", repo / "1")
    assert proc.returncode == 0, proc.stderr
    digest = bundle_digest(sensor_bundle)
    assert proc.stdout.strip() == f"installed: pump v1 at {repo / '1'} ({digest})"
    assert load_bundle(repo / "1", expect_digest=digest).manifest.version == "1"
    assert sorted(p.name for p in repo.iterdir()) == ["1"], "no download or partial folder left behind"
    assert repository.versions(repo) == ["1"] and repository.resolve(repo, "1") == repo / "1"


@pytest.fixture
def http_root(tmp_path) -> Iterator[tuple[Path, str, list[str]]]:
    """A real HTTP server on a free port serving a folder; yields (folder, base URL, paths requested)."""
    root = tmp_path / "www"
    root.mkdir()
    requested: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_over_http_then_again_is_idempotent(tmp_path, sensor_bundle, archive, http_root):
    path, sha256 = archive
    root, base, requested = http_root
    shutil.copy(path, root / "pump-1.tar.gz")
    url, into = f"{base}/pump-1.tar.gz", tmp_path / "models" / "pump" / "1"

    first = plcsense("fetch", url, "--sha256", sha256, "--into", into)
    assert first.returncode == 0 and first.stdout.startswith("installed: pump v1"), first.stderr
    stamp = (into / "manifest.json").stat().st_mtime_ns

    again = plcsense("fetch", url, "--sha256", sha256, "--into", into)
    assert again.returncode == 0 and again.stdout.startswith("already installed: pump v1"), again.stderr
    assert requested == ["/pump-1.tar.gz"] * 2
    # With the seal pinned too, an installed version is checked in place: nothing is downloaded.
    pinned = plcsense("fetch", url, "--sha256", sha256, "--into", into, "--expect-digest", bundle_digest(sensor_bundle))
    assert pinned.returncode == 0 and pinned.stdout.startswith("already installed"), pinned.stderr
    assert requested == ["/pump-1.tar.gz"] * 2
    assert (into / "manifest.json").stat().st_mtime_ns == stamp, "an installed version is never rewritten"
    assert sorted(p.name for p in into.parent.iterdir()) == ["1"]

    refused(plcsense("fetch", f"{base}/missing.tar.gz", "--sha256", sha256, "--into", into.parent / "2"), "HTTP 404")
    nothing_installed(into.parent / "2")


def test_wrong_sha256_installs_nothing(tmp_path, archive):
    path, sha256 = archive
    wrong = ("0" if sha256[0] != "0" else "1") + sha256[1:]
    repo = tmp_path / "models" / "pump"
    refused(plcsense("fetch", path.as_uri(), "--sha256", wrong, "--into", repo / "1"), sha256, "nothing installed")
    nothing_installed(repo)
    refused(plcsense("fetch", path.as_uri(), "--sha256", "abc", "--into", repo / "1"), "64 hex digits")


@pytest.mark.parametrize(
    "member",
    [
        ("../escaped", b"x"),
        ("/tmp/absolute", b"x"),
        ("link", "/etc/passwd"),
        ("model.tflite", "../../../outside"),
    ],
    ids=["dot-dot", "absolute", "symlink-out", "symlink-over-model"],
)
def test_unsafe_archive_is_refused_before_anything_is_written(tmp_path, sensor_bundle, member):
    name, payload = member
    info = tarfile.TarInfo(name)
    if isinstance(payload, str):
        info.type, info.linkname, payload = tarfile.SYMTYPE, payload, None
    members = [m for m in bundle_members(sensor_bundle) if m[0].name != name]
    evil = tar_of(tmp_path / "evil.tar.gz", [*members, (info, payload)])
    repo = tmp_path / "site" / "models" / "pump"
    refused(plcsense("fetch", evil.as_uri(), "--sha256", sha(evil), "--into", repo / "1"))
    nothing_installed(repo)
    assert sorted(p.name for p in (tmp_path / "site").rglob("*")) == ["models", "pump"], "nothing written outside"


def test_a_bundle_that_does_not_load_or_is_another_version_installs_nothing(tmp_path, sensor_bundle, archive):
    repo = tmp_path / "models" / "pump"
    # A model file changed after export: the bundle's own checksums catch it.
    members = [
        (info, data + b"\0" if info.name == "model.tflite" and data else data)
        for info, data in bundle_members(sensor_bundle)
    ]
    tampered = tar_of(tmp_path / "tampered.tar.gz", members)
    refused(
        plcsense("fetch", tampered.as_uri(), "--sha256", sha(tampered), "--into", repo / "1"),
        "not a usable bundle",
        "checksum mismatch for model.tflite",
    )
    # Not an archive at all, and an archive cut short.
    path, sha256 = archive
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar file")
    refused(plcsense("fetch", junk.as_uri(), "--sha256", sha(junk), "--into", repo / "1"), "not a readable")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(plcsense("fetch", cut.as_uri(), "--sha256", sha(cut), "--into", repo / "1"), "not a readable")
    # The right bundle under another version's folder, a pinned seal it does not match, too big.
    refused(plcsense("fetch", path.as_uri(), "--sha256", sha256, "--into", repo / "2"), "version '1', not '2'")
    other = "sha256:" + "0" * 64
    refused(
        plcsense("fetch", path.as_uri(), "--sha256", sha256, "--into", repo / "1", "--expect-digest", other),
        f"not the pinned {other}",
    )
    refused(plcsense("fetch", path.as_uri(), "--sha256", sha256, "--into", repo / "1", "--max-bytes", "1000"), "limit")
    nothing_installed(repo)


def test_a_top_folder_in_the_archive_is_accepted(tmp_path, sensor_bundle):
    """What `tar czf pump-1.tar.gz 1/` makes by hand."""
    made = tar_of(tmp_path / "by-hand.tar.gz", bundle_members(sensor_bundle, prefix="1/"))
    repo = tmp_path / "models" / "pump"
    proc = plcsense("fetch", made.as_uri(), "--sha256", sha(made), "--into", repo / "1")
    assert proc.returncode == 0, proc.stderr
    assert bundle_digest(repo / "1") == bundle_digest(sensor_bundle) and repository.versions(repo) == ["1"]


def test_an_installed_version_never_changes(tmp_path, sensor_bundle, archive):
    """Another bundle published under an installed version is refused; the installed one stays as it was."""
    path, sha256 = archive
    repo = tmp_path / "models" / "pump"
    assert plcsense("fetch", path.as_uri(), "--sha256", sha256, "--into", repo / "1").returncode == 0
    other = rebuilt(sensor_bundle, tmp_path, metrics={"retrained": 1.0})
    other_archive = tmp_path / "other-1.tar.gz"
    other_sha = packed(other, other_archive)
    refused(
        plcsense("fetch", other_archive.as_uri(), "--sha256", other_sha, "--into", repo / "1"),
        "already installed with digest",
        "publish this bundle as a new version",
    )
    assert bundle_digest(repo / "1") == bundle_digest(sensor_bundle)
    assert sorted(p.name for p in repo.iterdir()) == ["1"]
    # Damaged in place (a disk error, a hand edit): found out, not left to the worker, and not overwritten.
    model = repo / "1" / "model.tflite"
    model.write_bytes(model.read_bytes()[:-1])
    digest = bundle_digest(sensor_bundle)
    for pinned in ([], ["--expect-digest", digest]):
        refused(
            plcsense("fetch", path.as_uri(), "--sha256", sha256, "--into", repo / "1", *pinned),
            "checksum mismatch for model.tflite",
            "remove it to fetch again",
        )


def test_replicas_fetching_the_same_version_at_once_all_succeed(tmp_path, sensor_bundle):
    """The pods of a workload (and of other workloads) start together and fetch into one shared volume."""
    v2 = rebuilt(sensor_bundle, tmp_path, version="2")
    path = tmp_path / "pump-2.tar.gz"
    sha256 = packed(v2, path)
    repo = tmp_path / "models" / "pump"
    cmd = [sys.executable, "-m", "plcsense", "fetch", path.as_uri(), "--sha256", sha256, "--into", str(repo / "2")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert sum(out.startswith("installed:") for out, _ in outs) == 1, "the first rename wins"
    assert repository.versions(repo) == ["2"] and sorted(p.name for p in repo.iterdir()) == ["2"]
    assert bundle_digest(repo / "2") == bundle_digest(v2)
