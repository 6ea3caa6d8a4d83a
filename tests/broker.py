"""Start a real, private Mosquitto broker on a free port for tests.

Never touches a system broker: every broker gets its own config, port, log, password file,
persistence directory and TLS material under the given working directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
USERNAME = "plc"
START_TIMEOUT_S = 10.0
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin"])
_INSTALL_HINT = "install it with `apt-get install mosquitto mosquitto-clients` (or `brew install mosquitto`)"


def find_executable(name: str) -> str | None:
    """Path of a Mosquitto executable (also looked up in sbin dirs, which may not be on PATH)."""
    return shutil.which(name, path=_SEARCH_PATH)


def mosquitto_available() -> bool:
    """True when the broker binary (and ``mosquitto_passwd``) can be found; use for ``skipif``."""
    return find_executable("mosquitto") is not None and find_executable("mosquitto_passwd") is not None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _require(name: str) -> str:
    path = find_executable(name)
    if path is None:
        raise RuntimeError(f"`{name}` not found; the broker tests need a real Mosquitto: {_INSTALL_HINT}")
    return path


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _make_tls_material(tls_dir: Path) -> dict[str, Path]:
    """CA, server cert (CN/SAN 127.0.0.1 and localhost) and client cert, via the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("`openssl` not found; it is needed to make test TLS certificates")
    tls_dir.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run(
        [openssl, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=plcsense-test-ca",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-addext", "subjectKeyIdentifier=hash"],
        tls_dir,
    )  # fmt: skip
    leaves = {
        "server": ("/CN=127.0.0.1", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
        "client": ("/CN=plcsense-test-client", "clientAuth", ""),
    }
    for name, (subject, eku, extra) in leaves.items():
        ext = tls_dir / f"{name}.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={eku}\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n" + extra
        )
        _run([openssl, "req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject],
             tls_dir)  # fmt: skip
        _run(
            [openssl, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name],
            tls_dir,
        )  # fmt: skip
    return {
        "ca": tls_dir / "ca.crt",
        "server_cert": tls_dir / "server.crt",
        "server_key": tls_dir / "server.key",
        "client_cert": tls_dir / "client.crt",
        "client_key": tls_dir / "client.key",
    }


def _wait_for_port(proc: subprocess.Popen, port: int, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log = log_file.read_text(errors="replace") if log_file.exists() else "<no log>"
    raise RuntimeError(
        f"mosquitto did not accept connections on {HOST}:{port} within {timeout:.0f}s "
        f"(exit code {proc.returncode}); log {log_file}:\n{log}"
    )


def _spawn(config_file: Path, log_file: Path, port: int, timeout: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [_require("mosquitto"), "-c", str(config_file)],
        cwd=config_file.parent,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_port(proc, port, log_file, timeout)
    return proc


@dataclass
class Broker:
    """A running private Mosquitto; ``stop()`` it when done (``restart()`` keeps port and config)."""

    port: int
    process: subprocess.Popen
    config_file: Path
    log_file: Path
    tls: bool = False
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    username: str | None = None
    password: str | None = None
    host: str = HOST
    start_timeout: float = field(default=START_TIMEOUT_S, repr=False)

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``, or ``mqtts://...`` when TLS is on."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        """The broker log so far (handy in assertion messages)."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate (SIGTERM lets Mosquitto save its persistence DB), kill if it hangs. Idempotent."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Stop, then start again on the same port with the same config (for persistence tests)."""
        self.stop()
        self.process = _spawn(self.config_file, self.log_file, self.port, self.start_timeout)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_broker(
    workdir: Path,
    *,
    tls: bool = False,
    auth: bool = False,
    persistence: bool = False,
    require_client_cert: bool = False,
    timeout: float = START_TIMEOUT_S,
) -> Broker:
    """Write a mosquitto.conf into ``workdir``, start the broker on a free port and wait until it listens.

    ``auth`` adds user ``plc`` with a random password (anonymous access off); ``tls`` makes a CA, a server
    cert for 127.0.0.1/localhost and a client cert; ``require_client_cert`` (implies ``tls``) asks for
    mutual TLS; ``persistence`` stores sessions in ``workdir`` so they survive ``Broker.restart()``.
    """
    _require("mosquitto")
    tls = tls or require_client_cert
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "mosquitto.conf"
    log_file = workdir / "mosquitto.log"

    common = [
        # When run as root Mosquitto would switch to user "mosquitto", which may not read workdir.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        f"allow_anonymous {'false' if auth else 'true'}",
        "max_queued_messages 100000",
        "max_inflight_messages 100",
        f"log_dest file {log_file}",
        "log_type all",
        "connection_messages true",
        "log_timestamp true",
    ]
    username = password = None
    if auth:
        username, password = USERNAME, secrets.token_urlsafe(16)
        password_file = workdir / "passwd"
        _run([_require("mosquitto_passwd"), "-b", "-c", str(password_file), username, password], workdir)
        common.append(f"password_file {password_file}")
    if persistence:
        store = workdir / "persistence"
        store.mkdir(exist_ok=True)
        common += ["persistence true", f"persistence_location {store}/"]

    material: dict[str, Path] = _make_tls_material(workdir / "tls") if tls else {}

    last_error: RuntimeError | None = None
    for _ in range(3):  # the free port can be grabbed by someone else before Mosquitto binds it
        port = free_port()
        listener = [f"listener {port} {HOST}"]
        if tls:
            listener += [
                f"cafile {material['ca']}",
                f"certfile {material['server_cert']}",
                f"keyfile {material['server_key']}",
                f"require_certificate {'true' if require_client_cert else 'false'}",
            ]
        config_file.write_text("\n".join(common + listener) + "\n")
        log_file.unlink(missing_ok=True)
        try:
            process = _spawn(config_file, log_file, port, timeout)
        except RuntimeError as err:
            last_error = err
            if "Address already in use" in str(err):
                continue
            raise
        return Broker(
            port=port,
            process=process,
            config_file=config_file,
            log_file=log_file,
            tls=tls,
            ca_file=material.get("ca"),
            client_cert=material.get("client_cert"),
            client_key=material.get("client_key"),
            username=username,
            password=password,
            start_timeout=timeout,
        )
    assert last_error is not None
    raise last_error
