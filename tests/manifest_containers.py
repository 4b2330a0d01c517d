"""Rendered Kubernetes manifests run as Docker containers: the manifests are what runs.

Without a Kubernetes API server or kind, :class:`ManifestCluster` turns the objects of
``kubectl kustomize OVERLAY`` into containers of their image, the way a kubelet would start
their pods:

* every Deployment and StatefulSet replica becomes a container (StatefulSet pods are
  ``NAME-0``, ``NAME-1``...; Deployment pods ``NAME-HASH-XXXXX``), with the manifest's command,
  args and env (``value``, ``fieldRef`` to the pod's name and namespace, ``envFrom`` ConfigMaps
  and Secrets resolved);
* ConfigMap volumes are mounted as files (read-only), emptyDirs are Docker volumes that live as
  long as the pod, and a StatefulSet's ``volumeClaimTemplates`` are Docker volumes named after
  the claim and the pod, which outlive the container (a restarted pod finds its data);
* the securityContext's user and group, ``fsGroup`` (the volumes are given to that group),
  read-only root filesystem, dropped capabilities and ``allowPrivilegeEscalation: false``;
* the containers share one user-defined Docker network on which each answers to the DNS names
  Kubernetes would give it, as network aliases: for every Service that selects the pod,
  ``SERVICE``, ``SERVICE.NAMESPACE``, ``SERVICE.NAMESPACE.svc`` and
  ``SERVICE.NAMESPACE.svc.cluster.local``, and for a StatefulSet pod
  ``POD.SERVICE[.NAMESPACE[.svc[.cluster.local]]]``. Nothing in the manifests is rewritten;
* every container port is published on 127.0.0.1 only (for the probes and the test's scrapes);
* the declared startup, readiness and liveness probes (HTTP GET and gRPC health) run as the
  kubelet runs them, on their periods and thresholds, and every failure is recorded
  (:meth:`ManifestCluster.probe_failures`); a liveness probe past its ``failureThreshold``
  is reported as such (this harness reports it and does not restart the container for it);
* resources as the kubelet maps them to cgroups: ``limits.cpu`` to a CFS quota (``--cpus``),
  ``limits.memory`` to the memory cgroup's limit (``--memory``, no swap beyond it), and
  ``requests.cpu`` (the limit when no request is given, as the API server defaults it) to CPU
  shares (``--cpu-shares``, 1024 per core, at least 2). ``requests.memory`` only schedules, and
  has no cgroup counterpart. Each container's cgroup files are read back from inside it after
  it starts, and a limit that did not take effect fails the harness (:class:`ResourcesNotApplied`);
* the pods' restart policy (``Always``, the only one a Deployment or StatefulSet allows): a
  container that exits is started again with the kubelet's back-off (at once, then 10 s, 20 s,
  40 s... capped at 300 s, and reset once it has run for 10 minutes), and each pod keeps its
  restart count and last termination (``OOMKilled`` when the kernel killed it over its memory
  limit, ``Error`` or ``Completed`` otherwise), as ``kubectl get pods`` shows them
  (:meth:`ManifestCluster.restarts`, :meth:`ManifestCluster.last_termination`).

NetworkPolicies, PodDisruptionBudgets and ServiceAccounts have no Docker counterpart and are
skipped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import shutil
import string
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WORKLOADS = ("StatefulSet", "Deployment")
SKIPPED_KINDS = ("Namespace", "ServiceAccount", "NetworkPolicy", "PodDisruptionBudget", "PodMonitor",
                 "PrometheusRule", "Role", "RoleBinding")
BACKOFF_FIRST_S, BACKOFF_CAP_S, BACKOFF_RESET_AFTER_S = 10.0, 300.0, 600.0
"""The kubelet's crash-loop back-off: the first restart at once, then 10 s doubling to 300 s; a
container that ran 10 minutes before it exited starts over."""
CFS_PERIOD_US = 100_000

_MEMORY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "K": 10**3, "M": 10**6,
                    "G": 10**9, "T": 10**12}


class ResourcesNotApplied(RuntimeError):
    """A container's cgroup does not hold the limit its manifest asked for."""


def cpu_cores(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity (``"200m"``, ``"1.5"``, ``2``) in cores."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity: str | int) -> int:
    """A Kubernetes memory quantity (``"512Mi"``, ``"1G"``, ``"1e9"``, ``1024``) in bytes."""
    text = str(quantity)
    for suffix in sorted(_MEMORY_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * _MEMORY_SUFFIXES[suffix])
    return int(float(text))


@dataclass(frozen=True)
class CgroupLimits:
    """What the kubelet would write into a container's cgroups for its ``resources``."""

    cpu_quota_us: int | None = None
    """CFS quota per 100 ms period (None: unlimited)."""
    cpu_shares: int | None = None
    memory_bytes: int | None = None

    @classmethod
    def of(cls, resources: dict[str, Any]) -> CgroupLimits:
        limits, requests = resources.get("limits", {}), resources.get("requests", {})
        request = requests.get("cpu", limits.get("cpu"))  # the API server defaults a request to its limit
        return cls(cpu_quota_us=round(cpu_cores(limits["cpu"]) * CFS_PERIOD_US) if "cpu" in limits else None,
                   cpu_shares=max(2, int(cpu_cores(request) * 1024)) if request is not None else None,
                   memory_bytes=memory_bytes(limits["memory"]) if "memory" in limits else None)

    def docker_args(self) -> list[str]:
        args: list[str] = []
        if self.cpu_quota_us is not None:
            args += ["--cpu-period", str(CFS_PERIOD_US), "--cpu-quota", str(self.cpu_quota_us)]
        if self.cpu_shares is not None:
            args += ["--cpu-shares", str(self.cpu_shares)]
        if self.memory_bytes is not None:
            args += ["--memory", str(self.memory_bytes), "--memory-swap", str(self.memory_bytes)]
        return args


# Read inside the container (cgroup v1, as on this host; v2's files as the fallback).
_READ_CGROUPS = """
import pathlib
def first(*paths):
    for path in paths:
        p = pathlib.Path(path)
        if p.exists():
            return p.read_text().split()
    return ["?"]
quota, period = first("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us")[0], \
    first("/sys/fs/cgroup/cpu/cpu.cfs_period_us", "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us")[0]
if quota == "?":
    v2 = first("/sys/fs/cgroup/cpu.max")
    quota, period = (v2 + ["?"])[:2]
shares = first("/sys/fs/cgroup/cpu/cpu.shares", "/sys/fs/cgroup/cpu,cpuacct/cpu.shares")[0]
memory = first("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max")[0]
print(quota, period, shares, memory)
"""


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])}... failed: {result.stderr.strip()}")
    return result


def render(overlay: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize OVERLAY`` as objects."""
    import yaml

    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@dataclass
class ProbeState:
    """What the kubelet knows of one probe of one container."""

    kind: str
    spec: dict[str, Any]
    succeeded: bool = False
    consecutive_failures: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class Pod:
    """One replica: its container, volumes, names on the network and published ports."""

    name: str
    workload: dict[str, Any]
    index: int
    container_name: str
    volumes: dict[str, str]
    """Pod volume name -> Docker volume (or host directory for ConfigMaps)."""
    aliases: list[str]
    host_ports: dict[int, int] = field(default_factory=dict)
    """Container port -> published 127.0.0.1 port."""
    probes: dict[str, ProbeState] = field(default_factory=dict)
    started_at: float = 0.0
    limits: CgroupLimits = field(default_factory=CgroupLimits)
    restarts: int = 0
    """Times the harness started the container again after it exited (the pod's restart count)."""
    last_termination: dict[str, Any] | None = None
    """The last exit: ``reason`` (OOMKilled, Error, Completed), ``exit_code``, ``ran_s``."""
    restart_at: float | None = None
    """When the back-off lets the exited container start again (None: it is running)."""
    backoff_s: float = 0.0

    @property
    def spec(self) -> dict[str, Any]:
        return self.workload["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        return self.spec["containers"][0]

    def port(self, ref: int | str) -> int:
        """A probe's port (a number, or a container port's name) as the published host port."""
        if isinstance(ref, str):
            ref = next(p["containerPort"] for p in self.container.get("ports", []) if p.get("name") == ref)
        return self.host_ports[int(ref)]


class ManifestCluster:
    """The workloads of rendered manifests as containers (see the module docstring).

    Args:
        objects: The rendered objects (:func:`render`).
        image: Run this image instead of the manifests' (None: as declared).
        prefix: Names of the network, containers and volumes start with it.
    """

    def __init__(self, objects: list[dict[str, Any]], image: str | None = None, prefix: str | None = None) -> None:
        self.objects = objects
        self.image = image
        self.prefix = prefix or f"spiral-h-{uuid.uuid4().hex[:6]}"
        self.network = f"{self.prefix}-net"
        self.namespace = next((o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"), "default")
        self.configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
        self.secrets = {o["metadata"]["name"]: {**{k: base64.b64decode(v).decode() for k, v in o.get("data", {}).items()},
                                                **o.get("stringData", {})}
                        for o in objects if o["kind"] == "Secret"}
        self.services = [o for o in objects if o["kind"] == "Service"]
        self.workloads = {o["metadata"]["name"]: o for o in objects if o["kind"] in WORKLOADS}
        self.pods: dict[str, Pod] = {}
        self._files = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-configmaps-"))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._prober: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self.ignored: list[str] = []
        for obj in objects:
            if obj["kind"] not in (*WORKLOADS, "ConfigMap", "Secret", "Service", *SKIPPED_KINDS):
                raise ValueError(f"{obj['kind']} {obj['metadata']['name']}: the harness cannot run it")
        self._check_services()

    # -- names -------------------------------------------------------------------------------

    def _check_services(self) -> None:
        for service in self.services:
            for port in service["spec"].get("ports", []):
                target = port.get("targetPort", port["port"])
                if isinstance(target, int) and target != port["port"]:
                    raise ValueError(f"Service {service['metadata']['name']} maps port {port['port']} to {target}: "
                                     "network aliases cannot translate ports")

    def _aliases(self, workload: dict[str, Any], pod: str) -> list[str]:
        ns = self.namespace
        names: list[str] = []
        labels = workload["spec"]["template"]["metadata"].get("labels", {})
        for service in self.services:
            selector = service["spec"].get("selector") or {}
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                svc = service["metadata"]["name"]
                names += [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"]
        if workload["kind"] == "StatefulSet":
            governing = workload["spec"]["serviceName"]
            names += [f"{pod}.{governing}", f"{pod}.{governing}.{ns}", f"{pod}.{governing}.{ns}.svc",
                      f"{pod}.{governing}.{ns}.svc.cluster.local"]
        return names

    def _pod_name(self, workload: dict[str, Any], index: int) -> str:
        name = workload["metadata"]["name"]
        if workload["kind"] == "StatefulSet":
            return f"{name}-{index}"
        template = json.dumps(workload["spec"]["template"], sort_keys=True).encode()
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        return f"{name}-{hashlib.sha256(template).hexdigest()[:10]}-{suffix}"

    # -- lifecycle ---------------------------------------------------------------------------

    def up(self) -> None:
        """Create the network and start every replica (StatefulSets first), then the prober."""
        docker("network", "create", self.network)
        for kind in WORKLOADS:
            for workload in self.workloads.values():
                if workload["kind"] == kind:
                    for index in range(int(workload["spec"].get("replicas", 1))):
                        self._create_pod(workload, index)
        self._prober = threading.Thread(target=self._probe_loop, name="harness-prober", daemon=True)
        self._prober.start()
        self._supervisor = threading.Thread(target=self._restart_loop, name="harness-restarts", daemon=True)
        self._supervisor.start()

    def down(self) -> None:
        """Remove every container, volume and the network this harness made."""
        self._stop.set()
        for pod in list(self.pods.values()):
            docker("rm", "--force", pod.container_name, check=False)
        for volume in docker("volume", "ls", "-q", "--filter", f"name={self.prefix}-", check=False).stdout.split():
            docker("volume", "rm", "--force", volume, check=False)
        docker("network", "rm", self.network, check=False)
        shutil.rmtree(self._files, ignore_errors=True)

    def scale(self, workload_name: str, replicas: int) -> None:
        """Set a Deployment's (or StatefulSet's) replica count, starting or removing containers."""
        workload = self.workloads[workload_name]
        current = sorted((p for p in self.pods.values() if p.workload is workload), key=lambda p: p.index)
        for index in range(len(current), replicas):
            self._create_pod(workload, index)
        for pod in current[replicas:]:
            self.delete_pod(pod.name)

    def kill(self, pod_name: str) -> None:
        """SIGKILL a pod's container (its volumes stay); the restart policy starts it again."""
        docker("kill", self.pods[pod_name].container_name)

    def restarts(self, pod_name: str) -> int:
        """The pod's restart count, as ``kubectl get pods`` shows it."""
        with self._lock:
            return self.pods[pod_name].restarts

    def last_termination(self, pod_name: str) -> dict[str, Any] | None:
        """The pod's last exit (``reason``: OOMKilled, Error or Completed; ``exit_code``; ``ran_s``), or None."""
        with self._lock:
            termination = self.pods[pod_name].last_termination
            return dict(termination) if termination else None

    def delete_pod(self, pod_name: str) -> None:
        with self._lock:
            pod = self.pods.pop(pod_name)
        docker("rm", "--force", pod.container_name, check=False)
        for volume in pod.volumes.values():
            if volume.startswith(f"{self.prefix}-emptydir-"):
                docker("volume", "rm", "--force", volume, check=False)

    def of(self, workload_name: str) -> list[Pod]:
        return sorted((p for p in self.pods.values() if p.workload["metadata"]["name"] == workload_name),
                      key=lambda p: p.index)

    def logs(self, pod_name: str, tail: int = 60) -> str:
        result = docker("logs", "--tail", str(tail), self.pods[pod_name].container_name, check=False)
        return result.stdout + result.stderr

    def running(self, pod_name: str) -> bool:
        state = docker("inspect", "--format", "{{.State.Running}}", self.pods[pod_name].container_name, check=False)
        return state.stdout.strip() == "true"

    # -- one pod -----------------------------------------------------------------------------

    def _env(self, container: dict[str, Any], pod: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.configmaps[source["configMapRef"]["name"]])
            elif "secretRef" in source:
                env.update(self.secrets[source["secretRef"]["name"]])
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
                continue
            ref = item["valueFrom"]
            if "fieldRef" in ref:
                path = ref["fieldRef"]["fieldPath"]
                env[item["name"]] = {"metadata.name": pod, "metadata.namespace": self.namespace}[path]
            elif "configMapKeyRef" in ref:
                env[item["name"]] = self.configmaps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
            elif "secretKeyRef" in ref:
                env[item["name"]] = self.secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
            else:
                raise ValueError(f"env {item['name']}: unsupported valueFrom {sorted(ref)}")
        return env

    def _volume(self, pod: str, volume: dict[str, Any]) -> str:
        if "configMap" in volume:
            directory = self._files / f"{pod}-{volume['name']}"
            directory.mkdir(parents=True, exist_ok=True)
            for key, text in self.configmaps[volume["configMap"]["name"]].items():
                (directory / key).write_text(text)
            directory.chmod(0o755)
            return str(directory)
        if "emptyDir" in volume:
            name = f"{self.prefix}-emptydir-{pod}-{volume['name']}"
            docker("volume", "create", name)
            return name
        raise ValueError(f"volume {volume['name']}: only configMap, emptyDir and claim templates are supported")

    def _create_pod(self, workload: dict[str, Any], index: int) -> Pod:
        name = self._pod_name(workload, index)
        spec = workload["spec"]["template"]["spec"]
        container = spec["containers"][0]
        if len(spec["containers"]) != 1 or spec.get("initContainers"):
            raise ValueError(f"{workload['metadata']['name']}: the harness runs one container per pod")
        volumes = {v["name"]: self._volume(name, v) for v in spec.get("volumes", [])}
        for claim in workload["spec"].get("volumeClaimTemplates", []):
            volume = f"{self.prefix}-{claim['metadata']['name']}-{name}"
            docker("volume", "create", volume)
            volumes[claim["metadata"]["name"]] = volume
        pod = Pod(name=name, workload=workload, index=index, container_name=f"{self.prefix}-{name}", volumes=volumes,
                  aliases=self._aliases(workload, name))
        pod_security, security = spec.get("securityContext", {}), container.get("securityContext", {})
        user = security.get("runAsUser", pod_security.get("runAsUser"))
        group = security.get("runAsGroup", pod_security.get("runAsGroup"))
        fs_group = pod_security.get("fsGroup")
        docker_volumes = [v for v in volumes.values() if not v.startswith("/")]
        if fs_group is not None and docker_volumes:  # what fsGroup does to a pod's volumes
            mounts = [a for i, v in enumerate(docker_volumes) for a in ("--volume", f"{v}:/v/{i}")]
            docker("run", "--rm", "--user", "0:0", "--network", "none", *mounts, self._image(container), "sh", "-c",
                   f"chgrp -R {fs_group} /v && chmod -R g+rwX /v && chmod g+s /v/*")
        args = ["create", "--name", pod.container_name, "--hostname", name, "--network", self.network]
        for alias in pod.aliases:
            args += ["--network-alias", alias]
        for key, value in self._env(container, name).items():
            args += ["--env", f"{key}={value}"]
        for mount in container.get("volumeMounts", []):
            source = volumes[mount["name"]]
            args += ["--volume", f"{source}:{mount['mountPath']}{':ro' if mount.get('readOnly') else ''}"]
        if user is not None:
            args += ["--user", f"{user}:{group if group is not None else user}"]
        if fs_group is not None:
            args += ["--group-add", str(fs_group)]
        if security.get("readOnlyRootFilesystem"):
            args += ["--read-only"]
        for cap in security.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        for cap in security.get("capabilities", {}).get("add", []):
            args += ["--cap-add", cap]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for port in container.get("ports", []):
            args += ["--publish", f"127.0.0.1::{port['containerPort']}"]
        if container.get("resources", {}).get("requests", {}).get("memory"):
            self.ignored.append(f"{name}: requests.memory (it only schedules; no cgroup holds it)")
        pod.limits = CgroupLimits.of(container.get("resources", {}))
        args += pod.limits.docker_args()
        command = [*container.get("command", []), *container.get("args", [])]
        docker(*args, self._image(container), *command)
        docker("start", pod.container_name)
        self._publish_ports(pod)
        pod.started_at = time.monotonic()
        self._check_limits(pod)
        pod.probes = {kind: ProbeState(kind, container[kind]) for kind in ("startupProbe", "readinessProbe",
                                                                            "livenessProbe") if kind in container}
        with self._lock:
            self.pods[name] = pod
        return pod

    def _image(self, container: dict[str, Any]) -> str:
        return self.image or container["image"]

    def _publish_ports(self, pod: Pod) -> None:
        for port in pod.container.get("ports", []):
            out = docker("port", pod.container_name, f"{port['containerPort']}/tcp").stdout.split()
            pod.host_ports[int(port["containerPort"])] = int(out[0].rsplit(":", 1)[1])

    def _check_limits(self, pod: Pod) -> None:
        """Read the container's cgroup files from inside it; raise if a limit did not take effect."""
        want = pod.limits
        if want == CgroupLimits():
            return
        result = docker("exec", pod.container_name, "python3", "-c", _READ_CGROUPS, check=False)
        if result.returncode != 0:
            if not self.running(pod.name):  # it exited at once (an OOM at start): the restart loop reports it
                return
            raise ResourcesNotApplied(f"{pod.name}: could not read its cgroups: {result.stderr.strip()}")
        quota, period, shares, memory = result.stdout.split()
        seen = {"cpu quota (us per 100 ms)": quota if period in (str(CFS_PERIOD_US), "?") else f"{quota}/{period}",
                "cpu shares": shares, "memory limit (bytes)": memory}
        wanted = {"cpu quota (us per 100 ms)": want.cpu_quota_us, "cpu shares": want.cpu_shares,
                  "memory limit (bytes)": want.memory_bytes}
        wrong = [f"{what}: wanted {value}, the container has {seen[what]}" for what, value in wanted.items()
                 if value is not None and seen[what] != str(value)]
        if wrong:
            raise ResourcesNotApplied(f"{pod.name}: its resources did not take effect ({'; '.join(wrong)}); "
                                      "does this Docker engine support cgroup limits (docker info's warnings)?")
        log.info("harness: %s runs with %s", pod.name, seen)

    # -- restarts ----------------------------------------------------------------------------

    def _restart_loop(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                pods = list(self.pods.values())
            for pod in pods:
                try:
                    self._supervise(pod)
                except (RuntimeError, subprocess.SubprocessError, ValueError) as error:
                    if pod.name in self.pods:  # a pod deleted while it was looked at is no error
                        log.warning("harness: supervising %s: %s", pod.name, error)

    def _supervise(self, pod: Pod) -> None:
        now = time.monotonic()
        if pod.restart_at is not None:
            if now >= pod.restart_at and pod.name in self.pods:
                with self._lock:  # not ready from here on, until its probes pass again
                    for probe in pod.probes.values():
                        probe.succeeded, probe.consecutive_failures = False, 0
                    pod.started_at = time.monotonic()
                docker("start", pod.container_name, check=False)
                self._publish_ports(pod)
                with self._lock:
                    pod.started_at, pod.restart_at = time.monotonic(), None
                    pod.restarts += 1
                log.warning("harness: %s restarted (restart count %d)", pod.name, pod.restarts)
            return
        out = docker("inspect", "--format", "{{json .State}}", pod.container_name, check=False)
        if out.returncode != 0 or pod.name not in self.pods:
            return  # deleted meanwhile
        state = json.loads(out.stdout)
        if state["Running"] or state["Paused"] or state["Restarting"]:
            return
        ran = now - pod.started_at
        reason = "OOMKilled" if state["OOMKilled"] else ("Completed" if state["ExitCode"] == 0 else "Error")
        if ran >= BACKOFF_RESET_AFTER_S:
            pod.backoff_s = 0.0
        delay = pod.backoff_s
        with self._lock:
            pod.last_termination = {"reason": reason, "exit_code": int(state["ExitCode"]), "ran_s": round(ran, 1)}
            pod.restart_at = now + delay
            pod.backoff_s = BACKOFF_FIRST_S if delay == 0 else min(2 * delay, BACKOFF_CAP_S)
        log.warning("harness: %s exited (%s, exit code %s) after %.0f s; restarting in %.0f s", pod.name, reason,
                    state["ExitCode"], ran, delay)

    # -- probes ------------------------------------------------------------------------------

    def _probe_once(self, pod: Pod, spec: dict[str, Any]) -> tuple[bool, str]:
        timeout = float(spec.get("timeoutSeconds", 1))
        if "httpGet" in spec:
            get = spec["httpGet"]
            url = f"http://127.0.0.1:{pod.port(get['port'])}{get.get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
                    return 200 <= response.status < 400, f"HTTP {response.status}"
            except urllib.error.HTTPError as error:
                return False, f"HTTP {error.code}"
            except OSError as error:
                return False, f"HTTP GET {url}: {error}"
        if "grpc" in spec:
            from system_harness import grpc_health

            status = grpc_health(f"127.0.0.1:{pod.port(spec['grpc']['port'])}", timeout=timeout)
            return status == "SERVING", f"gRPC health {status}"
        raise ValueError(f"{pod.name}: unsupported probe {sorted(spec)}")

    def _probe_loop(self) -> None:
        next_run: dict[tuple[str, str], float] = {}
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                pods = list(self.pods.values())
            for pod in pods:
                startup = pod.probes.get("startupProbe")
                for kind, probe in pod.probes.items():
                    if kind != "startupProbe" and startup is not None and not startup.succeeded:
                        continue  # readiness and liveness start after the startup probe succeeds
                    if kind == "startupProbe" and probe.succeeded:
                        continue
                    key = (pod.name, kind)
                    first = pod.started_at + float(probe.spec.get("initialDelaySeconds", 0))
                    if now < max(first, next_run.get(key, 0.0)):
                        continue
                    next_run[key] = now + float(probe.spec.get("periodSeconds", 10))
                    ok, detail = self._probe_once(pod, probe.spec)
                    with self._lock:
                        self._record(pod, probe, ok, detail)

    def _record(self, pod: Pod, probe: ProbeState, ok: bool, detail: str) -> None:
        if ok:
            probe.succeeded, probe.consecutive_failures = True, 0
            return
        probe.consecutive_failures += 1
        threshold = int(probe.spec.get("failureThreshold", 3))
        if probe.kind == "startupProbe" and probe.consecutive_failures < threshold:
            return  # failing until it starts is what a startup probe is for
        message = f"{pod.name}: {probe.kind} failed ({detail})"
        if probe.consecutive_failures >= threshold:
            message += (f"; {probe.consecutive_failures} failures in a row, past the failureThreshold of {threshold}"
                        + (": the kubelet would restart the container" if probe.kind != "readinessProbe" else ""))
        probe.failures.append(message)
        log.warning("harness: %s", message)

    def ready(self, pod_name: str) -> bool:
        """The pod's startup probe has succeeded and its readiness probe last succeeded."""
        with self._lock:
            pod = self.pods[pod_name]
            startup, readiness = pod.probes.get("startupProbe"), pod.probes.get("readinessProbe")
            return ((startup is None or startup.succeeded)
                    and (readiness is None or (readiness.succeeded and readiness.consecutive_failures == 0)))

    def probe_failures(self, pod_name: str | None = None) -> list[str]:
        with self._lock:
            pods = [self.pods[pod_name]] if pod_name else list(self.pods.values())
            return [message for pod in pods for probe in pod.probes.values() for message in probe.failures]

    def liveness_exceeded(self, pod_name: str) -> bool:
        """The pod's liveness probe failed ``failureThreshold`` times in a row."""
        with self._lock:
            probe = self.pods[pod_name].probes.get("livenessProbe")
            return probe is not None and probe.consecutive_failures >= int(probe.spec.get("failureThreshold", 3))

    def metrics_url(self, pod_name: str, port: int = 9000) -> str:
        return f"http://127.0.0.1:{self.pods[pod_name].host_ports[port]}/metrics"
