"""The Kubernetes deployment (deploy/, Dockerfile) checked offline against the code it runs.

Every overlay is rendered with ``kubectl kustomize`` (plus one test-only overlay that adds the
pbt-controller component, which no shipped overlay uses yet) and then checked:

* schema: strict validation with kubernetes-validate for Kubernetes 1.32 (the kind node's
  version); the prometheus-operator CRD kinds (PodMonitor, PrometheusRule) are checked
  structurally instead;
* consistency with the code: container commands are ``spiral`` subcommands, environment
  variables are ones the package reads, ports are the services' ports, metrics in dashboards
  and alert rules are ones :mod:`spiral.runtime.metrics` exports, every PromQL expression parses
  (``promtool check rules``) and the alerts fire on the data they are meant for
  (``promtool test rules``);
* policy in the spirit of kube-linter's defaults: probes, requests, non-root and locked-down
  security contexts, tagged images, selectors that match, no dangling Services, a PDB on the
  actors, dedicated ServiceAccounts without tokens, NetworkPolicies;
* the Dockerfile, statically (no Docker daemon is needed): multi-stage, no build tools in the
  runtime stage, numeric non-root user, pinned base image, runtime packages that exist.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from spiral.commands.cli import SUBCOMMANDS
from spiral.commands.config import resolved_yaml
from spiral.config import load_experiment, resolve_experiment, to_dict
from spiral.runtime.metrics import metric_names
from spiral.commands.layout import LEARNER_ROLES
from spiral.runtime.service_options import DEFAULT_DEVICE, DEFAULT_METRICS_PORT, DEFAULT_PORTS, ENV_VARS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").exists())
DASHBOARDS = sorted((DEPLOY / "components" / "monitoring" / "dashboards").glob("*.json"))
K8S_VERSION = "1.32.0"
"""Schema version for kubernetes-validate: the kind node image's minor (deploy/kind/cluster.yaml)."""
CRD_KINDS = {"PodMonitor", "PrometheusRule"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
RUN_AS_USER = 10001
"""The numeric user of the image (Dockerfile) and of every pod."""
API_USERS = {"pbt-controller"}
"""Components that call the Kubernetes API, so theirs are the only pods with a token."""
WELL_KNOWN_ENV = {"OMP_NUM_THREADS", "MUJOCO_GL", "PYOPENGL_PLATFORM", "PYTHONUNBUFFERED", "NVIDIA_VISIBLE_DEVICES",
                  "NVIDIA_DRIVER_CAPABILITIES"}
"""Variables read by libraries the services load (OpenMP, MuJoCo, Python, the NVIDIA runtime)."""
EXTERNAL_SERIES_PREFIXES = ("process_", "python_", "kube_", "container_", "DCGM_")
"""Series exported by others: prometheus-client's process/GC collectors, kube-state-metrics,
cAdvisor and NVIDIA's dcgm-exporter."""
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan", "atan2"}
REQUIRED_SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/component"}
REQUIRED_LABELS = REQUIRED_SELECTOR_KEYS | {"app.kubernetes.io/part-of", "app.kubernetes.io/instance"}


# -- rendering ----------------------------------------------------------------------------------

def kustomize(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIRECTORY`` as a list of objects (a failure shows kustomize's error)."""
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@lru_cache(maxsize=None)
def _render_cached(name: str) -> tuple[str, ...]:
    if name == "pbt-test":
        docs = kustomize(_pbt_test_overlay())
    else:
        docs = kustomize(DEPLOY / "overlays" / name)
    return tuple(json.dumps(d) for d in docs)


def rendered(name: str) -> list[dict[str, Any]]:
    """The objects of overlay NAME (a fresh copy each call; rendering happens once)."""
    return [json.loads(d) for d in _render_cached(name)]


@lru_cache(maxsize=None)
def _pbt_test_overlay() -> Path:
    """A test-only overlay like the shipped ones, plus the pbt-controller and artifacts-s3 components.

    It is written to a temporary directory; kustomize loads bases and components outside an
    overlay's root (only plain files must lie below it), given as relative paths.
    """
    root = Path(tempfile.mkdtemp(prefix="spiral-pbt-overlay-"))
    atexit.register(shutil.rmtree, root, True)
    (root / "tiny.yaml").write_text(resolved_yaml(resolve_experiment(ROOT / "experiments" / "tiny.yaml"),
                                                  "spiral config resolve tiny"))
    deploy = os.path.relpath(DEPLOY, root)
    (root / "kustomization.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: kustomize.config.k8s.io/v1beta1
        kind: Kustomization
        namespace: spiral-pbt-test
        resources: [{deploy}/base]
        components: [{deploy}/components/gpu, {deploy}/components/pbt-controller, {deploy}/components/artifacts-s3,
                     {deploy}/components/monitoring]
        labels:
          - pairs: {{app.kubernetes.io/instance: spiral-pbt-test}}
            includeSelectors: false
            includeTemplates: true
        configMapGenerator:
          - name: spiral-experiment
            files: [experiment.yaml=tiny.yaml]
        images:
          - {{name: spiral, newName: example.org/spiral, newTag: 0.1.0-cpu}}
          - {{name: spiral-cuda, newName: example.org/spiral, newTag: 0.1.0-cuda}}
        """))
    return root


ALL_RENDERS = [*OVERLAYS, "pbt-test"]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def role_of(container: dict[str, Any]) -> str:
    """The ``spiral`` subcommand a container runs (``spiral ROLE ...``)."""
    command = [*container.get("command", []), *container.get("args", [])]
    assert len(command) >= 2 and command[0] == "spiral", \
        f"container {container['name']!r} must run `spiral SUBCOMMAND`, runs {command}"
    return command[1]


def env_of(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def overlay_kustomization(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "overlays" / name / "kustomization.yaml").read_text())


def experiment_copy(name: str) -> Path:
    """The experiment file an overlay's ``spiral-experiment`` ConfigMap is generated from."""
    (generator,) = [g for g in overlay_kustomization(name).get("configMapGenerator", [])
                    if g["name"] == "spiral-experiment"]
    (entry,) = generator["files"]
    return DEPLOY / "overlays" / name / entry.partition("=")[2]


# -- rendering and schema -----------------------------------------------------------------------

@pytest.mark.parametrize("overlay", ALL_RENDERS)
def test_overlay_renders_and_passes_strict_schema_validation(overlay: str) -> None:
    import kubernetes_validate

    docs = rendered(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "StatefulSet", "Service", "ConfigMap", "NetworkPolicy",
            "PodDisruptionBudget", "ServiceAccount"} <= kinds
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:  # type: ignore[attr-defined]
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_schema_validation_rejects_an_unknown_field() -> None:
    """The strict validator is really strict (else the test above would prove nothing)."""
    import kubernetes_validate

    deployment = workloads(rendered("kind"))[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):  # type: ignore[attr-defined]
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", [o for o in ALL_RENDERS if o != "kind"])
def test_crd_objects_are_well_formed(overlay: str) -> None:
    docs = rendered(overlay)
    namespace = overlay_namespace(docs)
    pod_monitors, rules = by_kind(docs, "PodMonitor"), by_kind(docs, "PrometheusRule")
    assert len(pod_monitors) == 1 and len(rules) == 1, "the monitoring component adds one PodMonitor and one rule"
    pods = [w["spec"]["template"] for w in workloads(docs)]
    for doc in pod_monitors + rules:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["metadata"]["namespace"] == namespace
    monitor = pod_monitors[0]["spec"]
    selected = [p for p in pods if selects(monitor["selector"]["matchLabels"], p["metadata"]["labels"])]
    assert len(selected) == len(pods), "the PodMonitor must scrape every spiral pod"
    for endpoint in monitor["podMetricsEndpoints"]:
        for pod in selected:
            names = {port["name"] for c in pod["spec"]["containers"] for port in c.get("ports", [])}
            assert endpoint["port"] in names, f"PodMonitor port {endpoint['port']!r} is not a port of {names}"
        relabel_targets = {r["targetLabel"] for r in endpoint.get("relabelings", [])}
        assert "component" in relabel_targets, "dashboards and alerts group by `component`"
    groups = rules[0]["spec"]["groups"]
    assert groups and all(g["name"] and g["rules"] for g in groups)
    for rule in (r for g in groups for r in g["rules"]):
        assert ("alert" in rule) != ("record" in rule) and isinstance(rule["expr"], str)
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert {"SpiralActorsDown", "SpiralLearnerStalled", "SpiralPolicyLagHigh", "SpiralReplayStarved"} <= alerts
    dashboards = [c for c in by_kind(docs, "ConfigMap") if c["metadata"].get("labels", {}).get("grafana_dashboard")]
    assert dashboards and {Path(p).name for p in dashboards[0]["data"]} == {p.name for p in DASHBOARDS}


# -- overlays ----------------------------------------------------------------------------------

def overlay_namespace(docs: list[dict[str, Any]]) -> str:
    (namespace,) = by_kind(docs, "Namespace")
    return namespace["metadata"]["name"]


@pytest.mark.parametrize("overlay", ALL_RENDERS)
def test_every_object_lives_in_the_overlays_namespace(overlay: str) -> None:
    docs = rendered(overlay)
    namespace = overlay_namespace(docs)
    if overlay in OVERLAYS:
        assert namespace == overlay_kustomization(overlay)["namespace"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{doc['kind']}/{doc['metadata']['name']}"


def test_overlays_use_distinct_namespaces_and_the_kind_scripts_agree() -> None:
    namespaces = {o: overlay_namespace(rendered(o)) for o in OVERLAYS}
    assert len(set(namespaces.values())) == len(OVERLAYS), namespaces
    lib = (DEPLOY / "kind" / "lib.sh").read_text()
    assert f'NAMESPACE="{namespaces["kind"]}"' in lib, "deploy/kind/lib.sh must use the kind overlay's namespace"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_experiment_config_is_experiments_yaml_resolved(overlay: str) -> None:
    """Kustomize reads no file outside an overlay, and a pod cannot follow a ``base:`` that lives
    elsewhere, so each overlay keeps its experiment resolved (``spiral config resolve NAME``).
    Editing the experiment, or any base of it, fails here until the overlay is regenerated."""
    generators = [g for g in overlay_kustomization(overlay).get("configMapGenerator", [])
                  if g["name"] == "spiral-experiment"]
    assert len(generators) == 1, f"{overlay}: needs one configMapGenerator named spiral-experiment"
    (entry,) = generators[0]["files"]
    key, _, filename = entry.partition("=")
    assert key == "experiment.yaml", "the pods read /etc/spiral/experiment.yaml"
    resolved = DEPLOY / "overlays" / overlay / filename
    original = ROOT / "experiments" / filename
    assert original.exists(), f"{resolved} must be named after an experiments/*.yaml file"
    regenerate = f"spiral config resolve {original.stem} > deploy/overlays/{overlay}/{filename}"
    assert "base" not in yaml.safe_load(resolved.read_text()), f"{resolved} must be resolved: {regenerate}"
    config = load_experiment(resolved)
    assert to_dict(config) == to_dict(load_experiment(original)), \
        f"{resolved} is not {original} resolved (the experiment or a base of it changed): {regenerate}"
    (cm,) = [c for c in by_kind(rendered(overlay), "ConfigMap") if c["metadata"]["name"].startswith("spiral-experiment-")]
    assert cm["data"]["experiment.yaml"] == resolved.read_text(), "the generated ConfigMap carries the config"
    assert config.name == original.stem


def test_experiment_configmap_name_is_hashed_so_a_config_change_rolls_the_pods() -> None:
    for overlay in OVERLAYS:
        docs = rendered(overlay)
        (cm,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("spiral-experiment")]
        assert re.fullmatch(r"spiral-experiment-[a-z0-9]{10}", cm["metadata"]["name"]), cm["metadata"]["name"]
        for workload in workloads(docs):
            volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
            assert volumes["experiment"]["configMap"]["name"] == cm["metadata"]["name"]


def actor_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (actor,) = [w for w in workloads(docs) if w["spec"]["template"]["metadata"]["labels"][
        "app.kubernetes.io/component"] == "actor"]
    return actor


def gpu_limit(container: dict[str, Any]) -> int:
    return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_hardware_replicas_and_images(overlay: str) -> None:
    docs = rendered(overlay)
    actor = actor_deployment(docs)
    learners = [w for w in workloads(docs) if w["metadata"]["name"] in ("spiral-learner", "spiral-discriminator")]
    assert len(learners) == 2
    images = {c["image"] for w in workloads(docs) for c in containers(w)}
    tags = {image.rpartition(":")[2] for image in images}
    if overlay == "kind":
        assert actor["spec"]["replicas"] == 2
        assert all(gpu_limit(c) == 0 for w in workloads(docs) for c in containers(w)), "kind is CPU only"
        assert all(t.endswith("-cpu") for t in tags), images
        assert not by_kind(docs, "PodMonitor"), "kind has no prometheus-operator"
        assert load_experiment(DEPLOY / "overlays" / "kind" / "tiny.yaml").name == "tiny"
        return
    assert actor["spec"]["replicas"] >= 32, "paper settings run many actors"
    for learner in learners:
        spec = learner["spec"]["template"]["spec"]
        assert gpu_limit(spec["containers"][0]) == 1, f"{overlay}: {learner['metadata']['name']} needs a GPU"
        assert spec["containers"][0]["image"].endswith("-cuda")
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert spec["nodeSelector"]
    assert all(gpu_limit(c) == 0 for c in containers(actor)), "actors render on CPU nodes"
    assert actor["spec"]["template"]["spec"]["containers"][0]["image"].endswith("-cpu")
    assert len({t.rsplit("-", 1)[0] for t in tags}) == 1, f"one release for every image: {images}"


GPU_COMPONENT = DEPLOY / "components" / "gpu"


def includes_gpu_component(directory: Path) -> bool:
    """Whether the kustomization in ``directory`` uses the ``gpu`` component, itself or through
    a base it builds on (``celeba-shared`` is ``celeba`` plus a component)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for entry in [*kustomization.get("components", []), *kustomization.get("resources", [])]:
        path = (directory / entry).resolve()
        if path == GPU_COMPONENT.resolve():
            return True
        if (path / "kustomization.yaml").exists() and includes_gpu_component(path):
            return True
    return False


def test_the_gpu_component_scan_sees_it_directly_and_through_a_base() -> None:
    overlays = DEPLOY / "overlays"
    assert includes_gpu_component(overlays / "mnist") and includes_gpu_component(overlays / "celeba-shared")
    assert not includes_gpu_component(overlays / "kind") and includes_gpu_component(_pbt_test_overlay())


def device_of(container: dict[str, Any]) -> str:
    """The torch device a container's learner trains on: ``SPIRAL_DEVICE``, else the default."""
    return env_of(container).get("SPIRAL_DEVICE") or DEFAULT_DEVICE


@pytest.mark.parametrize("overlay", ALL_RENDERS)
def test_learners_train_on_cuda_exactly_where_the_gpu_component_gives_them_a_gpu(overlay: str) -> None:
    docs = rendered(overlay)
    directory = _pbt_test_overlay() if overlay == "pbt-test" else DEPLOY / "overlays" / overlay
    expected = "cuda" if includes_gpu_component(directory) else "cpu"
    learners = 0
    for workload in workloads(docs):
        for container in containers(workload):
            role, device = role_of(container), device_of(container)
            where = f"{overlay}: {workload['metadata']['name']}/{container['name']}"
            if role in LEARNER_ROLES:
                learners += 1
                assert device == expected, f"{where} trains on {device}, expected {expected}"
                assert (gpu_limit(container) > 0) == (device == "cuda"), \
                    f"{where}: a GPU limit without training on it, or cuda without a GPU"
            else:
                assert "SPIRAL_DEVICE" not in env_of(container), f"{where}: `spiral {role}` has no device to choose"
    assert learners >= 2


def test_celeba_overlay_runs_the_papers_celeba_settings_with_its_dataset() -> None:
    docs = rendered("celeba")
    (cm,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("spiral-experiment")]
    config = yaml.safe_load(cm["data"]["experiment.yaml"])
    assert config["name"] == "celeba" and config["dataset"]["name"] == "celeba"
    (discriminator,) = [w for w in workloads(docs) if w["metadata"]["name"] == "spiral-discriminator"]
    mounts = {m["mountPath"]: m for m in discriminator["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    dataset_path = config["dataset"]["path"]
    assert any(dataset_path.startswith(path + "/") and mounts[path]["readOnly"] for path in mounts), \
        f"dataset.path {dataset_path} is not on a read-only mount of the discriminator"
    claims = {c["metadata"]["name"] for c in by_kind(docs, "PersistentVolumeClaim")}
    volumes = discriminator["spec"]["template"]["spec"]["volumes"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v} <= claims


# -- consistency with the code -------------------------------------------------------------------

@lru_cache(maxsize=1)
def env_vars_read_by_the_code() -> frozenset[str]:
    """``SPIRAL_*`` variables the package reads directly (besides the service options)."""
    pattern = re.compile(r"""environ(?:\.get|\.setdefault)?\s*[(\[]\s*["'](SPIRAL_[A-Z0-9_]+)["']""")
    found: set[str] = set()
    for package in ("spiral", "actor", "learner", "discriminator", "replaybuffer", "pbt_controller"):
        for path in (ROOT / package).rglob("*.py"):
            found.update(pattern.findall(path.read_text()))
    return frozenset(found)


def test_env_var_scan_finds_the_variables_the_code_reads() -> None:
    assert "SPIRAL_CACHE" in env_vars_read_by_the_code()  # spiral/config.py
    assert "SPIRAL_NO_SUCH_VARIABLE" not in env_vars_read_by_the_code()


@pytest.mark.parametrize("overlay", ALL_RENDERS)
def test_with_monitoring_every_workload_carries_the_scrape_annotations(overlay: str) -> None:
    """Components patch what exists when they run: monitoring must come after the components
    that add workloads (the PBT controller), or those pods go unannotated."""
    docs = rendered(overlay)
    if not by_kind(docs, "PodMonitor"):
        pytest.skip(f"{overlay} does not use the monitoring component")
    for workload in workloads(docs):
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", \
            f"{overlay}: {workload['metadata']['name']} lacks prometheus.io/scrape (component order?)"


@pytest.mark.parametrize("overlay", ALL_RENDERS)
def test_commands_env_vars_and_ports_match_the_code(overlay: str) -> None:
    docs = rendered(overlay)
    known_env = set(ENV_VARS.values()) | env_vars_read_by_the_code() | WELL_KNOWN_ENV
    configmaps = {c["metadata"]["name"]: c for c in by_kind(docs, "ConfigMap")}
    for workload in workloads(docs):
        for container in containers(workload):
            role = role_of(container)
            where = f"{overlay}: {workload['metadata']['name']}/{container['name']}"
            assert role in SUBCOMMANDS, f"{where}: `spiral {role}` is not a subcommand ({sorted(SUBCOMMANDS)})"
            assert role == workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            env = env_of(container)
            for source in container.get("envFrom", []):
                env.update(configmaps[source["configMapRef"]["name"]]["data"])
            unknown = set(env) - known_env
            assert not unknown, f"{where}: sets {sorted(unknown)}, which spiral does not read"
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            metrics_port = int(env.get("SPIRAL_METRICS_PORT") or DEFAULT_METRICS_PORT)
            assert ports.get("metrics") == metrics_port, f"{where}: metrics port"
            assert env.get("SPIRAL_METRICS_ADDRESS") == "0.0.0.0", \
                f"{where}: metrics bind 127.0.0.1 by default, unreachable for Prometheus"
            annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
            if "prometheus.io/port" in annotations:
                assert int(annotations["prometheus.io/port"]) == metrics_port
            if role in DEFAULT_PORTS:
                listen = env.get("SPIRAL_LISTEN")
                assert listen, f"{where}: a server must bind a pod address (SPIRAL_LISTEN=0.0.0.0:PORT)"
                host, _, port = listen.rpartition(":")
                assert host == "0.0.0.0" and int(port) == DEFAULT_PORTS[role] == ports.get("grpc"), \
                    f"{where}: SPIRAL_LISTEN={listen}, containerPort {ports.get('grpc')}, default {DEFAULT_PORTS[role]}"
            else:
                assert "grpc" not in ports, f"{where}: `spiral {role}` serves no gRPC"
            if role == "actor":
                assert container["env"][[e["name"] for e in container["env"]].index("SPIRAL_ACTOR_ID")][
                    "valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "the pod name is the actor id"


@pytest.mark.parametrize("overlay", ALL_RENDERS)
def test_peer_addresses_name_services_and_their_ports(overlay: str) -> None:
    docs = rendered(overlay)
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    (peers,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("spiral-peers")]
    role_of_variable = {"SPIRAL_LEARNER_ADDRESS": "learner", "SPIRAL_DISCRIMINATOR_ADDRESS": "discriminator",
                        "SPIRAL_REPLAY_ADDRESS": "replaybuffer", "SPIRAL_PBT_ADDRESS": "pbt-controller"}
    assert {"SPIRAL_LEARNER_ADDRESS", "SPIRAL_DISCRIMINATOR_ADDRESS", "SPIRAL_REPLAY_ADDRESS"} <= set(peers["data"])
    for variable, address in peers["data"].items():
        host, _, port = address.rpartition(":")
        if "{member}" in host:
            # A population: member i's pod of a StatefulSet, through its headless Service.
            pod, _, host = host.partition(".")
            assert pod == f"{host}-{{member}}", f"{variable}={address}: expected {host}-{{member}}.{host}"
            assert services.get(host, {}).get("spec", {}).get("clusterIP") == "None", \
                f"{variable}={address}: {host} must be a headless Service"
        elif "." in host:
            # One fixed pod of a StatefulSet (the population discriminator: ordinal 0 for every member).
            pod, _, host = host.partition(".")
            assert re.fullmatch(rf"{re.escape(host)}-\d+", pod), f"{variable}={address}: expected {host}-N.{host}"
            assert services.get(host, {}).get("spec", {}).get("clusterIP") == "None", \
                f"{variable}={address}: {host} must be a headless Service"
            (sts,) = [d for d in by_kind(docs, "StatefulSet") if d["spec"]["serviceName"] == host]
            assert int(pod.rpartition("-")[2]) < sts["spec"]["replicas"], f"{variable}={address}: no such replica"
        assert host in services, f"{variable}={address}: no Service {host!r}"
        service = services[host]
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == role_of_variable[variable]
        grpc_ports = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc_ports == [int(port)] == [DEFAULT_PORTS[role_of_variable[variable]]], f"{variable}={address}"


# -- PromQL: metrics and syntax -----------------------------------------------------------------

def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every query in the dashboards, template variables included."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append((where, value))
                elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                    found.append((where, value["query"]))
                else:
                    walk(value, f"{where}/{node.get('title', key)}" if key == "targets" else where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for path in DASHBOARDS:
        walk(json.loads(path.read_text()), path.name)
    return found


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as plain PromQL: Grafana's variables replaced by example values."""
    expr = re.sub(r"^label_values\((\w+),\s*\w+\)$", r"\1", expr.strip())
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?(\w+)\}?", r"example", expr)


def metric_names_in(expr: str) -> set[str]:
    """Series names a PromQL expression selects (functions, keywords and label names removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)               # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)                          # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                         # range and subquery windows
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", expr):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_KEYWORDS or re.fullmatch(r"\d+[smhdwy]", name):
            continue
        names.add(name)
    return names


def recorded_series() -> set[str]:
    """The series the monitoring component's recording rules make (``spiral:...``)."""
    return {r["record"] for r in alert_rules() if "record" in r}


def unknown_metrics(names: set[str]) -> set[str]:
    known = metric_names() | recorded_series()
    return {n for n in names if n not in known and n != "up" and not n.startswith(EXTERNAL_SERIES_PREFIXES)}


def test_metric_extraction_and_lookup_can_fail() -> None:
    expr = ('histogram_quantile(0.95, sum by (namespace, le) (rate(spiral_actor_render_seconds_bucket'
            '{namespace=~"a"}[5m]))) / on (namespace) group_left sum(spiral_no_such_metric) and up == 0')
    assert metric_names_in(expr) == {"spiral_actor_render_seconds_bucket", "spiral_no_such_metric", "up"}
    assert unknown_metrics(metric_names_in(expr)) == {"spiral_no_such_metric"}


def test_every_metric_in_dashboards_and_alerts_is_exported_by_the_code() -> None:
    exprs = dashboard_exprs() + [(f"alert {r.get('alert', r.get('record'))}", r["expr"]) for r in alert_rules()]
    assert len(exprs) > 20
    for where, expr in exprs:
        names = metric_names_in(grafana_to_promql(expr))
        assert names, f"{where}: no metric found in {expr!r}"
        assert not unknown_metrics(names), f"{where}: {sorted(unknown_metrics(names))} not in spiral.runtime.metrics"


def test_dashboards_cover_the_issues_panels() -> None:
    used = set().union(*(metric_names_in(grafana_to_promql(e)) for _, e in dashboard_exprs()))
    required = {
        "spiral_actor_env_steps_total", "spiral_learner_frames_total", "spiral_learner_updates_total",
        "spiral_actor_policy_lag_versions", "spiral_replay_inserts_total", "spiral_replay_samples_total",
        "spiral_replay_size_items", "spiral_replay_capacity_items", "spiral_discriminator_score",
        "spiral_actor_render_seconds_bucket", "spiral_grpc_server_handling_seconds_bucket",
        "spiral_grpc_server_handled_total", "process_cpu_seconds_total", "DCGM_FI_DEV_GPU_UTIL",
    }
    assert not required - used, f"dashboards lack {sorted(required - used)}"
    per_actor = [e for _, e in dashboard_exprs() if "spiral_actor_env_steps_total" in e and "by (actor)" in e]
    assert per_actor, "env steps/s per actor"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `make deps` installs Debian's prometheus package")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_every_promql_expression_parses(tmp_path: Path) -> None:
    doc = yaml.safe_load((DEPLOY / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    dashboards = [{"record": f"spiral:dashboard_query_{i}", "expr": grafana_to_promql(expr)}
                  for i, (_, expr) in enumerate(dashboard_exprs())]
    (tmp_path / "dashboards.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": dashboards}]}))
    result = promtool("check", "rules", "alerts.yaml", "dashboards.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(
        {"groups": [{"name": "b", "rules": [{"record": "x:y", "expr": "sum by (a (rate(m[5m]))"}]}]}))
    assert promtool("check", "rules", "broken.yaml", cwd=tmp_path).returncode != 0, "promtool must reject bad PromQL"


def test_alerts_fire_on_the_situations_they_describe(tmp_path: Path) -> None:
    """``promtool test rules``: each alert fires on a synthetic series that shows its situation,
    and stays quiet on a healthy one."""
    doc = yaml.safe_load((DEPLOY / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    ns = 'namespace="spiral"'
    rules = {r["alert"]: r for r in alert_rules() if "alert" in r}

    def expected(alert: str, labels: dict[str, str], value: str) -> dict[str, Any]:
        """The alert with its annotations expanded (promtool compares them too)."""
        def expand(template: str) -> str:
            text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], template)
            return re.sub(r"\{\{\s*\$value[^}]*\}\}", value, text)
        return {"exp_labels": labels, "exp_annotations": {k: expand(v) for k, v in rules[alert]["annotations"].items()}}

    tests = {
        "rule_files": ["alerts.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {   # stalled learner, starved replay, down actors, high lag
                "interval": "1m",
                "input_series": [
                    {"series": f'up{{{ns}, component="actor", pod="a1"}}', "values": "1x5 0x40"},
                    {"series": f'up{{{ns}, component="actor", pod="a2"}}', "values": "1x5 0x40"},
                    {"series": f'up{{{ns}, component="actor", pod="a3"}}', "values": "1x45"},
                    {"series": f'up{{{ns}, component="learner", pod="l"}}', "values": "1x45"},
                    {"series": f'spiral_learner_updates_total{{{ns}, member="0"}}', "values": "0+10x5 50x40"},
                    {"series": f'spiral_replay_inserts_total{{{ns}, member="0"}}', "values": "0+10x5 50x40"},
                    {"series": f'spiral_actor_policy_lag_versions{{{ns}, member="0", actor="a"}}', "values": "200x45"},
                ],
                "alert_rule_test": [
                    {"eval_time": "40m", "alertname": "SpiralActorsDown",
                     "exp_alerts": [expected("SpiralActorsDown", {"severity": "warning", "namespace": "spiral"},
                                             "66.67%")]},
                    {"eval_time": "40m", "alertname": "SpiralLearnerStalled",
                     "exp_alerts": [expected("SpiralLearnerStalled",
                                             {"severity": "critical", "namespace": "spiral", "member": "0"}, "")]},
                    {"eval_time": "40m", "alertname": "SpiralReplayStarved",
                     "exp_alerts": [expected("SpiralReplayStarved",
                                             {"severity": "warning", "namespace": "spiral", "member": "0"}, "")]},
                    {"eval_time": "40m", "alertname": "SpiralPolicyLagHigh",
                     "exp_alerts": [expected("SpiralPolicyLagHigh",
                                             {"severity": "warning", "namespace": "spiral", "member": "0"}, "200")]},
                ],
            },
            {   # healthy system: nothing fires
                "interval": "1m",
                "input_series": [
                    {"series": f'up{{{ns}, component="actor", pod="a1"}}', "values": "1x45"},
                    {"series": f'up{{{ns}, component="learner", pod="l"}}', "values": "1x45"},
                    {"series": f'spiral_learner_updates_total{{{ns}, member="0"}}', "values": "0+10x45"},
                    {"series": f'spiral_replay_inserts_total{{{ns}, member="0"}}', "values": "0+10x45"},
                    {"series": f'spiral_actor_policy_lag_versions{{{ns}, member="0", actor="a"}}', "values": "2x45"},
                ],
                "alert_rule_test": [{"eval_time": "40m", "alertname": name, "exp_alerts": []} for name in
                                    ("SpiralActorsDown", "SpiralLearnerStalled", "SpiralReplayStarved",
                                     "SpiralPolicyLagHigh")],
            },
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    result = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- policy (kube-linter-like) ------------------------------------------------------------------

@pytest.mark.parametrize("overlay", ALL_RENDERS)
def test_workload_policy(overlay: str) -> None:
    check_workload_policy(overlay, rendered(overlay))


def check_workload_policy(overlay: str, docs: list[dict[str, Any]]) -> None:
    """kube-linter-like checks of every Deployment and StatefulSet (AssertionError naming the problem)."""
    accounts = {a["metadata"]["name"]: a for a in by_kind(docs, "ServiceAccount")}
    for workload in workloads(docs):
        name = f"{overlay}: {workload['kind']}/{workload['metadata']['name']}"
        template = workload["spec"]["template"]
        labels = template["metadata"]["labels"]
        component = labels.get("app.kubernetes.io/component")
        assert REQUIRED_LABELS <= set(workload["metadata"]["labels"]), f"{name}: object labels"
        assert REQUIRED_LABELS <= set(labels), f"{name}: pod labels {labels}"
        selector = workload["spec"]["selector"]["matchLabels"]
        assert set(selector) == REQUIRED_SELECTOR_KEYS and selects(selector, labels), f"{name}: selector {selector}"
        assert not workload["spec"]["selector"].get("matchExpressions")
        spec = template["spec"]
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True and pod_security.get("runAsUser") == RUN_AS_USER
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        account = spec.get("serviceAccountName")
        assert account in accounts and account != "default", f"{name}: dedicated ServiceAccount, got {account!r}"
        uses_api = component in API_USERS
        assert spec.get("automountServiceAccountToken") is uses_api, f"{name}: token only where the API is used"
        assert accounts[account].get("automountServiceAccountToken") is uses_api
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in containers(workload):
            where = f"{name}/{container['name']}"
            image = container["image"]
            repository, _, tag = image.rpartition(":")
            assert repository and "/" not in tag and tag and tag != "latest", f"{where}: image {image!r} needs a tag"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{where}: {probe} missing"
            requests = container.get("resources", {}).get("requests", {})
            assert "cpu" in requests and "memory" in requests, f"{where}: cpu and memory requests"
            assert "memory" in container["resources"].get("limits", {}), f"{where}: memory limit"
            security = container.get("securityContext", {})
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not security.get("privileged"), where
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp must be an emptyDir"
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container[probe_name]
                if component in DEFAULT_PORTS:
                    assert probe.get("grpc", {}).get("port") == ports["grpc"], \
                        f"{where}: {probe_name} must be a native gRPC probe on the health service"
                else:
                    port = probe["httpGet"]["port"]
                    assert port in ports or port in ports.values(), f"{where}: {probe_name} port {port!r}"
        if workload["kind"] == "StatefulSet":
            claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
            assert "run" in claims, f"{name}: checkpoints need a persistent volume"
            assert workload["spec"]["serviceName"] in {s["metadata"]["name"] for s in by_kind(docs, "Service")}


@pytest.mark.parametrize("image, problem", [("spiral:latest", "needs a tag"), ("spiral", "needs a tag")])
def test_policy_check_catches_a_bad_image(image: str, problem: str) -> None:
    docs = rendered("kind")
    actor_deployment(docs)["spec"]["template"]["spec"]["containers"][0]["image"] = image
    with pytest.raises(AssertionError, match=problem):
        check_workload_policy("kind", docs)


def test_policy_check_catches_a_missing_probe_and_a_root_user() -> None:
    docs = rendered("kind")
    del actor_deployment(docs)["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    with pytest.raises(AssertionError, match="livenessProbe missing"):
        check_workload_policy("kind", docs)
    docs = rendered("kind")
    actor_deployment(docs)["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0
    with pytest.raises(AssertionError):
        check_workload_policy("kind", docs)


@pytest.mark.parametrize("overlay", ALL_RENDERS)
def test_services_pdb_and_network_policies(overlay: str) -> None:
    docs = rendered(overlay)
    pods = [w["spec"]["template"] for w in workloads(docs)]
    for service in by_kind(docs, "Service"):
        selector = service["spec"]["selector"]
        assert set(selector) == REQUIRED_SELECTOR_KEYS, f"Service {service['metadata']['name']}: selector {selector}"
        matching = [p for p in pods if selects(selector, p["metadata"]["labels"])]
        assert matching, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            names = {cp["name"]: cp["containerPort"] for p in matching for c in p["spec"]["containers"]
                     for cp in c.get("ports", [])}
            assert port["targetPort"] in names and names[port["targetPort"]] == port["port"], \
                f"Service {service['metadata']['name']} port {port}"

    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    actor = actor_deployment(docs)
    assert pdb["spec"]["selector"]["matchLabels"] == actor["spec"]["selector"]["matchLabels"]
    assert [p for p in pods if selects(pdb["spec"]["selector"]["matchLabels"], p["metadata"]["labels"])] == \
        [actor["spec"]["template"]]

    policies = by_kind(docs, "NetworkPolicy")
    for pod in pods:
        covering = [p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"])]
        assert covering, f"pod {pod['metadata']['labels']} is not covered by a NetworkPolicy"
    grpc_rules = [rule for p in policies for rule in p["spec"]["ingress"]
                  if any(port["port"] == "grpc" for port in rule.get("ports", []))]
    assert grpc_rules
    for rule in grpc_rules:
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"gRPC admitted from outside the namespace: {peer}"
            assert peer["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "spiral"
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            assert rule.get("ports"), f"{policy['metadata']['name']}: an ingress rule without ports admits everything"
            assert rule.get("from"), f"{policy['metadata']['name']}: an ingress rule without peers admits everyone"
            for port in rule["ports"]:
                assert port["port"] in ("grpc", "metrics")
                if port["port"] == "metrics":
                    assert all("namespaceSelector" in peer or "podSelector" in peer for peer in rule["from"])


def test_the_artifacts_component_sends_from_the_learners_and_the_controller_only() -> None:
    """components/artifacts-s3: SPIRAL_ARTIFACT_URI and SPIRAL_RUN_NAME reach the two learners and
    the PBT controller (from one hashed ConfigMap), an IRSA role annotates their service accounts,
    and neither actors nor replay buffers get either."""
    docs = rendered("pbt-test")
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    artifacts = next(m for name, m in maps.items() if name.startswith("spiral-artifacts"))
    assert artifacts["data"]["SPIRAL_ARTIFACT_URI"].startswith("s3://")
    assert artifacts["data"]["SPIRAL_RUN_NAME"]
    senders = set()
    for workload in workloads(docs):
        container = workload["spec"]["template"]["spec"]["containers"][0]
        refs = {e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e}
        if artifacts["metadata"]["name"] in refs:
            senders.add(role_of(container))
    assert senders == {"learner", "discriminator", "pbt-controller"}
    accounts = {d["metadata"]["name"]: d.get("metadata", {}).get("annotations", {}) for d in docs
                if d["kind"] == "ServiceAccount"}
    annotated = {name for name, notes in accounts.items() if "eks.amazonaws.com/role-arn" in notes}
    assert annotated == {"spiral-learner", "spiral-discriminator", "spiral-pbt-controller"}


def test_only_the_pbt_controller_reads_the_api_and_its_role_is_read_only() -> None:
    docs = rendered("pbt-test")
    roles = by_kind(docs, "Role")
    assert [r["metadata"]["name"] for r in roles] == ["spiral-pbt-controller"]
    for rule in roles[0]["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
        assert "secrets" not in rule["resources"]
    (binding,) = by_kind(docs, "RoleBinding")
    assert binding["subjects"][0]["name"] == "spiral-pbt-controller"
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    for overlay in OVERLAYS:
        population = yaml.safe_load(experiment_copy(overlay).read_text()).get("pbt", {}).get("population_size", 1)
        docs = rendered(overlay)
        assert bool(by_kind(docs, "Role")) == (population > 1), \
            f"{overlay}: the PBT controller (and its Role) belongs exactly to overlays with a population"
        if population > 1:
            (disc,) = [d for d in by_kind(docs, "StatefulSet") if d["metadata"]["name"] == "spiral-discriminator"]
            # components/population-discriminator: one discriminator and replay buffer for all members.
            disc_env = env_of(disc["spec"]["template"]["spec"]["containers"][0])
            shared = disc_env.get("SPIRAL_SHARED_DISCRIMINATOR") == "true"
            for name in ("spiral-learner", "spiral-discriminator", "spiral-replaybuffer"):
                (sts,) = [d for d in by_kind(docs, "StatefulSet") if d["metadata"]["name"] == name]
                expected = 1 if shared and name != "spiral-learner" else population
                assert sts["spec"]["replicas"] == expected, \
                    f"{overlay}: {name} replicas {sts['spec']['replicas']}, expected {expected} (population " \
                    f"{population}{', shared discriminator' if shared else ''})"
                env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
                assert env["SPIRAL_MEMBER"]["valueFrom"]["fieldRef"]["fieldPath"] == \
                    "metadata.labels['apps.kubernetes.io/pod-index']", f"{overlay}: {name} member from ordinal"


def test_population_discriminator_overlay_shares_one_discriminator_and_replay_buffer() -> None:
    """celeba-shared (components/population-discriminator): 12 learners, one D, one replay buffer."""
    from pbt_controller.discovery import DEFAULT_DISCRIMINATOR, DEFAULT_REPLAY
    from spiral.runtime.service_options import parse_switch

    docs = rendered("celeba-shared")
    (peers,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("spiral-peers")]
    data = peers["data"]
    assert "{member}" in data["SPIRAL_LEARNER_ADDRESS"], "each member keeps its own learner"
    # The addresses the pods use are the ones the controller hands out (ordinal 0 for every member).
    assert data["SPIRAL_DISCRIMINATOR_ADDRESS"] == \
        f"{DEFAULT_DISCRIMINATOR.name}-0.{DEFAULT_DISCRIMINATOR.name}:{DEFAULT_DISCRIMINATOR.port}"
    assert data["SPIRAL_REPLAY_ADDRESS"] == f"{DEFAULT_REPLAY.name}-0.{DEFAULT_REPLAY.name}:{DEFAULT_REPLAY.port}"
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in by_kind(docs, "StatefulSet")}
    population = load_experiment(experiment_copy("celeba-shared")).pbt.population_size
    assert replicas == {"spiral-learner": population, "spiral-discriminator": 1, "spiral-replaybuffer": 1}
    assert by_kind(docs, "Role"), "a population needs the PBT controller"
    for workload in workloads(docs):
        for container in containers(workload):
            switch = env_of(container).get("SPIRAL_SHARED_DISCRIMINATOR")
            assert parse_switch(switch, "SPIRAL_SHARED_DISCRIMINATOR") is True, \
                f"{workload['metadata']['name']}: every spiral process must know the discriminator is shared"


# -- image --------------------------------------------------------------------------------------

def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = match.group(1)
            stages[current] = []
        stages[current].append(line)
    return stages


def test_dockerfile_is_multi_stage_non_root_and_pinned() -> None:
    stages = dockerfile_stages()
    assert list(stages)[1:] == ["build", "runtime"], list(stages)
    base = [line for line in stages[""] if line.startswith("ARG PYTHON_IMAGE=")]
    assert base and re.fullmatch(r"ARG PYTHON_IMAGE=python:3\.\d+\.\d+-slim-\w+", base[0]), base
    runtime = stages["runtime"]
    assert runtime[-1].startswith("CMD") or runtime[-1].startswith("ENTRYPOINT")
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users == [f"{RUN_AS_USER}:{RUN_AS_USER}"], "a numeric non-root user Kubernetes can verify"
    installs = " ".join(line for line in runtime if "apt-get install" in line)
    for tool in ("build-essential", "gcc", "g++", "make ", "pkg-config", "-dev "):
        assert tool not in installs + " ", f"runtime stage installs build tool {tool.strip()!r}"
    for package in ("libmypaint", "mypaint-brushes", "libegl", "libosmesa6"):
        assert package in installs, f"runtime stage lacks {package}"
    assert any(line.startswith("COPY --from=build /opt/venv") for line in runtime)
    build = " ".join(stages["build"])
    assert "VARIANT" in build and "cpu)" in build and "cuda)" in build
    assert ":latest" not in (ROOT / "Dockerfile").read_text()


def test_dockerfile_copies_only_what_exists_and_the_dockerignore_admits() -> None:
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for stage in dockerfile_stages().values():
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    if "[" in source:  # an optional source (build/wheelhous[e]): may match nothing
                        source = re.sub(r"\[(\w)\]", r"\1", source)
                    else:
                        assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
                    assert source.rstrip("/") in allowed, f".dockerignore excludes {source}"
    packages = re.search(r'include = \[([^\]]*)\]', (ROOT / "pyproject.toml").read_text()).group(1)
    for package in re.findall(r'"(\w+)\*"', packages):
        assert package in allowed, f"package {package} is not copied into the image"


def test_runtime_packages_exist_in_debian() -> None:
    if shutil.which("apt-cache") is None:
        pytest.skip("apt-cache is not available to look the runtime packages up")
    runtime = " ".join(dockerfile_stages()["runtime"])
    packages = re.search(r"--no-install-recommends\s+(.*?)\s+&&", runtime).group(1).split()
    result = subprocess.run(["apt-cache", "show", "--no-all-versions", *packages], capture_output=True, text=True)
    if "No packages found" in result.stderr and not result.stdout:
        pytest.skip("the apt package lists are empty on this machine")
    found = set(re.findall(r"^Package: (\S+)", result.stdout, re.MULTILINE))
    assert set(packages) <= found, f"not in this machine's Debian: {sorted(set(packages) - found)}"


# -- kind scripts -------------------------------------------------------------------------------

def test_kind_scripts_parse_and_stop_with_a_clear_message_without_their_tools(tmp_path: Path) -> None:
    for script in sorted((DEPLOY / "kind").glob("*.sh")):
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script.name}: {check.stderr}"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "basename", "cat", "date", "printf"):
        path = shutil.which(tool)
        if path:
            (bin_dir / tool).symlink_to(path)
    for target in ("kind-up", "kind-test", "kind-down"):
        result = subprocess.run(["bash", str(DEPLOY / "kind" / f"{target}.sh")], capture_output=True, text=True,
                                env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, timeout=60)
        assert result.returncode != 0, f"{target}.sh must fail without docker/kind"
        assert "is not installed" in result.stderr and ("kind" in result.stderr or "docker" in result.stderr), \
            result.stderr
    makefile = (ROOT / "Makefile").read_text()
    for target in ("kind-up", "kind-test", "kind-down"):
        assert re.search(rf"^{target}:.*\n\t.*deploy/kind/{target}\.sh", makefile, re.MULTILINE), \
            f"make {target} must run deploy/kind/{target}.sh"


def test_kind_cluster_runs_the_validated_kubernetes_version() -> None:
    cluster = yaml.safe_load((DEPLOY / "kind" / "cluster.yaml").read_text())
    image = cluster["nodes"][0]["image"]
    assert re.fullmatch(r"kindest/node:v\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", image), image
    assert image.split(":v")[1].split(".")[:2] == K8S_VERSION.split(".")[:2]


def kubernetes_api_calls() -> set[tuple[str, str]]:
    """``(verb, resource)`` of every call on the controller's ``api`` (its CoreV1Api), e.g. ("list", "pods")."""
    calls = set()
    for path in (ROOT / "pbt_controller").glob("*.py"):
        for verb, scope, kind in re.findall(r"\bapi\.(list|read|watch|create|patch|delete)_(namespaced_)?(\w+?)\(",
                                            path.read_text()):
            calls.add((verb if verb != "read" else "get", kind if kind.endswith("s") else kind + "s"))
    return calls


def test_the_controllers_role_grants_exactly_the_api_calls_it_makes() -> None:
    calls = kubernetes_api_calls()
    assert ("list", "pods") in calls, "the scan must find discovery's list_namespaced_pod"
    docs = rendered("pbt-test")
    [role] = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == "spiral-pbt-controller"]
    granted = {(verb, resource) for rule in role["rules"] for verb in rule["verbs"] for resource in rule["resources"]}
    assert all(rule["apiGroups"] == [""] for rule in role["rules"])
    assert granted == calls, f"least privilege: the Role grants {sorted(granted)}, the code calls {sorted(calls)}"
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
