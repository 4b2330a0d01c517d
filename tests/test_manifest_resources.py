"""The manifest harness's mapping of pod resources to cgroup limits, as the kubelet maps them (pure logic).

The containers themselves, and the limits read back from inside them, are checked in
tests/test_manifest_containers.py (``make image-test``).
"""

from __future__ import annotations

import pytest

from manifest_containers import CgroupLimits, cpu_cores, memory_bytes


@pytest.mark.parametrize(("quantity", "cores"), [("200m", 0.2), ("1", 1.0), (2, 2.0), ("1.5", 1.5), ("2500m", 2.5)])
def test_cpu_quantities(quantity: str | int, cores: float) -> None:
    assert cpu_cores(quantity) == pytest.approx(cores)


@pytest.mark.parametrize(("quantity", "size"), [("512Mi", 512 * 2**20), ("1Gi", 2**30), ("1536Mi", 1536 * 2**20),
                                                ("1G", 10**9), ("128k", 128_000), ("1e3", 1000), (4096, 4096)])
def test_memory_quantities(quantity: str | int, size: int) -> None:
    assert memory_bytes(quantity) == size


def test_limits_become_a_cfs_quota_a_memory_limit_and_shares() -> None:
    limits = CgroupLimits.of({"requests": {"cpu": "100m", "memory": "384Mi"}, "limits": {"cpu": "200m",
                                                                                          "memory": "1Gi"}})
    assert limits == CgroupLimits(cpu_quota_us=20_000, cpu_shares=102, memory_bytes=2**30)
    assert limits.docker_args() == ["--cpu-period", "100000", "--cpu-quota", "20000", "--cpu-shares", "102",
                                    "--memory", str(2**30), "--memory-swap", str(2**30)]


def test_a_cpu_limit_alone_is_also_the_request_and_tiny_requests_get_the_kernels_minimum() -> None:
    assert CgroupLimits.of({"limits": {"cpu": "800m"}}).cpu_shares == 819  # the API server defaults request=limit
    assert CgroupLimits.of({"requests": {"cpu": "1m"}}).cpu_shares == 2
    assert CgroupLimits.of({"requests": {"cpu": "1m"}}).cpu_quota_us is None  # no limit: no quota


def test_no_resources_no_limits() -> None:
    assert CgroupLimits.of({}) == CgroupLimits()
    assert CgroupLimits.of({}).docker_args() == []
