"""bench.scene_probe, the supervised probe of the scene policy, at tiny sizes on real MuJoCo rendering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_probe_trains_each_variant_on_prior_programs_and_scores_its_placements(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.scene_probe", "--config", "experiments/tiny-scenes.yaml",
         "--set", "dataset.num_images=24", "--set", "dataset.holdout=8", "--set", f"dataset.cache_dir={tmp_path}",
         "--variants", "unframed-55", "framed-80-features", "--steps", "3", "--batch", "4", "--pool", "8",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert list(record["variants"]) == ["unframed-55", "framed-80-features"]
    for name, figures in record["variants"].items():
        assert figures["steps"] == 3 and figures["pool_episodes"] == 8, name
        assert figures["first_loss"] > 0 and figures["l2_greedy_x"] > 0, name
        placed = figures["placements_greedy"]
        assert placed["episodes"] == 8 and 0 < placed["chance"] < 1, name
    assert "env.mujoco.camera_pitch_degrees=55" in record["variants"]["unframed-55"]["set"]
    assert "on a target cell" in result.stdout
