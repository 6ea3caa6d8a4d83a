"""The Kubernetes manifests as shipped: every kustomization renders (kubectl kustomize) and validates strictly
(kubernetes-validate), and the rendered site is correct by construction: windowed routes never in a shared group,
one replica where there is no shared group, client ids unique across sites, config changes roll the pods, the
TLS file the config names is mounted, the models PVC exists, grace covers the drain, PDB, spread, NetworkPolicy.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import time
from functools import cache
from pathlib import Path

import pytest
import yaml

from plcsense.harness import WorkerProcess, free_port
from plcsense.worker.service import Worker
from plcsense.worker.settings import load_settings
from tests.deploy_tools import DEPLOY, run, tool

K8S = DEPLOY / "k8s"
VERSIONS = ("1.30.0", "1.37.0")  # oldest Kubernetes we support, newest schema the validator has


def kustomizations(kind: str = "Kustomization") -> list[Path]:
    return sorted(
        p.parent
        for p in K8S.rglob("kustomization.yaml")
        if yaml.safe_load(p.read_text()).get("kind", "Kustomization") == kind
    )


def overlays() -> list[Path]:
    return sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


@cache
def render(path: Path) -> str:
    return run([tool("kubectl"), "kustomize", str(path)])


def docs(path: Path, *, fresh: bool = False) -> list[dict]:
    text = run([tool("kubectl"), "kustomize", str(path)]) if fresh else render(path)
    return [d for d in yaml.safe_load_all(text) if d]


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _rel(path: Path) -> str:
    return str(path.relative_to(K8S))


@pytest.mark.parametrize("path", kustomizations(), ids=_rel)
def test_kustomization_renders_and_validates_strictly(path, tmp_path):
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(render(path))
    validate = tool("kubernetes-validate")
    for version in VERSIONS:
        run([validate, "--strict", "--quiet", "-k", version, str(rendered)])


def test_podmonitor_component_adds_the_site_label(tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    overlay = copy / "overlays" / "line3" / "kustomization.yaml"
    overlay.write_text(overlay.read_text() + "components:\n  - ../../components/podmonitor\n")
    (monitor,) = of_kind(docs(copy / "overlays" / "line3", fresh=True), "PodMonitor")
    relabel = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_plcsense_io_site"], "targetLabel": "site"} in relabel
    assert monitor["metadata"]["namespace"] == "plcsense-line3"


# ----------------------------------------------------------------------------- what a pod would run
def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of an env value from the variables defined before it."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), value)


def pod_env(sts: dict, ordinal: int) -> dict[str, str]:
    """The worker container's environment in pod ``ordinal`` (downward API resolved, secrets as placeholders)."""
    template = sts["spec"]["template"]
    container = template["spec"]["containers"][0]
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
            continue
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            env[var["name"]] = f"<{source['secretKeyRef']['name']}/{source['secretKeyRef']['key']}>"
            continue
        field = source["fieldRef"]["fieldPath"]
        if field == "metadata.name":
            env[var["name"]] = f"{sts['metadata']['name']}-{ordinal}"
        else:
            label = re.fullmatch(r"metadata\.labels\['(.+)'\]", field)[1]  # type: ignore[index]
            env[var["name"]] = template["metadata"]["labels"][label]
    return env


def pod_config(objects: list[dict], sts: dict) -> dict:
    """config.yaml of the ConfigMap the StatefulSet mounts."""
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    name = volumes["config"]["configMap"]["name"]
    (cm,) = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == name]
    return yaml.safe_load(cm["data"]["config.yaml"])


def mounted_file(sts: dict, path: str) -> tuple[dict, str] | None:
    """(volume, key) that puts a file at ``path`` in the worker container, if any."""
    spec = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in spec["containers"][0]["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = volumes[mount["name"]]
            inner = path[len(prefix) :]
            source = volume.get("secret") or volume.get("configMap") or {}
            items = {i["path"]: i["key"] for i in source.get("items", [])}
            return volume, items.get(inner, inner)
    return None


def _workloads(overlay: Path, *, fresh: bool = False) -> list[dict]:
    return of_kind(docs(overlay, fresh=fresh), "StatefulSet")


@pytest.mark.parametrize("overlay", overlays(), ids=_rel)
def test_each_pod_config_loads_as_the_worker_would(overlay, tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith("PLCSENSE_")]:
        monkeypatch.delenv(name)
    objects = docs(overlay)
    for sts in _workloads(overlay):
        config = pod_config(objects, sts)
        for key in ("ca_file", "cert_file", "key_file"):  # the files must exist for the settings to load
            if config["mqtt"].get(key):
                stand_in = tmp_path / key
                stand_in.write_text("pem")
                config["mqtt"][key] = str(stand_in)
        path = tmp_path / f"{sts['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(config))
        for ordinal in range(sts["spec"]["replicas"]):
            with monkeypatch.context() as env:
                for key, value in pod_env(sts, ordinal).items():
                    env.setenv(key, value)
                settings = load_settings(path)
            assert settings.mqtt.client_id == f"{pod_env(sts, ordinal)['SITE']}-{sts['metadata']['name']}-{ordinal}"


@pytest.mark.parametrize("overlay", overlays(), ids=_rel)
def test_windowed_routes_never_share_and_unshared_workloads_never_scale(overlay):
    objects = docs(overlay)
    for sts in _workloads(overlay):
        config = pod_config(objects, sts)
        shared = "PLCSENSE_MQTT__SHARED_GROUP" in pod_env(sts, 0) or config["mqtt"].get("shared_group")
        name = sts["metadata"]["name"]
        if shared:
            for route in config["routes"]:
                stateless = route.get("encoding") == "image" or route.get("full_windows") is True
                assert stateless, f"{name}: route {route['name']} may keep sliding windows but is in a shared group"
        else:
            assert sts["spec"]["replicas"] == 1, f"{name}: {sts['spec']['replicas']} replicas would all answer"


def test_client_ids_and_shared_groups_are_unique_across_sites(tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    line3, line4 = copy / "overlays" / "line3", copy / "overlays" / "line4"
    shutil.copytree(line3, line4)
    for name in ("kustomization.yaml", "namespace.yaml"):
        (line4 / name).write_text((line4 / name).read_text().replace("line3", "line4"))
    ids: list[str] = []
    groups: set[str] = set()
    for overlay in (line3, line4):
        for sts in _workloads(overlay, fresh=True):
            for ordinal in range(sts["spec"]["replicas"]):
                env = pod_env(sts, ordinal)
                ids += [env["PLCSENSE_MQTT__CLIENT_ID"], env["PLCSENSE_MQTT__CLIENT_ID"] + "-answers"]
                if "PLCSENSE_MQTT__SHARED_GROUP" in env:
                    groups.add((overlay.name, env["PLCSENSE_MQTT__SHARED_GROUP"]))
    assert len(ids) == len(set(ids)) == 2 * 2 * (2 + 1 + 1)
    assert len({group for _, group in groups}) == 2, "each site's image workers form their own group"


def test_config_change_rolls_the_pods(tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    before = {s["metadata"]["name"]: s for s in _workloads(copy / "overlays" / "line3", fresh=True)}
    config = copy / "workloads" / "images" / "config.yaml"
    config.write_text(config.read_text() + "log_level: DEBUG\n")
    after = {s["metadata"]["name"]: s for s in _workloads(copy / "overlays" / "line3", fresh=True)}

    def config_map(sts: dict) -> str:
        (volume,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
        return volume["configMap"]["name"]

    assert config_map(after["plcsense-images"]) != config_map(before["plcsense-images"])
    assert config_map(after["plcsense-pumps-line1"]) == config_map(before["plcsense-pumps-line1"])


@pytest.mark.parametrize("overlay", overlays(), ids=_rel)
def test_tls_models_and_config_volumes_exist(overlay):
    objects = docs(overlay)
    claims = {p["metadata"]["name"] for p in of_kind(objects, "PersistentVolumeClaim")}
    for sts in _workloads(overlay):
        config = pod_config(objects, sts)
        for key in ("ca_file", "cert_file", "key_file"):
            if config["mqtt"].get(key):
                found = mounted_file(sts, config["mqtt"][key])
                assert found is not None, f"{key} {config['mqtt'][key]} is not mounted"
                volume, secret_key = found
                assert "secret" in volume and secret_key in {"ca.crt", "tls.crt", "tls.key"}
        for volume in sts["spec"]["template"]["spec"]["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for route in config["routes"]:
            assert mounted_file(sts, route["model"] + "/manifest.json"), f"{route['model']} is not on a volume"


@pytest.mark.parametrize("overlay", overlays(), ids=_rel)
def test_disruption_budget_spread_network_policy_and_grace(overlay):
    objects = docs(overlay)
    drain_s = inspect.signature(Worker.stop).parameters["timeout"].default
    budgets, policies = of_kind(objects, "PodDisruptionBudget"), of_kind(objects, "NetworkPolicy")
    workloads = _workloads(overlay)
    for sts in workloads:
        spec = sts["spec"]["template"]["spec"]
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert spec["terminationGracePeriodSeconds"] >= drain_s + 5 + 10
        assert spec["topologySpreadConstraints"]

        def selects(selector: dict, labels: dict = labels) -> bool:
            return selector.items() <= labels.items()

        mine = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"])]
        assert len(mine) == 1 and mine[0]["spec"]["maxUnavailable"] == 1, sts["metadata"]["name"]
        assert any(selects(p["spec"]["podSelector"]["matchLabels"]) for p in policies)
        others = [o for o in workloads if o is not sts]
        for other in others:
            assert not selects(
                mine[0]["spec"]["selector"]["matchLabels"], other["spec"]["template"]["metadata"]["labels"]
            )
    for policy in policies:
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_pump_workload_runs_on_a_real_worker_and_would_be_refused_in_a_shared_group(tmp_path, broker, sensor_bundle):
    """The rendered pump pod (config and environment) on a real worker and broker: ready as shipped; moved into the
    image workload's shared group, its windowed route is refused instead of mis-scoring."""
    overlay = K8S / "overlays" / "line3"
    (sts,) = [s for s in _workloads(overlay) if s["metadata"]["name"] == "plcsense-pumps-line1"]
    config = pod_config(docs(overlay), sts)
    config["mqtt"] = {k: v for k, v in config["mqtt"].items() if k != "ca_file"} | broker.mqtt_settings()
    port = free_port()
    config["metrics"] = {"host": "127.0.0.1", "port": port}
    for route in config["routes"]:
        route["model"] = str(sensor_bundle)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in pod_env(sts, 0).items() if k not in ("PLCSENSE_MQTT__USERNAME", "PLCSENSE_MQTT__PASSWORD")}

    shipped = WorkerProcess(path, port, tmp_path / "shipped.log", env=env).start()
    assert shipped.get("/readyz") == (200, "ready\n")
    assert shipped.terminate() == 0

    images = next(s for s in _workloads(overlay) if s["metadata"]["name"] == "plcsense-images")
    shared = WorkerProcess(
        path,
        port,
        tmp_path / "shared.log",
        env={**env, "PLCSENSE_MQTT__SHARED_GROUP": pod_env(images, 0)["PLCSENSE_MQTT__SHARED_GROUP"]},
    ).start(wait=False)
    try:
        deadline, status, body = time.monotonic() + 30, 0, ""
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                status, body = shared.get("/readyz")
                if "shared_group" in body:
                    break
            time.sleep(0.1)
        assert status == 503 and "line3-images" in body and "sliding windows" in body, shared.log()
    finally:
        shared.stop()
