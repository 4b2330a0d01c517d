"""Finding the population's members and their service addresses.

A member ``i`` is one policy learner, one discriminator and one replay buffer. The controller
needs their addresses to tell an actor where to work (``AssignActor``) and a learner where its
donor lives. Two sources:

* **A static members file** (``--members FILE``, JSON or YAML): a list of
  ``{member, learner_address, discriminator_address, replay_address}`` (:func:`spiral.runtime.members.load_members_file`).
  ``spiral up --population K`` writes one.
* **Kubernetes** (:class:`KubernetesDiscovery`): members are StatefulSets of K replicas behind
  headless Services, so member ``i`` is the pod with ordinal ``i`` (``spiral-learner-3`` is
  member 3) and its stable address is ``<pod>.<service>.<namespace>.svc:<port>``. The learner
  pods are listed through the Kubernetes API (in-cluster config, label selector
  ``app.kubernetes.io/component=learner`` in the controller's own namespace); the
  discriminator and replay buffer of member ``i`` are the ordinal-``i`` pods of their own
  StatefulSets, whose DNS names follow from the StatefulSet names.

:func:`make_discovery` picks Kubernetes when running in a cluster (and no file was given) and
falls back to the static file elsewhere.

With a population discriminator (``pbt.shared_discriminator``) every member's
``discriminator_address`` and ``replay_address`` are member 0's: Kubernetes discovery then
names ordinal 0 of the discriminator and replay-buffer StatefulSets for every member, and
``spiral up`` writes the shared addresses into its members file.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

from spiral.runtime.members import MemberAddresses, load_members_file

log = logging.getLogger(__name__)

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
"""Where a pod finds its own namespace."""

_ORDINAL = re.compile(r"^(?P<set>[a-z0-9]([-a-z0-9]*[a-z0-9])?)-(?P<ordinal>\d+)$")


class Discovery(Protocol):
    """Something that knows the current members' addresses."""

    def members(self) -> dict[int, MemberAddresses]:
        """Member index -> addresses of the members currently known."""
        ...


# ---------------------------------------------------------------------------------------------
# Static file
# ---------------------------------------------------------------------------------------------


@dataclass
class StaticDiscovery:
    """Members from a fixed mapping (a members file, or nothing)."""

    known: dict[int, MemberAddresses]

    def members(self) -> dict[int, MemberAddresses]:
        return dict(self.known)


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------


def statefulset_ordinal(pod_name: str) -> tuple[str, int]:
    """``"spiral-learner-3"`` -> ``("spiral-learner", 3)``: a StatefulSet pod's set and ordinal.

    Raises:
        ValueError: ``pod_name`` is not ``<statefulset>-<ordinal>``.
    """
    match = _ORDINAL.match(pod_name)
    if not match:
        raise ValueError(f"pod name {pod_name!r} is not <statefulset>-<ordinal>")
    return match.group("set"), int(match.group("ordinal"))


def headless_address(pod: str, service: str, namespace: str, port: int) -> str:
    """Stable DNS address of a StatefulSet pod behind a headless Service."""
    return f"{pod}.{service}.{namespace}.svc:{port}"


@dataclass(frozen=True)
class StatefulSetRef:
    """A StatefulSet (and its headless Service, same name by spiral's convention) and its gRPC port."""

    name: str
    port: int


DEFAULT_LEARNER = StatefulSetRef("spiral-learner", 50051)
DEFAULT_DISCRIMINATOR = StatefulSetRef("spiral-discriminator", 50052)
DEFAULT_REPLAY = StatefulSetRef("spiral-replaybuffer", 50053)


@dataclass(frozen=True)
class PodInfo:
    """The parts of a pod discovery reads (plain data, so the logic is testable without a cluster).

    Attributes:
        name: Pod name, ``<statefulset>-<ordinal>``.
        subdomain: ``spec.subdomain``: the headless Service of a StatefulSet pod ('' if none).
        phase: ``status.phase`` (only ``Running`` pods count).
        deleting: Whether ``metadata.deletionTimestamp`` is set.
    """

    name: str
    subdomain: str = ""
    phase: str = "Running"
    deleting: bool = False


def members_from_pods(pods: Iterable[PodInfo], namespace: str, learner: StatefulSetRef = DEFAULT_LEARNER,
                      discriminator: StatefulSetRef = DEFAULT_DISCRIMINATOR,
                      replay: StatefulSetRef = DEFAULT_REPLAY, shared: bool = False) -> dict[int, MemberAddresses]:
    """Members from the learner pods: member = ordinal; addresses from the headless Services.

    Pods that are not Running, are being deleted, or whose name has no ordinal are skipped.
    The discriminator and replay buffer of member ``i`` are ordinal ``i`` of their StatefulSets,
    or ordinal 0 for every member when ``shared`` (a population discriminator).
    """
    found: dict[int, MemberAddresses] = {}
    for pod in pods:
        if pod.phase != "Running" or pod.deleting:
            continue
        try:
            set_name, ordinal = statefulset_ordinal(pod.name)
        except ValueError:
            log.warning("skipping learner pod %s: no StatefulSet ordinal in its name", pod.name)
            continue
        service = pod.subdomain or set_name
        peer = 0 if shared else ordinal
        found[ordinal] = MemberAddresses(
            member=ordinal,
            learner_address=headless_address(pod.name, service, namespace, learner.port),
            discriminator_address=headless_address(f"{discriminator.name}-{peer}", discriminator.name, namespace,
                                                   discriminator.port),
            replay_address=headless_address(f"{replay.name}-{peer}", replay.name, namespace, replay.port),
        )
    return found


def in_cluster() -> bool:
    """Whether this process runs in a Kubernetes pod (service account mounted, API host set)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and NAMESPACE_FILE.exists()


class KubernetesDiscovery:
    """Members from the Kubernetes API, refreshed at most every ``refresh_seconds``.

    Needs RBAC to list pods in its namespace (``deploy/components/pbt-controller/rbac.yaml``).
    When a refresh fails the last known members are kept (and the error logged). ``shared``: a
    population discriminator, every member's discriminator and replay buffer are ordinal 0's.
    """

    def __init__(self, namespace: str | None = None, selector: str = "app.kubernetes.io/component=learner",
                 refresh_seconds: float = 10.0, list_pods: Callable[[str, str], list[PodInfo]] | None = None,
                 learner: StatefulSetRef = DEFAULT_LEARNER, discriminator: StatefulSetRef = DEFAULT_DISCRIMINATOR,
                 replay: StatefulSetRef = DEFAULT_REPLAY, shared: bool = False) -> None:
        self.namespace = namespace or NAMESPACE_FILE.read_text().strip()
        self.selector = selector
        self.refresh_seconds = refresh_seconds
        self._list_pods = list_pods or _kubernetes_pod_lister()
        self._refs = (learner, discriminator, replay)
        self.shared = bool(shared)
        self._lock = threading.Lock()
        self._known: dict[int, MemberAddresses] = {}
        self._refreshed = -float("inf")

    def members(self) -> dict[int, MemberAddresses]:
        with self._lock:
            now = time.monotonic()
            if now - self._refreshed >= self.refresh_seconds:
                self._refreshed = now
                try:
                    pods = self._list_pods(self.namespace, self.selector)
                    self._known = members_from_pods(pods, self.namespace, *self._refs, shared=self.shared)
                except Exception as exc:  # noqa: BLE001 - API trouble must not take the controller down
                    log.warning("listing pods %r in %s failed (%s); keeping %d known members",
                                self.selector, self.namespace, exc, len(self._known))
            return dict(self._known)


def _kubernetes_pod_lister() -> Callable[[str, str], list[PodInfo]]:
    """A pod lister over the in-cluster API (imports the client only when needed)."""
    from kubernetes import client, config

    config.load_incluster_config()
    api = client.CoreV1Api()

    def list_pods(namespace: str, selector: str) -> list[PodInfo]:
        pods = api.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=10)
        return [PodInfo(name=p.metadata.name, subdomain=(p.spec.subdomain or "") if p.spec else "",
                        phase=(p.status.phase or "") if p.status else "",
                        deleting=p.metadata.deletion_timestamp is not None) for p in pods.items]

    return list_pods


def predicted_members(population_size: int, namespace: str, shared: bool = False) -> dict[int, MemberAddresses]:
    """The addresses members 0..K-1 have by spiral's StatefulSet convention (no API call)."""
    pods = [PodInfo(name=f"{DEFAULT_LEARNER.name}-{i}", subdomain=DEFAULT_LEARNER.name) for i in range(population_size)]
    return members_from_pods(pods, namespace, shared=shared)


def make_discovery(members_file: str | Path | None, population_size: int = 0, shared: bool = False) -> Discovery:
    """The static file when given; else Kubernetes when in a cluster; else no members.

    In a cluster whose API cannot be used (no RBAC, client missing), the members are the
    ``population_size`` StatefulSet ordinals at their predictable headless-Service addresses
    (:func:`predicted_members`), so actors can still be assigned. ``shared``: a population
    discriminator (``pbt.shared_discriminator``); a members file is used as written, with a
    warning when it names more than one discriminator or replay buffer.

    Raises:
        ValueError: the members file is unreadable or invalid.
    """
    if members_file:
        known = load_members_file(members_file)
        log.info("members from %s: %s", members_file, sorted(known))
        if shared:
            for field_name in ("discriminator_address", "replay_address"):
                distinct = sorted({getattr(m, field_name) for m in known.values()})
                if len(distinct) > 1:
                    log.warning("pbt.shared_discriminator is on but %s names %d %ss (%s); members use them as "
                                "written", members_file, len(distinct), field_name, ", ".join(distinct))
        return StaticDiscovery(known)
    if in_cluster():
        try:
            discovery = KubernetesDiscovery(shared=shared)
            log.info("discovering members from Kubernetes (namespace %s, selector %s)", discovery.namespace,
                     discovery.selector)
            return discovery
        except Exception as exc:  # noqa: BLE001 - degrade to static addresses rather than crash-loop
            if population_size > 0 and NAMESPACE_FILE.exists():
                known = predicted_members(population_size, NAMESPACE_FILE.read_text().strip(), shared=shared)
                log.warning("Kubernetes discovery unavailable (%s); assuming the %d StatefulSet members at %s",
                            exc, population_size, [m.learner_address for m in known.values()])
                return StaticDiscovery(known)
            log.warning("Kubernetes discovery unavailable (%s); no members known", exc)
    else:
        log.warning("no --members file and not in a Kubernetes cluster: no member addresses known "
                    "(AssignActor will fail until a members file is given)")
    return StaticDiscovery({})
