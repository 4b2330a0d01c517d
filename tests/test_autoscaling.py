"""Actors that scale themselves, and actors on spot nodes (deploy/components), checked offline.

Each shipped overlay is rendered with each of ``autoscale-actors`` (KEDA), ``autoscale-actors-hpa``
(prometheus-adapter + HPA) and ``spot-actors`` through a test-only overlay of that overlay (how
a user adds them: an overlay's own ``replicas:`` would put the actor count back), then:

* the autoscalers: the rendered actor Deployment has no ``replicas`` (so ``kubectl apply -k``
  leaves the count alone), everything else renders as in the overlay; the HPA passes strict
  schema validation; KEDA's ScaledObject, whose schema is not available offline, is checked
  structurally (its fields, target, query, bounds and damping);
* the recording rules they read: ``promtool test rules`` on a busy, an idle, a saturated and a
  done learner, and on a population;
* spot: tolerations and affinity on the actors only.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from test_deploy import (DEPLOY, K8S_VERSION, OVERLAYS, actor_deployment, alert_rules, by_kind,
                         check_workload_policy, kustomize, overlay_namespace, promtool, rendered, workloads)

COMPONENTS = DEPLOY / "components"
AUTOSCALERS = ("autoscale-actors", "autoscale-actors-hpa")
SPOT = "spot-actors"
RATIO_SERIES = "spiral:actor_scale_ratio"
"""The recording rule both autoscalers read (components/monitoring/prometheusrule.yaml)."""
SPOT_KEYS = {"cloud.google.com/gke-spot", "eks.amazonaws.com/capacityType", "karpenter.sh/capacity-type",
             "kubernetes.azure.com/scalesetpriority"}
SCALED_OBJECT_SPEC_FIELDS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                             "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
                             "triggers"}
"""``ScaledObject.spec`` fields of KEDA v2 (keda.sh/v1alpha1), from its documentation."""
PROMETHEUS_TRIGGER_FIELDS = {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                             "customHeaders", "ignoreNullValues", "unsafeSsl", "queryParameters"}
"""The prometheus scaler's ``metadata`` fields (KEDA v2)."""


# -- rendering ----------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _overlay_with(overlay: str, component: str) -> tuple[str, ...]:
    """``overlay`` plus ``component``, as a user adds it: an overlay whose resource is the overlay."""
    root = Path(tempfile.mkdtemp(prefix=f"spiral-{overlay}-{component}-"))
    atexit.register(shutil.rmtree, root, True)
    (root / "kustomization.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: kustomize.config.k8s.io/v1beta1
        kind: Kustomization
        resources: [{os.path.relpath(DEPLOY / "overlays" / overlay, root)}]
        components: [{os.path.relpath(COMPONENTS / component, root)}]
        """))
    return tuple(json.dumps(d) for d in kustomize(root))


def rendered_with(overlay: str, component: str) -> list[dict[str, Any]]:
    """The objects of ``overlay`` with ``component`` (a fresh copy each call)."""
    return [json.loads(d) for d in _overlay_with(overlay, component)]


def identity(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def without_actor_replicas(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """``docs`` by identity, the actor Deployment's ``replicas`` taken out."""
    found = {identity(d): d for d in docs}
    found[identity(actor_deployment(docs))]["spec"].pop("replicas", None)
    return found


# -- both autoscalers ---------------------------------------------------------------------------

@pytest.mark.parametrize("component", AUTOSCALERS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_with_an_autoscaler_the_actor_deployment_has_no_replicas(overlay: str, component: str) -> None:
    """The count is the autoscaler's: the manifest names none, so ``kubectl apply -k`` resets nothing."""
    plain = rendered(overlay)
    assert "replicas" in actor_deployment(plain)["spec"], "every overlay sets an actor count of its own"
    docs = rendered_with(overlay, component)
    actor = actor_deployment(docs)
    assert "replicas" not in actor["spec"], f"{overlay} + {component}: the actor Deployment sets replicas"
    added = {identity(d) for d in docs} - {identity(d) for d in plain}
    assert added == {("ScaledObject" if component == "autoscale-actors" else "HorizontalPodAutoscaler",
                      "spiral-actor")}, added
    ours, theirs = without_actor_replicas(docs), without_actor_replicas(plain)
    for key, doc in theirs.items():
        assert ours[key] == doc, f"{overlay} + {component} changed {key} beyond the actor count"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == overlay_namespace(docs), identity(doc)
    check_workload_policy(f"{overlay}+{component}", docs)


def test_an_overlays_own_replicas_would_put_the_count_back() -> None:
    """Why the components go in an overlay of an overlay: listed beside an overlay's own
    ``replicas:``, the component's deletion is undone (the check above would catch it)."""
    root = Path(tempfile.mkdtemp(prefix="spiral-direct-"))
    try:
        (root / "kustomization.yaml").write_text(textwrap.dedent(f"""\
            apiVersion: kustomize.config.k8s.io/v1beta1
            kind: Kustomization
            resources: [{os.path.relpath(DEPLOY / "base", root)}]
            components: [{os.path.relpath(COMPONENTS / "autoscale-actors", root)}]
            replicas: [{{name: spiral-actor, count: 8}}]
            """))
        assert actor_deployment(kustomize(root))["spec"]["replicas"] == 8
    finally:
        shutil.rmtree(root, ignore_errors=True)


def recorded(name: str) -> dict[str, Any]:
    (rule,) = [r for r in alert_rules() if r.get("record") == name]
    return rule


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scaled_object_scales_the_actors_on_the_scale_ratio(overlay: str) -> None:
    docs = rendered_with(overlay, "autoscale-actors")
    namespace = overlay_namespace(docs)
    (scaled,) = by_kind(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC_FIELDS, f"unknown ScaledObject fields {set(spec) - SCALED_OBJECT_SPEC_FIELDS}"
    actor = actor_deployment(docs)
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": actor["metadata"]["name"]}
    assert spec["minReplicaCount"] == 0, "a done run scales the actors to zero"
    assert spec["maxReplicaCount"] >= actor_deployment(rendered(overlay))["spec"]["replicas"], \
        "the autoscaler may run at least as many actors as the overlay does"
    assert spec["cooldownPeriod"] > 0 and spec["pollingInterval"] > 0
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"
    metadata = trigger["metadata"]
    assert set(metadata) <= PROMETHEUS_TRIGGER_FIELDS, set(metadata) - PROMETHEUS_TRIGGER_FIELDS
    assert all(isinstance(v, str) for v in metadata.values()), "KEDA's trigger metadata is a map of strings"
    assert metadata["query"] == f'{RATIO_SERIES}{{namespace="{namespace}"}}', metadata["query"]
    assert recorded(RATIO_SERIES), "the query reads a recording rule of components/monitoring"
    assert float(metadata["threshold"]) == 1.0, "ratio 1: the actor count is right"
    assert float(metadata["activationThreshold"]) == 0.0, "ratio 0 (done) deactivates the trigger"
    assert metadata["ignoreNullValues"] == "false", "no learner scraped must keep the count, not scale to zero"
    assert re.fullmatch(r"https?://[\w.-]+(:\d+)?", metadata["serverAddress"])
    check_damping(spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])


def check_damping(behavior: dict[str, Any]) -> None:
    """Scale-up waits, scale-down waits longer, and both are rate-limited."""
    up, down = behavior["scaleUp"], behavior["scaleDown"]
    assert 0 < up["stabilizationWindowSeconds"] < down["stabilizationWindowSeconds"] <= 3600
    for rules in (up, down):
        assert rules["policies"] and all(p["type"] in ("Percent", "Pods") and p["value"] > 0 and
                                         0 < p["periodSeconds"] <= 1800 for p in rules["policies"])
    assert all(p["value"] < 100 for p in down["policies"] if p["type"] == "Percent"), "scale down gradually"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_the_actors_on_the_adapters_metric(overlay: str) -> None:
    import kubernetes_validate

    docs = rendered_with(overlay, "autoscale-actors-hpa")
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    spec = hpa["spec"]
    actor = actor_deployment(docs)
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": actor["metadata"]["name"]}
    assert spec["minReplicas"] == 1, "an HPA cannot go to zero without the alpha HPAScaleToZero gate"
    assert spec["maxReplicas"] >= actor_deployment(rendered(overlay))["spec"]["replicas"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["target"] == {"type": "Value", "value": "1"}
    (rule,) = adapter_values()["rules"]["external"]
    assert metric["external"]["metric"]["name"] == rule["name"]["as"]
    check_damping(spec["behavior"])


def adapter_values() -> dict[str, Any]:
    return yaml.safe_load((COMPONENTS / "autoscale-actors-hpa" / "prometheus-adapter-values.yaml").read_text())


def test_prometheus_adapter_rule_serves_the_recorded_ratio_per_namespace() -> None:
    (rule,) = adapter_values()["rules"]["external"]
    assert rule["seriesQuery"].startswith(RATIO_SERIES + "{") and recorded(RATIO_SERIES)
    assert re.fullmatch(rule["name"]["matches"], RATIO_SERIES)
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}, \
        "the HPA of a namespace must see its own run's ratio only"
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


# -- the recording rules ------------------------------------------------------------------------

def test_scale_ratio_follows_the_learners_busy_fraction_and_is_zero_once_done(tmp_path: Path) -> None:
    """``promtool test rules``: 0.9 over the busy fraction (averaged over a population's
    members), 0 once every member is done, nothing while no learner is scraped."""
    doc = yaml.safe_load((COMPONENTS / "monitoring" / "prometheusrule.yaml").read_text())
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    assert promtool("check", "rules", "rules.yaml", cwd=tmp_path).returncode == 0

    def busy(namespace: str, member: str, seconds_per_minute: float) -> dict[str, str]:
        return {"series": f'spiral_learner_update_seconds_sum{{namespace="{namespace}", member="{member}", '
                          f'component="learner"}}', "values": f"0+{seconds_per_minute}x20"}

    def done(namespace: str, member: str, component: str, values: str) -> dict[str, str]:
        return {"series": f'spiral_run_done{{namespace="{namespace}", member="{member}", component="{component}"}}',
                "values": values}

    def ratio(namespace: str, value: float) -> dict[str, Any]:
        return {"labels": f'{RATIO_SERIES}{{namespace="{namespace}"}}', "value": value}

    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # half busy: twice the actors
                busy("half", "0", 27), done("half", "0", "learner", "0x20"),
                # 90% busy: the count is right
                busy("right", "0", 54), done("right", "0", "learner", "0x20"),
                # saturated: a tenth fewer
                busy("saturated", "0", 60), done("saturated", "0", "learner", "0x20"),
                # idle, not done: as many more as the bounds allow (counted as 1% busy)
                busy("idle", "0", 0), done("idle", "0", "learner", "0x20"),
                # done (the learner says so; an actor that has not heard yet does not matter): 0
                busy("done", "0", 0), done("done", "0", "learner", "0x5 1x15"), done("done", "0", "actor", "0x20"),
                # a population: the mean busy fraction; one member done is not the run done
                busy("pop", "0", 18), busy("pop", "1", 36),
                done("pop", "0", "learner", "1x20"), done("pop", "1", "learner", "0x20"),
                # no learner scraped: no ratio (KEDA then keeps the count)
                done("gone", "0", "actor", "0x20"),
            ],
            "promql_expr_test": [
                {"expr": 'spiral:learner_busy_fraction{namespace="half"}', "eval_time": "10m",
                 "exp_samples": [{"labels": 'spiral:learner_busy_fraction{namespace="half", member="0"}',
                                  "value": 0.45}]},
                {"expr": f'{RATIO_SERIES}{{namespace!~"pop|gone"}}', "eval_time": "10m",
                 "exp_samples": [ratio("half", 2), ratio("right", 1), ratio("saturated", 0.9), ratio("idle", 90),
                                 ratio("done", 0)]},
                {"expr": f'round({RATIO_SERIES}{{namespace="pop"}}, 0.001)', "eval_time": "10m",
                 "exp_samples": [{"labels": '{namespace="pop"}', "value": 2}]},
                {"expr": f'{RATIO_SERIES}{{namespace="gone"}}', "eval_time": "10m", "exp_samples": []},
                # before the done learner's flag went up, its idle learner asked for the most actors
                {"expr": f'{RATIO_SERIES}{{namespace="done"}}', "eval_time": "3m",
                 "exp_samples": [ratio("done", 90)]},
            ],
        }],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    result = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- spot actors --------------------------------------------------------------------------------

def spot_tolerations(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in workload["spec"]["template"]["spec"].get("tolerations", []) if t.get("key") in SPOT_KEYS]


def spot_affinity_keys(workload: dict[str, Any]) -> set[str]:
    node = workload["spec"]["template"]["spec"].get("affinity", {}).get("nodeAffinity", {})
    terms = [t["preference"] for t in node.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    terms += node.get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])
    return {e["key"] for t in terms for e in t.get("matchExpressions", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_spot_tolerations_and_affinity_go_to_the_actors_only(overlay: str) -> None:
    import kubernetes_validate

    plain, docs = rendered(overlay), rendered_with(overlay, SPOT)
    actor = actor_deployment(docs)
    assert {t["key"] for t in spot_tolerations(actor)} == SPOT_KEYS
    assert all(t["effect"] == "NoSchedule" for t in spot_tolerations(actor))
    assert spot_affinity_keys(actor) == SPOT_KEYS
    assert actor["spec"]["replicas"] == actor_deployment(plain)["spec"]["replicas"], "spot leaves the count alone"
    before = {identity(w): w for w in workloads(plain)}
    for workload in workloads(docs):
        kubernetes_validate.validate(workload, K8S_VERSION, strict=True)
        if workload is actor:
            continue
        assert not spot_tolerations(workload) and not spot_affinity_keys(workload), \
            f"{overlay}: {workload['metadata']['name']} holds state and must stay off spot nodes"
        assert workload == before[identity(workload)], f"{overlay}: spot-actors changed {identity(workload)}"
    check_workload_policy(f"{overlay}+{SPOT}", docs)


def test_spot_and_an_autoscaler_combine() -> None:
    root = Path(tempfile.mkdtemp(prefix="spiral-spot-autoscale-"))
    try:
        components = ", ".join(os.path.relpath(COMPONENTS / c, root) for c in ("autoscale-actors", SPOT))
        (root / "kustomization.yaml").write_text(textwrap.dedent(f"""\
            apiVersion: kustomize.config.k8s.io/v1beta1
            kind: Kustomization
            resources: [{os.path.relpath(DEPLOY / "overlays" / "mnist", root)}]
            components: [{components}]
            """))
        docs = kustomize(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    actor = actor_deployment(docs)
    assert "replicas" not in actor["spec"] and spot_tolerations(actor) and by_kind(docs, "ScaledObject")
