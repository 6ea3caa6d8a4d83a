"""The Kubernetes manifests as shipped: every kustomization renders (kubectl kustomize) and validates strictly
(kubernetes-validate), and the rendered site is correct by construction: windowed routes never in a shared group,
one replica where there is no shared group, client ids unique across sites, config changes roll the pods, the
TLS file the config names is mounted, the models PVC exists, grace covers the drain, PDB, spread, NetworkPolicy;
every pod's init containers fetch exactly the model versions its routes pin, into the volume the worker reads, and
run as rendered they install what the rendered worker then serves.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import cache, partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from plcsense.harness import WorkerProcess, free_port
from plcsense.models.bundle import read_manifest, write_manifest
from plcsense.models.fetch import pack
from plcsense.worker.service import Worker
from plcsense.worker.settings import load_settings
from tests.conftest import WINDOW, Collector, publish_all
from tests.deploy_tools import DEPLOY, run, tool
from tests.test_worker import readings

K8S = DEPLOY / "k8s"
VERSIONS = ("1.30.0", "1.37.0")  # oldest Kubernetes we support, newest schema the validator has


def kustomizations(kind: str = "Kustomization") -> list[Path]:
    return sorted(
        p.parent
        for p in K8S.rglob("kustomization.yaml")
        if yaml.safe_load(p.read_text()).get("kind", "Kustomization") == kind
    )


def overlays() -> list[Path]:
    """Every site overlay, and the examples built on one (a canary), which must hold the same invariants."""
    found = [p for d in ("overlays", "examples") for p in (K8S / d).iterdir() if (p / "kustomization.yaml").is_file()]
    return sorted(found)


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
    for route in config["routes"]:  # the shipped route pins a version of a repository entry: lay one out
        entry = tmp_path / "models" / route["name"]
        shutil.copytree(sensor_bundle, entry / route.get("version", "1"))  # the fixture's bundle is version 1
        route["model"] = str(entry)
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


# ----------------------------------------------------------------------------- model versions
def container_env(container: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for var in container.get("env", []):
        env[var["name"]] = _expand(var["value"], env)
    return env


def fetch_args(init: dict, env: dict[str, str] | None = None) -> list[str]:
    """The ``plcsense`` arguments an init container runs, with its $(VAR)s expanded as the kubelet does."""
    env = container_env(init) if env is None else env
    return [_expand(arg, env) for arg in init["args"]]


def fetches(sts: dict) -> dict[str, tuple[str, str]]:
    """``--into`` path -> (URL, pinned sha256) of every init container of the workload."""
    found = {}
    for init in sts["spec"]["template"]["spec"].get("initContainers", []):
        command, url, *rest = fetch_args(init)
        options = dict(zip(rest[::2], rest[1::2], strict=True))
        assert command == "fetch" and options.keys() == {"--sha256", "--into"}, init["name"]
        found[options["--into"]] = (url, options["--sha256"])
    return found


def mount_of(container: dict, path: str) -> dict | None:
    for mount in container.get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return mount
    return None


def egress_allows(policy: dict, port: int) -> bool:
    for rule in policy["spec"].get("egress", []):
        ports = rule.get("ports")
        if not ports or any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            return True
    return False


@pytest.mark.parametrize("overlay", overlays(), ids=_rel)
def test_every_pod_fetches_exactly_the_versions_its_routes_pin(overlay):
    """The version a site serves is written in its manifests twice, the init containers' pins and the routes'
    ``version``/``candidate``: they must agree, and neither may float (``latest``), or a rollback would not be one."""
    objects = docs(overlay)
    policies = of_kind(objects, "NetworkPolicy")
    for sts in _workloads(overlay):
        name, labels = sts["metadata"]["name"], sts["spec"]["template"]["metadata"]["labels"]
        pinned = set()
        for route in pod_config(objects, sts)["routes"]:
            assert route.get("version", "latest") != "latest", f"{name}: route {route['name']} must pin its version"
            pinned.add(f"{route['model']}/{route['version']}")
            if route.get("candidate") is not None:
                assert route["candidate"] != "latest", f"{name}: route {route['name']} must pin its candidate"
                pinned.add(f"{route['model']}/{route['candidate']}")
        fetched = fetches(sts)
        assert set(fetched) == pinned, f"{name}: init containers fetch {sorted(fetched)}, routes pin {sorted(pinned)}"
        mine = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        for into, (url, sha256) in fetched.items():
            repo_entry, version = into.rsplit("/", 1)
            assert url.startswith("https://") and url.endswith(f"/{Path(repo_entry).name}-{version}.tar.gz"), url
            assert re.fullmatch(r"[0-9a-f]{64}", sha256), f"{name}: {into} pins sha256 {sha256!r}"
            parts = urlsplit(url)
            port = parts.port or {"https": 443, "http": 80}[parts.scheme]
            assert any(egress_allows(p, port) for p in mine), f"{name}: no egress to the model store's port {port}"


@pytest.mark.parametrize("overlay", overlays(), ids=_rel)
def test_fetch_writes_the_volume_the_worker_reads_under_the_restricted_profile(overlay):
    for sts in _workloads(overlay):
        spec = sts["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        (worker,) = spec["containers"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in [*spec["initContainers"], worker]:  # what Pod Security "restricted" asks of each
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
        for init in spec["initContainers"]:
            assert init["image"] == worker["image"], "the init container is the worker's image"
            into = fetch_args(init)[-1]
            written, read = mount_of(init, into), mount_of(worker, into)
            assert written and read and written["name"] == read["name"] == "models"
            assert written["mountPath"] == read["mountPath"], "the worker finds the bundle where it was written"
            assert not written.get("readOnly") and read["readOnly"] is True
            assert "persistentVolumeClaim" in volumes["models"]
            assert not volumes["models"]["persistentVolumeClaim"].get("readOnly"), "a read-only claim blocks fetch"
            tmp = mount_of(init, "/tmp/x")
            assert tmp and "emptyDir" in volumes[tmp["name"]] and not tmp.get("readOnly")


@pytest.fixture(scope="module")
def store(sensor_bundle, tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """A model store on a real HTTP server: pump versions 1 (the session's sensor bundle) and 2 (re-sealed), packed
    as a publisher would, at <store>/pump/pump-<version>.tar.gz; yields (store URL, sha256 by version)."""
    root = tmp_path_factory.mktemp("store")
    v2 = root / "v2"
    shutil.copytree(sensor_bundle, v2)
    write_manifest(v2, read_manifest(v2).model_copy(update={"version": "2"}))
    (root / "pump").mkdir()
    shas = {v: pack(b, root / "pump" / f"pump-{v}.tar.gz")[0] for v, b in (("1", sensor_bundle), ("2", v2))}
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", shas
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("overlay", [K8S / "overlays" / "line3", K8S / "examples" / "pump-canary"], ids=_rel)
def test_rendered_init_containers_install_what_the_rendered_worker_serves(tmp_path, overlay, store, broker, collectors):
    """The pumps-line1 pod as rendered, on this machine: its init containers' commands (the store and the
    placeholder sha256 swapped for a local server's) install the pinned versions into a models folder, then the
    worker with the rendered config serves the pinned version (and loads the canary's candidate)."""
    base, shas = store
    (sts,) = [s for s in _workloads(overlay) if s["metadata"]["name"] == "plcsense-pumps-line1"]
    models = tmp_path / "models"
    for init in sts["spec"]["template"]["spec"]["initContainers"]:
        env = container_env(init)
        env |= {"MODEL_STORE": base, "MODEL_SHA256": shas[env["MODEL_VERSION"]]}
        args = [re.sub(r"^/models/", f"{models}/", arg) for arg in fetch_args(init, env)]
        proc = subprocess.run([sys.executable, "-m", "plcsense", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith("installed: pump"), proc.stderr

    config = pod_config(docs(overlay), sts)
    config["mqtt"] = {k: v for k, v in config["mqtt"].items() if k != "ca_file"} | broker.mqtt_settings()
    port = free_port()
    config["metrics"] = {"host": "127.0.0.1", "port": port}
    (route,) = config["routes"]
    route["model"] = re.sub(r"^/models/", f"{models}/", route["model"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    worker = WorkerProcess(path, port, tmp_path / "worker.log", env={"PLCSENSE_MQTT__CLIENT_ID": "line3-pumps-0"})
    worker.start()
    try:
        loaded = 1 + (route.get("candidate") is not None)
        assert worker.metric("plcsense_model_info", route="pump", model="pump", version=route["version"]) == 1
        assert worker.metric("plcsense_model_loads_total", route="pump", outcome="loaded") == loaded
        if "candidate" not in route:
            out = Collector(broker, "plant/line1/p1/pump/result")
            collectors.append(out)
            publish_all(broker, "plant/line1/p1/pump", [json.dumps({"id": "w", "data": readings(WINDOW)})])
            (answer,) = out.wait_for(1)
            assert answer["model"]["version"] == route["version"] == "1"
    finally:
        worker.stop()


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes storage quantity ("2Gi", "500M", "1073741824") in bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMGTE]i?)?", quantity).groups()  # type: ignore[union-attr]
    power = "KMGTE".index(unit[0]) + 1 if unit else 0
    return int(number) * (1024 if unit and unit.endswith("i") else 1000) ** power


@pytest.mark.parametrize("overlay", overlays(), ids=_rel)
def test_capture_folders_are_on_a_persistent_writable_volume_of_each_worker(overlay):
    """Captured inputs must outlive the pod (they are labelled later), fit their volume, and never be shared by two
    workers (each numbers its own files)."""
    objects = docs(overlay)
    claims = {c["metadata"]["name"]: c for c in of_kind(objects, "PersistentVolumeClaim")}
    captures = 0
    for sts in _workloads(overlay):
        spec = sts["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        templates = {t["metadata"]["name"]: t for t in sts["spec"].get("volumeClaimTemplates", [])}
        for route in pod_config(objects, sts)["routes"]:
            if not route.get("capture"):
                continue
            captures += 1
            where = f"{sts['metadata']['name']}: route {route['name']} captures into {route['capture']['dir']}"
            mount = mount_of(spec["containers"][0], route["capture"]["dir"])
            assert mount and not mount.get("readOnly") and mount["name"] != "models", f"{where}: not writable"
            if mount["name"] in templates:
                claim = templates[mount["name"]]
            else:
                source = volumes[mount["name"]].get("persistentVolumeClaim")
                assert source and sts["spec"]["replicas"] == 1, f"{where}: not a volume of this one worker's own"
                claim = claims[source["claimName"]]
            storage = quantity_bytes(claim["spec"]["resources"]["requests"]["storage"])
            assert route["capture"].get("max_bytes", 1 << 30) <= storage, f"{where}: max_bytes exceeds {storage}"
    if overlay == K8S / "examples" / "weld-capture":
        assert captures, "the capture example captures"
