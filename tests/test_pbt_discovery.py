"""Member discovery: the static members file, and the StatefulSet ordinal / DNS logic (no cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pbt_controller.discovery import (KubernetesDiscovery, PodInfo, StaticDiscovery, headless_address,
                                      make_discovery, members_from_pods, statefulset_ordinal)
from spiral.runtime.members import MemberAddresses, load_members_file, write_members_file


def test_members_file_json_and_yaml_round_trip(tmp_path: Path) -> None:
    members = [MemberAddresses(i, f"127.0.0.1:{6000 + i}", f"127.0.0.1:{7000 + i}", f"127.0.0.1:{8000 + i}")
               for i in (1, 0)]
    path = write_members_file(tmp_path / "members.json", members)
    loaded = load_members_file(path)
    assert sorted(loaded) == [0, 1] and loaded[1].discriminator_address == "127.0.0.1:7001"
    yaml_file = tmp_path / "members.yaml"
    yaml_file.write_text("- {member: 0, learner_address: 'a:1', discriminator_address: 'b:2', replay_address: 'c:3'}\n")
    assert load_members_file(yaml_file) == {0: MemberAddresses(0, "a:1", "b:2", "c:3")}
    assert isinstance(make_discovery(yaml_file), StaticDiscovery)
    assert make_discovery(yaml_file).members()[0].replay_address == "c:3"


@pytest.mark.parametrize("content, message", [
    ({"member": 0}, "expected a list"),
    ([{"member": -1, "learner_address": "a:1", "discriminator_address": "b:2", "replay_address": "c:3"}],
     "members.json[0].member"),
    ([{"member": 0, "learner_address": "a:1", "discriminator_address": "b:2", "replay_address": "c:3"}] * 2,
     "listed twice"),
    ([{"member": 0, "learner_address": "a", "discriminator_address": "b:2", "replay_address": "c:3"}],
     "learner_address"),
    ([{"member": 0, "learner_address": "a:1", "discriminator_address": "b:2"}], "replay_address"),
    ([{"member": 0, "learner_address": "a:1", "discriminator_address": "b:2", "replay_address": "c:3", "x": 1}],
     "unknown field"),
])
def test_members_file_errors_name_the_field(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "members.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_members_file(path)


def test_ordinal_and_dns_names() -> None:
    assert statefulset_ordinal("spiral-learner-0") == ("spiral-learner", 0)
    assert statefulset_ordinal("spiral-learner-11") == ("spiral-learner", 11)
    for bad in ("spiral-learner", "spiral-learner-x", "learner-7abc", "-3"):
        with pytest.raises(ValueError, match="ordinal"):
            statefulset_ordinal(bad)
    assert headless_address("spiral-learner-3", "spiral-learner", "spiral", 50051) == \
        "spiral-learner-3.spiral-learner.spiral.svc:50051"


def test_members_from_learner_pods() -> None:
    pods = [PodInfo("spiral-learner-2", subdomain="spiral-learner"),
            PodInfo("spiral-learner-0", subdomain="spiral-learner"),
            PodInfo("spiral-learner-1", phase="Pending"),
            PodInfo("spiral-learner-3", deleting=True),
            PodInfo("odd-name")]
    members = members_from_pods(pods, "ns")
    assert sorted(members) == [0, 2]
    assert members[2] == MemberAddresses(
        2, "spiral-learner-2.spiral-learner.ns.svc:50051", "spiral-discriminator-2.spiral-discriminator.ns.svc:50052",
        "spiral-replaybuffer-2.spiral-replaybuffer.ns.svc:50053")


def test_kubernetes_discovery_refreshes_and_keeps_members_when_the_api_fails() -> None:
    answers: list[object] = [[PodInfo("spiral-learner-0")], RuntimeError("API down"),
                             [PodInfo("spiral-learner-0"), PodInfo("spiral-learner-1")]]
    calls: list[tuple[str, str]] = []

    def list_pods(namespace: str, selector: str) -> list[PodInfo]:
        calls.append((namespace, selector))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    discovery = KubernetesDiscovery(namespace="spiral", refresh_seconds=0.0, list_pods=list_pods)
    assert sorted(discovery.members()) == [0]
    assert sorted(discovery.members()) == [0]      # API failure: last known kept
    assert sorted(discovery.members()) == [0, 1]
    assert calls[0] == ("spiral", "app.kubernetes.io/component=learner")
    cached = KubernetesDiscovery(namespace="spiral", refresh_seconds=3600.0,
                                 list_pods=lambda ns, sel: [PodInfo("spiral-learner-4")])
    assert cached.members() == cached.members() and sorted(cached.members()) == [4]


def test_no_file_outside_a_cluster_knows_no_members(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert make_discovery(None).members() == {}


def test_in_a_cluster_without_api_access_members_are_the_predictable_statefulset_ordinals(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pbt_controller.discovery as discovery_module

    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("spiral-celeba\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setattr(discovery_module, "NAMESPACE_FILE", namespace_file)

    def no_api(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("no RBAC")

    monkeypatch.setattr(discovery_module, "KubernetesDiscovery", no_api)
    members = make_discovery(None, population_size=3).members()
    assert sorted(members) == [0, 1, 2]
    assert members[2].learner_address == "spiral-learner-2.spiral-learner.spiral-celeba.svc:50051"
    assert members[2].replay_address.startswith("spiral-replaybuffer-2.spiral-replaybuffer.spiral-celeba.")
    assert members == discovery_module.predicted_members(3, "spiral-celeba")
    assert make_discovery(None).members() == {}, "without a population size nothing is assumed"
