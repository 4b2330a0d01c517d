"""``bench/gpu_check.sh``'s dry run: every step of both calls on this CPU, so the GPU check cannot rot.

``--device cpu --quick`` runs what a GPU machine runs (the install, ``pytest -m cuda``, the
update-speed benchmark, the system grown through its actor counts) at tiny sizes, installing
nothing, and writes the same ``STEP.log`` / ``STEP.json`` files into ``$OUT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(call: str, out: Path) -> dict[str, dict[str, Any]]:
    """Run ``bench/gpu_check.sh CALL --device cpu --quick``; its steps' JSON summaries by step."""
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    done = subprocess.run(["bench/gpu_check.sh", call, "--device", "cpu", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("*.log")))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{logs}"
    summaries = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    for step, summary in summaries.items():
        assert summary["ok"] is True and summary["step"] == step, summary
        assert (out / f"{step}.log").exists(), f"{step} wrote no log"
    return summaries


def test_call1_installs_runs_the_cuda_tests_and_times_the_update_on_each_profile_and_precision(
        tmp_path: Path) -> None:
    summaries = dry_run("call1", tmp_path)
    assert set(summaries) == {"install", "cuda_tests", "update_speed"}
    assert summaries["install"]["imports"] == "ok" and summaries["install"]["versions"]["torch"]
    tests = summaries["cuda_tests"]
    assert tests["passed"] + tests["skipped"] >= 8 and tests["failed"] == tests["errors"] == 0
    speed = summaries["update_speed"]["results"]
    assert speed["device"] == "cpu" and speed["peak_gflops"]["fp32"] > 0 and speed["peak_gflops"]["bf16"] > 0
    for profile in ("tiny", "mnist"):
        for variant in ("eager fp32", "eager bf16"):
            assert speed[profile][variant]["ms"] > 0, (profile, variant)


@pytest.mark.slow
def test_call2_grows_the_systems_actors_and_records_throughput_lag_and_cpu_per_count(tmp_path: Path) -> None:
    summaries = dry_run("call2", tmp_path)
    assert set(summaries) == {"install", "actor_scaling"}
    scaling = summaries["actor_scaling"]
    assert scaling["renderer"] == "fast" and scaling["results"]["renderer"] == "fast"
    results = scaling["results"]
    assert results["warmup"]["complete"] and results["device"] == "cpu"
    assert [count["actors"] for count in results["counts"]] == [1, 2]
    for count in results["counts"]:
        assert count["frames_per_second"] > 0 and count["learner_updates_per_second"] > 0, count
        assert count["policy_lag_mean"] is not None and count["gpu"] is None  # no nvidia-smi here
        assert {"learner", "discriminator", "replaybuffer", "actor"} <= set(count["cpu_percent"]["per_role"])
    assert (tmp_path / "actor_scaling_learner.log").exists()
