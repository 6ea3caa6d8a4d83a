"""The compose stack as shipped: valid against the compose spec, nothing published beyond 127.0.0.1, no secret in
the environment, a grace period that covers the worker's drain, and a broker that refuses anonymous clients while
its healthcheck, the worker (both connections) and the PLCs get through, on a real Mosquitto with the shipped
mosquitto.conf, acl and password script."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pwd
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from plcsense.harness import (
    Broker,
    MqttConnectError,
    close,
    connect,
    find_executable,
    free_port,
    mosquitto_available,
)
from plcsense.worker.service import Worker
from tests.conftest import WINDOW, Collector, publish_all
from tests.deploy_tools import DEPLOY, run, tool
from tests.test_broker_settings import mosquitto_settings

COMPOSE = DEPLOY / "compose.yaml"
requires_mosquitto = pytest.mark.skipif(
    not mosquitto_available(), reason="needs the mosquitto binary (apt-get install mosquitto mosquitto-clients)"
)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_matches_the_compose_spec():
    run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])


def test_ports_are_published_on_localhost_only():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            host = str(port).rsplit(":", 2)[0]
            assert host in ("127.0.0.1", "${MQTT_BIND:-127.0.0.1}"), f"{name} publishes {port} on every interface"


def test_no_secret_in_the_environment_and_no_admin_api():
    services = compose()["services"]
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert key.endswith("__FILE"), f"{name}: {key}={value} puts a secret in the environment"
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert not any("enable-lifecycle" in a or "enable-admin-api" in a for a in services["prometheus"]["command"])
    for name, secret in compose()["secrets"].items():
        assert secret["file"] == f"./secrets/{name}", "secrets live in deploy/secrets/, made by init-secrets.sh"


def _seconds(duration: str) -> float:
    value, unit = re.fullmatch(r"(\d+)(s|m)", duration).groups()  # type: ignore[union-attr]
    return int(value) * (60 if unit == "m" else 1)


def test_stop_grace_period_covers_the_drain():
    drain_s = inspect.signature(Worker.stop).parameters["timeout"].default
    batchers_s = 5  # Worker.stop closes the pipeline with timeout=5 after the drain
    grace = _seconds(compose()["services"]["worker"]["stop_grace_period"])
    assert grace >= drain_s + batchers_s + 10, f"{grace} s grace for a {drain_s} + {batchers_s} s drain"


def test_worker_is_hardened_and_logs_are_bounded():
    services = compose()["services"]
    worker = services["worker"]
    assert worker["read_only"] is True and worker["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in worker["security_opt"]
    for name, service in services.items():
        assert service["logging"]["options"]["max-size"], f"{name} logs grow without bound"


def test_broker_config_refuses_anonymous_clients():
    conf = mosquitto_settings(DEPLOY / "mosquitto" / "mosquitto.conf")
    assert conf["allow_anonymous"] == "false"
    broker = compose()["services"]["mosquitto"]
    mounts = {v.split(":")[1] for v in broker["volumes"]}
    assert str(Path(conf["password_file"]).parent) in mounts
    assert conf["acl_file"] in mounts


def test_init_secrets_makes_distinct_passwords_and_keeps_existing_ones(tmp_path):
    secrets = tmp_path / "secrets"
    subprocess.run(["sh", str(DEPLOY / "init-secrets.sh"), str(secrets)], check=True, capture_output=True)
    files = {p.name: p.read_text() for p in secrets.iterdir()}
    assert set(files) == set(compose()["secrets"])
    passwords = [v for k, v in files.items() if k != "smtp_password"]
    assert len(set(passwords)) == len(passwords) and all(len(p) >= 32 for p in passwords)
    assert (secrets.stat().st_mode & 0o777) == 0o700
    (secrets / "mqtt_plc_password").write_text("chosen")
    subprocess.run(["sh", str(DEPLOY / "init-secrets.sh"), str(secrets)], check=True, capture_output=True)
    assert (secrets / "mqtt_plc_password").read_text() == "chosen"
    assert (secrets / "mqtt_worker_password").read_text() == files["mqtt_worker_password"]


def test_shell_scripts_pass_shellcheck():
    scripts = [str(p) for p in DEPLOY.rglob("*.sh")]
    assert scripts
    run([tool("shellcheck"), "--shell=sh", *scripts])


# ----------------------------------------------------------------------------- the shipped broker, for real
def _shipped_broker(workdir: Path, auth: Path) -> tuple[subprocess.Popen, int, Path]:
    """Mosquitto with deploy/mosquitto/mosquitto.conf, its paths moved into ``workdir`` and its port free."""
    port, log = free_port(), workdir / "mosquitto.log"
    (workdir / "data").mkdir()
    moved = {
        "listener": f"listener {port} 127.0.0.1",
        "persistence_location": f"persistence_location {workdir / 'data'}/",
        "password_file": f"password_file {auth / 'passwd'}",
        "acl_file": f"acl_file {DEPLOY / 'mosquitto' / 'acl'}",
        "log_dest": f"log_dest file {log}",
    }
    lines = [f"user {pwd.getpwuid(os.geteuid()).pw_name}"]
    for line in (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        lines.append(moved.get(key, line))
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return proc, port, log
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"shipped mosquitto.conf did not start:\n{log.read_text() if log.exists() else ''}")


@pytest.fixture
def shipped_broker(tmp_path):
    """(worker's Broker, PLC's Broker, auth dir): one real Mosquitto, seen with each user's credentials."""
    if not mosquitto_available():
        pytest.skip("needs the mosquitto binary (apt-get install mosquitto mosquitto-clients)")
    secrets, auth = tmp_path / "secrets", tmp_path / "auth"
    subprocess.run(["sh", str(DEPLOY / "init-secrets.sh"), str(secrets)], check=True, capture_output=True)
    env = {**os.environ, "SECRETS_DIR": str(secrets), "AUTH_DIR": str(auth)}
    subprocess.run(["sh", str(DEPLOY / "mosquitto" / "mosquitto-users.sh")], env=env, check=True, capture_output=True)
    proc, port, log = _shipped_broker(tmp_path, auth)
    as_user = {
        user: Broker(port=port, process=proc, config_file=tmp_path / "mosquitto.conf", log_file=log,
                     username=user, password=(secrets / secret).read_text())
        for user, secret in (("plcsense", "mqtt_worker_password"), ("plc", "mqtt_plc_password"))
    }  # fmt: skip
    yield as_user["plcsense"], as_user["plc"], auth
    as_user["plc"].stop()


@requires_mosquitto
def test_password_script_is_repeatable(tmp_path):
    secrets, auth = tmp_path / "secrets", tmp_path / "auth"
    subprocess.run(["sh", str(DEPLOY / "init-secrets.sh"), str(secrets)], check=True, capture_output=True)
    env = {**os.environ, "SECRETS_DIR": str(secrets), "AUTH_DIR": str(auth)}
    script = ["sh", str(DEPLOY / "mosquitto" / "mosquitto-users.sh")]
    subprocess.run(script, env=env, check=True, capture_output=True)
    first = (auth / "healthcheck.password").read_text()
    subprocess.run(script, env=env, check=True, capture_output=True)
    # A broker that was not restarted still holds the first healthcheck password: it must not change.
    assert (auth / "healthcheck.password").read_text() == first
    users = [line.split(":", 1)[0] for line in (auth / "passwd").read_text().splitlines()]
    assert users == ["plcsense", "plc", "healthcheck"]
    (secrets / "mqtt_plc_password").write_text("")
    refused = subprocess.run(script, env=env, capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "init-secrets.sh" in refused.stderr


@requires_mosquitto
def test_broker_refuses_anonymous_and_wrong_passwords(shipped_broker):
    worker_view, _plc, _auth = shipped_broker
    with pytest.raises(MqttConnectError):
        close(connect(worker_view.url))
    with pytest.raises(MqttConnectError):
        close(connect(worker_view.url, username="plcsense", password="guess"))


@requires_mosquitto
def test_compose_healthcheck_works_with_auth(shipped_broker):
    if find_executable("mosquitto_sub") is None:
        pytest.skip("needs mosquitto_sub (apt-get install mosquitto-clients)")
    worker_view, _plc, auth = shipped_broker
    command = compose()["services"]["mosquitto"]["healthcheck"]["test"][1]
    command = command.replace("$$", "$").replace("/mosquitto/auth/", f"{auth}/")
    command = command.replace("-p 1883", f"-p {worker_view.port}")
    assert subprocess.run(["sh", "-c", command], timeout=15, check=False).returncode == 0
    (auth / "healthcheck.password").write_text("stale")
    assert subprocess.run(["sh", "-c", command], timeout=15, check=False).returncode != 0


@requires_mosquitto
def test_worker_and_plcs_get_through_the_acl(shipped_broker, sensor_bundle, run_worker, collectors):
    worker_view, plc, _auth = shipped_broker
    route = {"name": "pump", "topic": "plant/+/pump", "model": str(sensor_bundle), "encoding": "json"}
    worker = run_worker(worker_view, [route], client_id="line3-worker")  # ready: both connections, subscribed
    out = Collector(plc, "plant/#")
    status = Collector(plc, "plcsense/+/status")
    collectors.extend([out, status])
    rows = [[0.1 * i, 1.0, 10.0] for i in range(WINDOW)]
    publish_all(plc, "plant/p1/pump", [json.dumps({"data": r, "id": f"r{i}"}) for i, r in enumerate(rows)])
    results = out.wait_for(1, "/result")
    assert [r["id"] for r in results] == [f"r{WINDOW - 1}"], worker.log()
    assert status.wait(1)[0].payload == b"online"
    assert worker.metric("plcsense_answers_dropped_total", route="pump", reason="refused") == 0
