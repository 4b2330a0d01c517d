"""The benchmarks run: each script, at toy sizes, prints its closing JSON line with its figures.

No wall time is asserted (these machines are noisy); only that every figure is there and is a
positive number, so a benchmark that broke is caught by ``make test`` and not by a user.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.unconditional import pixel_features
from learner.training import PolicyTrainer
from spiral.runtime.checkpoint import save_checkpoint
from spiral.config import load_experiment
from spiral.nets import build_policy

REPO = Path(__file__).resolve().parent.parent


def run_bench(*args: str) -> dict:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def synthetic_record(updates: int) -> list[dict]:
    """A learner.jsonl's rows at 4 updates/s: collapses at updates 50, 600 and 601, a spike at 700."""
    return [{"time": 100.0 + update / 4.0, "update": update, "grad_norm": 500.0 if update == 700 else 20.0,
             "paint_fraction": 0.01 if update in (50, 600, 601) else 0.5, "mean_entropy": 3.0,
             "policy_lag": 2.0, "clip_fraction": 0.1, "mean_reward": -1.0 if update == 10 else 0.2,
             "reward_critic": 0.2, "reconstruction_l2": 0.1 - update * 5e-5} for update in range(1, updates + 1)]


def test_env_throughput_bench_measures_every_renderer_and_the_actor_loop() -> None:
    figures = run_bench("-m", "bench.env_throughput", "--seconds", "0.3", "--num-envs", "4", "--renderer-envs",
                        "--skip-system")
    for key in ("libmypaint_steps_per_second_per_core_n4", "fast_steps_per_second_per_core_n4",
                "mujoco_steps_per_second_per_core_n4", "fast_over_libmypaint_n4", "fast_torch_steps_per_second_per_core_n4",
                "fast_torch_over_libmypaint_n4", "inprocess_actor_frames_per_second",
                "inprocess_training_frames_per_second"):
        assert figures[key] > 0, key


def test_policy_speed_bench_times_both_profiles() -> None:
    figures = run_bench("-m", "bench.policy_speed", "--config", "tiny", "mnist", "--num-envs", "2", "--batch", "2",
                        "--seconds", "0.05")
    assert [p["config"] for p in figures["profiles"]] == ["tiny", "mnist"]
    for profile in figures["profiles"]:
        for key in ("act_steps_per_s", "unroll_backward_ms", "baseline_unroll_backward_ms", "params"):
            assert profile[key] > 0, (profile["config"], key)
    assert figures["profiles"][1]["params"] > figures["profiles"][0]["params"], "the paper profile is the larger"


def test_learning_bench_scores_checkpoints_against_both_baselines(tmp_path: Path) -> None:
    cfg = load_experiment(REPO / "experiments" / "tiny.yaml")
    torch.manual_seed(1)
    trainer = PolicyTrainer(cfg, build_policy(cfg))
    path = save_checkpoint(tmp_path / "learner", 5, {"trainer": trainer.state_dict()})
    (tmp_path / "out" / "run").mkdir(parents=True)
    (tmp_path / "out" / "run" / "learner.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in synthetic_record(400)))
    figures = run_bench("-m", "bench.learning", "--out", str(tmp_path / "out"), "--evaluate", f"1={path}")
    assert set(figures) == {"baseline", "blank canvas", "untrained policy", "trained 1 min", "training record"}
    assert figures["training record"]["updates"] == 400
    figures.pop("training record")
    assert figures["baseline"] == {"name": "blank canvas", "l2": figures["blank canvas"]["l2"]}
    assert figures["trained 1 min"]["version"] == 5
    for row in figures.values():
        assert 0 < row["l2"] < 1
    for name in ("untrained policy", "trained 1 min"):
        row = figures[name]
        assert row["l2_greedy"] > 0
        assert row["l2_x"] == pytest.approx(row["l2"] / figures["blank canvas"]["l2"])
        assert 0 <= row["digit_match"] <= 1 and 0 <= row["digit_match_greedy"] <= 1
    assert (tmp_path / "out" / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "sequence.png").read_bytes()[:4] == b"\x89PNG"
    shutil.rmtree(tmp_path / "out")


def test_unconditional_bench_scores_faces_by_their_grey_pixels(tmp_path: Path) -> None:
    cfg = load_experiment(REPO / "experiments" / "tiny-celeba.yaml")
    torch.manual_seed(1)
    trainer = PolicyTrainer(cfg, build_policy(cfg))
    path = save_checkpoint(tmp_path / "learner", 7, {"trainer": trainer.state_dict()})
    figures = run_bench("-m", "bench.unconditional", "--config", "tiny-celeba", "--samples", "8",
                        "--out", str(tmp_path / "out"), "--evaluate", f"1={path}")
    assert figures["reference"]["features"] == "grey pixels pooled to 8x8" and "classifier" not in figures
    assert figures["real vs real"]["fid"] > 0 and figures["untrained policy"]["fid"] > 0
    trained = figures["trained 1 min"]
    assert trained["version"] == 7 and trained["meets_goal"] is None
    assert trained["ratio_to_untrained"] == pytest.approx(trained["fid"] / figures["untrained policy"]["fid"])
    assert (tmp_path / "out" / "samples-1min.png").read_bytes()[:4] == b"\x89PNG"


def test_pixel_features_pool_grey_images_to_an_8x8_grid() -> None:
    images = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    images[1, :8, :8] = 255  # one white cell in the top-left corner
    feats = pixel_features(images)
    assert feats.shape == (2, 64) and feats[0].max() == 0
    assert feats[1, 0] == 1.0 and feats[1, 1:].max() == 0


def test_learner_rpc_bench_measures_ingest_and_parameter_fetches() -> None:
    figures = run_bench("-m", "bench.learner_rpc", "--seconds", "1", "--clients", "1")
    for key in ("grpc_ingest_unrolls_per_second", "full_fetch_ms", "poll_ms", "inprocess_snapshot_ms",
                "parameter_bytes"):
        assert figures[key] > 0, key


def test_update_memory_bench_times_both_trainers_with_and_without_retained_memory() -> None:
    figures = run_bench("-m", "bench.update_memory", "--updates", "1")
    for what in ("policy_update", "discriminator_update"):
        for key in ("ms_default", "ms_retained", "speedup"):
            assert figures[f"{what}_{key}"] > 0, (what, key)
    assert figures["learner_frames_per_second_per_core_retained"] > 0


def test_update_speed_bench_reports_each_variant_against_the_measured_peak() -> None:
    figures = run_bench("-m", "bench.update_speed", "--config", "tiny", "mnist", "--batch", "2", "--updates", "1")
    assert figures["peak_gflops"]["fp32"] > 0 and figures["peak_gflops"]["bf16"] > 0
    for profile in ("tiny", "mnist"):
        variants = figures[profile]
        assert variants["eager fp32"]["ratio"] == 1.0
        for name in ("eager fp32", "eager bf16", "nchw fp32"):
            v = variants[name]
            assert v["frames_per_second_per_core"] > 0 and v["gflops"] > 0, (profile, name)
            assert 0 < v["fraction_of_peak"] < 1.5, (profile, name)
        assert variants["acting bf16"]["ratio"] > 0 and variants["acting fp32"]["steps_per_second_per_core"] > 0
        assert variants["discriminator bf16"]["ratio"] > 0 and variants["discriminator fp32"]["ms"] > 0
    assert figures["mnist"]["_meta"]["mflop_per_frame"] > figures["tiny"]["_meta"]["mflop_per_frame"]


def test_stroke_rewards_bench_pays_random_and_ink_strokes_at_every_pool() -> None:
    figures = run_bench("-m", "bench.stroke_rewards", "--targets", "8")
    for pool in (1, 2, 4, 8):
        for policy in ("random", "ink"):
            assert f"{policy}_paint_step_reward_pool{pool}" in figures, (policy, pool)
    assert figures["random_final_l2_over_blank"] > 0 and figures["ink_final_l2_over_blank"] > 0


def test_run_record_summarises_a_learners_per_update_record(tmp_path: Path) -> None:
    """Collapses after the warm-up are counted, the speed and the last quarter's error are read off."""
    rows = synthetic_record(1000)
    path = tmp_path / "learner.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    summary = run_bench("-m", "bench.run_record", str(path))[str(path)]
    assert summary["updates"] == 1000
    assert summary["updates_per_second"] == pytest.approx(4.0)
    assert summary["collapse_updates"] == 2, "update 50 is inside the warm-up"
    assert summary["lowest_paint_fraction"] == pytest.approx(0.01)
    assert summary["largest_grad_norm"] == 500.0
    assert summary["tail_mean_entropy"] == pytest.approx(3.0)
    assert summary["tail_clip_fraction"] == pytest.approx(0.1)
    assert summary["lowest_batch_return"] == -1.0
    assert summary["last_quarter_l2_start"] > summary["last_quarter_l2_end"]
