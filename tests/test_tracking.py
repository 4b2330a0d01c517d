"""Experiment tracking (``tracking``, :mod:`spiral.runtime.tracking`) and the code version a run records.

* The ``tracking`` section's bad values are refused with the field named.
* A real short run (``spiral local --updates N``) with ``tracking.backend: wandb`` in wandb's
  offline mode: each learner's TensorBoard scalars and sample grids land in its wandb run's
  files (read back from the run's ``.wandb`` log), the run id is kept in
  ``RUN_DIR/ROLE/tracking.json``, and the run resumed from its checkpoints logs into the same
  tracker runs.
* The code version: in a checkout it is git's commit; an image's baked ``_build_info.json``
  gives the commit, build time and image where git cannot (pure logic, a fake file); every role
  writes ``RUN_DIR/ROLE/code_version.json`` at start (a real service process, and ``spiral local``).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spiral.commands.cli import main as spiral_main
from spiral.config import ConfigError, load_experiment
from spiral.runtime import code_version as code_version_module
from spiral.runtime.code_version import CODE_RECORD_FILE, code_record, code_version
from spiral.runtime.tensorboard import TrainingBoard
from spiral.runtime.tracking import TRACKING_FILE, read_run_id, tracking_file, write_run_id

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "learner.batch_size=8", "--set", "learner.compile=false", "--set", "actor.num_envs=4",
        "--set", "replay.min_size=8", "--set", "discriminator_learner.batch_size=8",
        "--set", "learner.sample_grid_every_updates=2"]
"""``spiral local`` overrides of the tiny experiment that make an update cheap on 2 cores."""


# -- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("section, field", [
    ({"backend": "mlflow"}, "tracking.backend"),
    ({"mode": "sometimes"}, "tracking.mode"),
    ({"backend": "wandb", "project": " "}, "tracking.project"),
    ({"tags": ["ok", ""]}, r"tracking.tags\[1\]"),
    ({"projekt": "x"}, "tracking.projekt"),
])
def test_bad_tracking_settings_name_the_field(section: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_experiment("experiments/tiny.yaml", {"tracking": section})


def test_tracking_is_off_by_default() -> None:
    assert load_experiment("experiments/tiny.yaml").tracking.backend == "none"


def test_the_run_id_record_survives_and_refuses_a_foreign_file(tmp_path: Path) -> None:
    path = tracking_file(tmp_path, "learner")
    assert path == tmp_path / "learner" / TRACKING_FILE and read_run_id(path, "wandb") is None
    write_run_id(path, "wandb", "abc12345", name="tiny-learner")
    assert read_run_id(path, "wandb") == "abc12345"
    assert read_run_id(path, "other") is None, "a record of another backend starts a new run there"
    path.write_text("not json")
    with pytest.raises(ValueError, match="delete it"):
        read_run_id(path, "wandb")


class RecordingMirror:
    """A mirror that keeps what it is handed (the board's hook is pure logic)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, Any, int]] = []
        self.closed = False

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.rows.append(("scalars", dict(values), step))

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.rows.append(("image", (tag, image.shape), step))

    def encoded_image(self, tag: str, encoded: bytes, step: int) -> None:
        self.rows.append(("encoded", (tag, len(encoded)), step))

    def close(self) -> None:
        self.closed = True


def test_the_board_hands_every_write_to_its_mirror_by_tag_even_when_tensorboard_is_off(tmp_path: Path) -> None:
    mirror = RecordingMirror()
    blocked = tmp_path / "file"
    blocked.write_text("a file where the board's directory would go")
    board = TrainingBoard(blocked, "learner", mirror=mirror)  # the event file cannot be opened
    assert board.scalars({"pg_loss": 0.5, "update": 3, "nan": float("nan"), "name": "x"}, step=3) == 0
    assert not board.enabled
    board.image("samples/grid", np.zeros((4, 4, 3), np.uint8), step=3)
    board.encoded_image("samples/animation", b"GIF89a...", 4, 4, 3, step=3)
    board.close()
    assert mirror.rows == [("scalars", {"loss/pg_loss": 0.5}, 3), ("image", ("samples/grid", (4, 4, 3)), 3),
                           ("encoded", ("samples/animation", 9), 3)]
    assert mirror.closed


# -- wandb, offline -------------------------------------------------------------------------------

def wandb_records(path: Path) -> list[Any]:
    """The records of a wandb run log (``run-ID.wandb``): a LevelDB-style log of 32 KiB blocks
    after a 7-byte header, each chunk ``crc32, length, type`` (full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run log"
    block, position, chunks, records = 32768, 7, [], []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:  # padding up to the block's end
            position += left
            continue
        chunks.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def offline_runs(wandb_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """History rows of every offline run under ``wandb_dir``, by display name (a continued
    run's rows follow the earlier ones), each checked to carry its run id."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        records = wandb_records(path)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
        assert path.name == f"run-{run.run_id}.wandb"
        rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                for r in records if r.WhichOneof("record_type") == "history"]
        runs.setdefault(run.display_name, []).extend([{**row, "_run_id": run.run_id} for row in rows])
    return runs


def test_a_run_mirrors_its_tensorboard_to_wandb_offline_and_a_resume_continues_the_tracker_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="the tracking extra is not installed: pip install -e '.[tracking]'")
    wandb_dir = tmp_path / "wandb-files"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    tracking = ["--set", "tracking.backend=wandb", "--set", "tracking.mode=offline", "--set", "tracking.tags=[test]"]
    args = ["local", "--config", "tiny", "--run-dir", str(run_dir), *FAST, *tracking]

    assert spiral_main([*args, "--updates", "3"]) == 0
    ids = {role: read_run_id(tracking_file(run_dir, role), "wandb") for role in ("learner", "discriminator")}
    assert all(ids.values()) and len(set(ids.values())) == 2, ids
    runs = offline_runs(wandb_dir)
    assert set(runs) == {"tiny-learner", "tiny-discriminator"}, set(runs)
    learner_rows = runs["tiny-learner"]
    updates = [json.loads(line)["update"] for line in (run_dir / "learner.jsonl").read_text().splitlines()
               if "update" in json.loads(line)]
    logged = sorted({row["update"] for row in learner_rows if "loss/pg_loss" in row})
    assert logged == sorted(updates) and len(updates) >= 2, "every update's scalars reach the tracker"
    last = json.loads((run_dir / "learner.jsonl").read_text().splitlines()[-1])
    (row,) = [r for r in learner_rows if r.get("update") == last["update"] and "loss/pg_loss" in r]
    assert row["loss/pg_loss"] == pytest.approx(last["pg_loss"]), "the same value as the log and TensorBoard"
    assert any("samples/grid/_type" in r for r in learner_rows), "the sample grids reach the tracker as images"
    assert any(k.startswith("loss/") for r in runs["tiny-discriminator"] for k in r)
    assert {r["_run_id"] for r in learner_rows} == {ids["learner"]}

    # The run resumed from its checkpoints: the same tracker runs go on.
    assert spiral_main([*args, "--updates", "3"]) == 0
    assert {role: read_run_id(tracking_file(run_dir, role), "wandb") for role in ids} == ids
    runs = offline_runs(wandb_dir)
    assert len(list(wandb_dir.glob("wandb/offline-run-*"))) == 4, "two processes' worth of each role's run"
    continued = runs["tiny-learner"]
    assert {r["_run_id"] for r in continued} == {ids["learner"]}, "the resumed learner logs into the same run"
    assert max(r["update"] for r in continued) > max(logged), "and goes on from where it was"

    record = json.loads((run_dir / "local" / CODE_RECORD_FILE).read_text())
    assert record == {**code_version(), **({"image": os.environ["SPIRAL_IMAGE"]} if os.environ.get("SPIRAL_IMAGE")
                                           else {})}


# -- the code version ------------------------------------------------------------------------------

def test_the_build_info_gives_commit_build_time_and_image_where_git_cannot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "_build_info.json"
    monkeypatch.setattr(code_version_module, "BUILD_INFO_PATH", info)
    monkeypatch.setattr(code_version_module, "_git_commit", lambda: None)  # as in an image: no .git
    monkeypatch.delenv("SPIRAL_IMAGE", raising=False)
    assert code_record() == {"commit": "unknown", "source": "unknown", "version": code_version()["version"]}
    info.write_text(json.dumps({"commit": "0123abc", "built_at": "2026-12-07T18:00:00Z", "image": "spiral:0.1.0-cpu"}))
    assert code_record() == {"commit": "0123abc", "source": "build-info", "version": code_version()["version"],
                             "built_at": "2026-12-07T18:00:00Z", "image": "spiral:0.1.0-cpu"}
    monkeypatch.setenv("SPIRAL_IMAGE", "ghcr.io/spiral-rl/spiral:0.1.0-cuda")
    assert code_record()["image"] == "ghcr.io/spiral-rl/spiral:0.1.0-cuda", "the deployment's word wins"
    info.write_text(json.dumps({"commit": "", "built_at": "", "image": ""}))  # a build without the arguments
    assert code_record()["commit"] == "unknown" and "built_at" not in code_record()


def test_a_checkout_records_gits_commit() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    assert code_version() == {"commit": head.stdout.strip(), "source": "git", "version": code_version()["version"]}


def test_a_service_writes_its_code_version_into_its_role_directory_at_start(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "SPIRAL_IMAGE": "example.org/spiral:test", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "spiral.commands.cli", "replaybuffer", "--config", "tiny",
                                "--run-dir", str(run_dir), "--listen", "127.0.0.1:0", "--metrics-port", "0"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    path = run_dir / "replaybuffer" / CODE_RECORD_FILE
    try:
        deadline = time.monotonic() + 120
        while not path.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    assert path.exists(), f"no {path}; the replay buffer said:\n{output}"
    assert json.loads(path.read_text()) == {**code_version(), "image": "example.org/spiral:test"}
