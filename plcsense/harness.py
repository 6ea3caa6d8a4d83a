"""One harness for the demo, the tests and the benchmarks: a private Mosquitto, ``plcsense serve`` as a process,
an MQTT connect that checks the CONNACK, and a collector of the worker's answers.

It is product code because ``plcsense demo`` runs on a user's machine with it. Every broker it starts is its
own: config, free port, log, password file, persistence directory and TLS material live under the folder it is
given, so it never touches a system broker.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from plcsense.mqtt_url import client_for, host_port, redacted

HOST = "127.0.0.1"
USERNAME = "plc"
START_TIMEOUT_S = 10.0
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin"])
_INSTALL_HINT = "install it with `apt-get install mosquitto mosquitto-clients` (or `brew install mosquitto`)"


class MqttConnectError(ConnectionError):
    """The broker was unreachable, refused the connection or sent no CONNACK; the message says which."""

    def __init__(self, message: str, reason: mqtt.ReasonCode | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        """The CONNACK's reason code when the broker refused, else None."""


class MqttSubscribeError(RuntimeError):
    """A subscription was refused (e.g. by the broker's ACL) or not acknowledged in time."""


class WorkerError(RuntimeError):
    """The worker process exited or did not become ready; the message ends with its log."""


# ----------------------------------------------------------------------------- a private Mosquitto
def find_executable(name: str) -> str | None:
    """Path of a Mosquitto executable (also looked up in sbin dirs, which may not be on PATH)."""
    return shutil.which(name, path=_SEARCH_PATH)


def mosquitto_available() -> bool:
    """True when the broker binary and ``mosquitto_passwd`` can be found; use for ``skipif``."""
    return find_executable("mosquitto") is not None and find_executable("mosquitto_passwd") is not None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _require(name: str) -> str:
    path = find_executable(name)
    if path is None:
        raise RuntimeError(f"`{name}` not found; a private MQTT broker needs a real Mosquitto: {_INSTALL_HINT}")
    return path


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _make_tls_material(tls_dir: Path) -> dict[str, Path]:
    """CA, server cert (CN/SAN 127.0.0.1 and localhost) and client cert, via the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("`openssl` not found; it is needed to make the broker's TLS certificates")
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
        """``mqtt://127.0.0.1:PORT``, or ``mqtts://...`` when TLS is on (credentials are not in it)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def mqtt_settings(self) -> dict[str, Any]:
        """The worker config's ``mqtt`` section for this broker: url, credentials and CA."""
        settings: dict[str, Any] = {"url": self.url}
        if self.username:
            settings |= {"username": self.username, "password": self.password}
        if self.ca_file:
            settings["ca_file"] = str(self.ca_file)
        return settings

    def connect(self, **kwargs: Any) -> mqtt.Client:
        """:func:`connect` to this broker with its credentials and CA; ``kwargs`` go to :func:`connect`."""
        return connect(self.url, username=self.username, password=self.password, ca_file=self.ca_file, **kwargs)

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
    extra_conf: Sequence[str] = (),
    verbose_log: bool = True,
    timeout: float = START_TIMEOUT_S,
) -> Broker:
    """Write a mosquitto.conf into ``workdir``, start the broker on a free port and wait until it listens.

    ``auth`` adds user ``plc`` with a random password (anonymous access off); ``tls`` makes a CA, a server
    cert for 127.0.0.1/localhost and a client cert; ``require_client_cert`` (implies ``tls``) asks for
    mutual TLS; ``persistence`` stores sessions in ``workdir`` so they survive ``Broker.restart()``;
    ``extra_conf`` lines are added to the global section (e.g. ``acl_file ...``). ``verbose_log`` logs every
    packet, which helps a failing test but slows a benchmark and fills the disk of a long demo.
    """
    import pwd  # POSIX only: imported here so that the simulator still loads on any platform

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
        *(["log_type all"] if verbose_log else ["log_type error", "log_type warning", "log_type notice"]),
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
    common += list(extra_conf)

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


# ----------------------------------------------------------------------------- connecting
def connect(
    url: str,
    *,
    client_id: str = "",
    protocol: str = "5",
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | str | None = None,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
    session_expiry_s: int | None = None,
    receive_maximum: int | None = None,
    max_inflight: int | None = None,
    manual_ack: bool = False,
    on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None] | None = None,
    keepalive: int = 30,
    timeout: float = 10.0,
) -> mqtt.Client:
    """A client connected to ``url`` with its network loop running, or :class:`MqttConnectError`.

    paho's ``connect()`` only opens the socket: a broker that refuses the credentials answers in the CONNACK,
    which arrives later on the network thread. This waits for it, so a wrong password is an error here instead
    of silently lost publishes. ``session_expiry_s`` asks for a persistent session (MQTT 5 expiry; MQTT 3.1.1
    keeps the session whatever the value); ``receive_maximum`` bounds what the broker sends before we ack
    (MQTT 5); ``max_inflight`` is paho's own window for what we publish. ``on_message`` is installed before
    connecting, so messages queued for a persistent session are not missed.
    """
    v5 = protocol == "5"
    client = client_for(
        url,
        client_id=client_id,
        protocol=protocol,
        persistent=session_expiry_s is not None,
        manual_ack=manual_ack,
        username=username,
        password=password,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
    )
    if max_inflight is not None:
        client.max_inflight_messages_set(max_inflight)
    if on_message is not None:
        client.on_message = on_message
    client.reconnect_delay_set(1, 5)
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(_c: mqtt.Client, _u: Any, _flags: Any, reason: mqtt.ReasonCode, _props: Any) -> None:
        outcome.setdefault("reason", reason)
        done.set()

    def on_lost(*_args: Any) -> None:
        outcome.setdefault("lost", True)
        done.set()

    client.on_connect = on_connect
    client.on_connect_fail = on_lost
    client.on_disconnect = on_lost
    kwargs: dict[str, Any] = {}
    if v5:
        props = Properties(PacketTypes.CONNECT)
        if session_expiry_s is not None:
            props.SessionExpiryInterval = session_expiry_s
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
        kwargs = {"clean_start": session_expiry_s is None, "properties": props}
    where = redacted(url)
    try:
        client.connect(*host_port(url), keepalive=keepalive, **kwargs)
    except OSError as exc:  # refused port, unknown host, TLS handshake (ssl.SSLError is an OSError)
        raise MqttConnectError(f"cannot reach the MQTT broker at {where}: {exc}") from None
    client.loop_start()
    answered = done.wait(timeout)
    reason = outcome.get("reason")
    if not answered or reason is None or reason.is_failure:
        client.loop_stop()
        with contextlib.suppress(OSError):
            client.disconnect()
        if not answered:
            raise MqttConnectError(f"no CONNACK from the MQTT broker at {where} within {timeout:.0f} s")
        if reason is None:
            raise MqttConnectError(f"the MQTT broker at {where} closed the connection before its CONNACK")
        raise MqttConnectError(f"the MQTT broker at {where} refused the connection: {reason}", reason)
    client.on_connect_fail = client.on_disconnect = None
    return client


def close(client: mqtt.Client) -> None:
    """Disconnect and stop the network loop (what every user of :func:`connect` does at the end)."""
    client.disconnect()
    client.loop_stop()


# ----------------------------------------------------------------------------- collecting answers
@dataclass(frozen=True, slots=True)
class Answer:
    """A worker result or error document and when it arrived (``time.perf_counter()``)."""

    topic: str
    doc: dict[str, Any]
    received: float

    @property
    def is_error(self) -> bool:
        return "error" in self.doc


def _answer_doc(payload: bytes) -> dict[str, Any] | None:
    """The worker's result or error document in ``payload``, or None for anything else (inputs included)."""
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) and ("task" in doc or "error" in doc) else None


class ResultCollector:
    """Subscribes ``client`` to ``topics`` and keeps every message, and the worker's answers by id.

    At-least-once delivery may answer an id twice: such repeats are counted in ``duplicates`` and do not count
    towards :meth:`wait_for`. Answers without an id (raw images, npy tensors) each count once.
    """

    def __init__(
        self,
        client: mqtt.Client,
        topics: str | Sequence[str],
        *,
        qos: int = 1,
        on_answer: Callable[[Answer], None] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.client = client
        self.messages: list[mqtt.MQTTMessage] = []
        self.answers: list[Answer] = []
        """Every answer once: the first one per id, and each one without an id."""
        self.by_id: dict[str, Answer] = {}
        self.duplicates = 0
        self._on_answer = on_answer
        self._cond = threading.Condition(threading.RLock())
        subscribed = threading.Event()
        granted: list[Any] = []

        def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _props: Any) -> None:
            granted.extend(reasons)
            subscribed.set()

        client.on_message = self._on_message
        client.on_subscribe = on_subscribe
        filters = [topics] if isinstance(topics, str) else list(topics)
        client.subscribe([(t, qos) for t in filters])
        if not subscribed.wait(timeout):
            raise MqttSubscribeError(f"no SUBACK for {filters} within {timeout:.0f} s")
        refused = [f"{t}: {r}" for t, r in zip(filters, granted, strict=False) if getattr(r, "is_failure", False)]
        if refused:
            raise MqttSubscribeError("subscription refused: " + "; ".join(refused))

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        doc = _answer_doc(msg.payload)
        answer = None if doc is None else Answer(msg.topic, doc, time.perf_counter())
        with self._cond:
            self.messages.append(msg)
            if answer is not None:
                key = answer.doc.get("id")
                if key is None or str(key) not in self.by_id:
                    self.answers.append(answer)
                    if key is not None:
                        self.by_id[str(key)] = answer
                else:
                    self.duplicates += 1
                    answer = None
            self._cond.notify_all()
        if answer is not None and self._on_answer is not None:
            self._on_answer(answer)

    @property
    def results(self) -> list[dict[str, Any]]:
        with self._cond:
            return [a.doc for a in self.answers if not a.is_error]

    @property
    def errors(self) -> list[dict[str, Any]]:
        with self._cond:
            return [a.doc for a in self.answers if a.is_error]

    def messages_on(self, suffix: str = "") -> list[mqtt.MQTTMessage]:
        """Every message so far whose topic ends with ``suffix``."""
        with self._cond:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``done()`` (called with the collector locked) is true; False after ``timeout`` s."""
        with self._cond:
            return self._cond.wait_for(done, timeout)

    def wait_for(self, want: int | Iterable[str], timeout: float = 20.0) -> bool:
        """Wait for ``want`` answers (a count), or for an answer to each id in ``want``; False on timeout.

        Waiting for the id of a message sent last (a sentinel) is how to show that nothing else arrived: the
        worker answers in order, so once the sentinel's answer is here, any answer to earlier input is too.
        """
        if isinstance(want, int):
            return self.wait_until(lambda: len(self.answers) >= want, timeout)
        ids = {str(i) for i in want}
        return self.wait_until(lambda: ids <= self.by_id.keys(), timeout)

    def close(self) -> None:
        close(self.client)


# ----------------------------------------------------------------------------- the worker as a process
def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory (``VmHWM``) of a running process in MB; None where /proc does not tell (not Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return None if kb is None else kb / 1024


def write_worker_config(
    path: Path, mqtt_settings: dict[str, Any], routes: list[dict[str, Any]], *, metrics_port: int | None = None
) -> tuple[Path, int]:
    """A worker config (JSON, which is YAML) with metrics on 127.0.0.1; returns it and the metrics port."""
    port = metrics_port or free_port()
    config = {"mqtt": mqtt_settings, "metrics": {"port": port, "host": HOST}, "routes": routes}
    path.write_text(json.dumps(config, indent=2))
    return path, port


class WorkerProcess:
    """``plcsense serve --config CONFIG`` as a subprocess, its output in ``log``.

    The config rules: ``PLCSENSE_...`` variables of this process are not passed on (they would override it),
    only those in ``env``.
    """

    def __init__(self, config: Path, metrics_port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.config, self.metrics_port, self.log_path = config, metrics_port, log
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, wait: bool = True, timeout: float = 30.0) -> WorkerProcess:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("PLCSENSE_")}
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "plcsense", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**inherited, **self.env},
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def get(self, path: str) -> tuple[int, str]:
        """Status and body of ``GET path`` on the worker's HTTP port (OSError while it is not listening)."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}{path}", timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for ``/readyz`` to say 200 (models loaded, connected, subscribed), or :class:`WorkerError`."""
        assert self.proc is not None, "not started"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise WorkerError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if self.get("/readyz")[0] == 200:
                    return
            time.sleep(0.1)
        raise WorkerError(f"worker not ready after {timeout:.0f} s:\n{self.log()}")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of ``/metrics``, keyed by name and sorted labels."""
        from prometheus_client.parser import text_string_to_metric_families

        _, text = self.get("/metrics")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def peak_rss_mb(self) -> float | None:
        return peak_rss_mb(self.pid)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (the worker drains and goes offline) and wait; its exit code."""
        assert self.proc is not None, "not started"
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing drained."""
        assert self.proc is not None, "not started"
        self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Kill it if it still runs (teardown: fast and idempotent)."""
        if self.proc and self.proc.poll() is None:
            self.kill()
