"""``spiral export``: real checkpoints exported to real files, read back, and painted with by ``spiral sample``."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from learner.training import PolicyTrainer
from spiral.commands.cli import main as spiral_main
from spiral.config import ExperimentConfig, dump_experiment, load_experiment
from spiral.envs import action_spec_for
from spiral.evaluation.export import action_spec_document, read_export
from spiral.nets import build_policy
from spiral.runtime.checkpoint import save_checkpoint

from test_sample import REPO_ROOT, TINY, tiny

torch.set_num_threads(1)


def make_run(run_dir: Path, cfg: ExperimentConfig, version: int = 9) -> Path:
    """A ``spiral up``-shaped run directory with one learner checkpoint.

    The weights are a seeded policy's; where the config keeps an average, it holds another
    seed's weights, so painting with the average visibly differs from painting with the weights.
    Both favour painting over moving (the flag head's bias), so greedy episodes paint too.
    """
    run_dir.mkdir(parents=True)
    dump_experiment(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)
    trainer = PolicyTrainer(cfg, build_policy(cfg))
    if trainer.average is not None:
        torch.manual_seed(1)
        trainer.average.module.load_state_dict(build_policy(cfg).state_dict())
    with torch.no_grad():
        for policy in (trainer.policy, *(() if trainer.average is None else (trainer.average.module,))):
            policy.heads[0].bias.copy_(torch.tensor([0.0, 2.0]))  # flag: move, paint
    return save_checkpoint(run_dir / "learner", version, {"trainer": trainer.state_dict(), "frames": 1440,
                                                          "updates": version, "critic_version": 0})


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conditional MNIST run (experiments/tiny.yaml) that keeps the weights' moving average."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    make_run(run_dir, tiny(learner={"policy_average_decay": 0.99}))
    return run_dir


@pytest.fixture(scope="module")
def exported(averaged_run: Path) -> Path:
    out = averaged_run.parent / "exported"
    assert spiral_main(["export", str(averaged_run), "--out", str(out)]) == 0
    return out


def sample(source: Path, out: Path, *flags: str) -> dict[str, np.ndarray]:
    """``spiral sample SOURCE`` (4 held-out MNIST digits, libmypaint, seed 5): canvases and programs."""
    assert spiral_main(["sample", str(source), "--num", "4", "--seed", "5", "--out", str(out), *flags]) == 0
    with np.load(out / "canvases.npz") as archive:
        painted = {key: archive[key] for key in archive.files}
    painted["programs"] = np.array([p.read_text() for p in sorted((out / "programs").glob("*.json"))])
    return painted


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_an_export_paints_exactly_what_its_checkpoint_paints(averaged_run: Path, exported: Path, tmp_path: Path,
                                                             greedy: bool) -> None:
    mode = ["--greedy"] if greedy else []
    painted = {}
    for average in (False, True):
        flags = [*mode, *(["--average"] if average else [])]
        from_run = sample(averaged_run, tmp_path / f"run-{average}", *flags)
        from_export = sample(exported, tmp_path / f"export-{average}", *flags)
        assert set(from_run) == set(from_export) == {"canvases", "targets", "programs"}
        for key in from_run:
            np.testing.assert_array_equal(from_export[key], from_run[key])  # bit for bit, program for program
        assert (from_run["canvases"] < 255).any()  # the policy paints
        painted[average] = from_run["canvases"]
    assert not np.array_equal(painted[False], painted[True])  # --average picked the other weights


def test_the_export_holds_open_files_that_read_back(averaged_run: Path, exported: Path) -> None:
    checkpoint = sorted((averaged_run / "learner").glob("ckpt-*.pt"))[-1]
    trainer = torch.load(checkpoint, weights_only=True)["state"]["trainer"]
    assert sorted(p.name for p in exported.iterdir()) == ["action_spec.json", "experiment.yaml", "export.json",
                                                          "policy.safetensors", "policy_average.safetensors"]
    for name in ("policy", "policy_average"):
        tensors = load_file(exported / f"{name}.safetensors")
        assert tensors.keys() == trainer[name].keys()
        for key, tensor in tensors.items():
            assert tensor.dtype == trainer[name][key].dtype and torch.equal(tensor, trainer[name][key]), key
        with safe_open(exported / f"{name}.safetensors", framework="pt") as handle:
            assert handle.metadata()["policy_version"] == "9"

    cfg = load_experiment(averaged_run / "config.yaml")
    assert load_experiment(exported / "experiment.yaml") == cfg
    assert yaml.safe_load((exported / "experiment.yaml").read_text())["dataset"]["name"] == "mnist"
    spec = json.loads((exported / "action_spec.json").read_text())
    assert spec == action_spec_document(action_spec_for(cfg))
    assert [head["name"] for head in spec["heads"]] == ["flag", "end", "control"]
    assert spec["heads"][1] == {"name": "end", "num_values": 64, "spatial": True, "grid_size": 8}

    manifest = json.loads((exported / "export.json").read_text())
    assert manifest["format"] == "spiral-export" and manifest["format_version"] == 1
    assert (manifest["policy_version"], manifest["frames"], manifest["updates"]) == (9, 1440, 9)
    assert manifest["source"] == f"{averaged_run / 'learner'} (newest)"
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert manifest["code"] == {"commit": head, "source": "git", "version": manifest["spiral_version"]}
    for name, entry in manifest["weights"].items():
        data = (exported / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest(), name
    assert read_export(exported).weight_sets == ("policy", "policy_average")


def test_a_checkpoint_without_an_average_exports_without_one_and_average_fails_clearly(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    checkpoint = make_run(run_dir, tiny(env={"conditional": False}), version=4)
    out = tmp_path / "exported"
    assert spiral_main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert f"exported policy version 4 from {checkpoint}" in capsys.readouterr().out
    assert not (out / "policy_average.safetensors").exists()
    assert list(json.loads((out / "export.json").read_text())["weights"]) == ["policy"]
    assert spiral_main(["sample", str(out), "--num", "2", "--out", str(tmp_path / "s"), "--average"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spiral sample: error:") and "Traceback" not in err
    assert f"export {out}: --average, but it holds no averaged policy" in err and "policy_average_decay 0" in err


def test_exporting_over_an_export_replaces_it(averaged_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    assert spiral_main(["export", str(averaged_run), "--out", str(out)]) == 0
    assert (out / "policy_average.safetensors").is_file()
    plain = tmp_path / "plain"
    make_run(plain, tiny(), version=3)
    assert spiral_main(["export", str(plain), "--out", str(out)]) == 0
    assert not (out / "policy_average.safetensors").exists()  # the earlier export's, not this one's
    assert read_export(out).policy_version == 3 and read_export(out).weight_sets == ("policy",)


def check_fails(command: str, argv: list[str], capsys: pytest.CaptureFixture[str], *fragments: str) -> None:
    assert spiral_main([command, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spiral {command}: error:") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_inputs_are_named_and_exit_2(averaged_run: Path, exported: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    check_fails("export", [str(tmp_path / "nowhere"), "--out", out], capsys,
                "nowhere: no such run directory, checkpoint file or export directory")
    stray = tmp_path / "stray"
    stray.mkdir()
    for command in ("export", "sample"):
        check_fails(command, [str(stray), "--out", out], capsys,
                    "stray: neither a run directory (it has no learner/ checkpoints) nor an export (no export.json)")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    check_fails("export", [str(tmp_path / "junk.pt"), "--config", str(TINY), "--out", out], capsys,
                "junk.pt: not a readable checkpoint")
    dump_experiment(tiny(env={"conditional": False}), tmp_path / "other.yaml")
    check_fails("export", [str(averaged_run), "--config", str(tmp_path / "other.yaml"), "--out", out], capsys,
                "not a learner checkpoint of", "other.yaml")
    check_fails("export", [str(exported), "--out", out], capsys, "already an export")
    (stray / "notes.txt").write_text("mine")
    check_fails("export", [str(averaged_run), "--out", str(stray)], capsys, "stray: not empty and not an export")
    assert (stray / "notes.txt").read_text() == "mine"
    assert not Path(out).exists()

    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    data = bytearray((damaged / "policy.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "policy.safetensors").write_bytes(bytes(data))
    check_fails("sample", [str(damaged), "--out", out], capsys, "policy.safetensors: its SHA-256 differs")
    (damaged / "policy_average.safetensors").unlink()
    check_fails("sample", [str(damaged), "--out", out], capsys, "the export is incomplete, missing",
                "policy_average.safetensors")
    manifest = json.loads((damaged / "export.json").read_text())
    (damaged / "export.json").write_text(json.dumps({**manifest, "format_version": 99}))
    check_fails("sample", [str(damaged), "--out", out], capsys, "export layout version 99")


def test_code_version_reads_the_baked_build_info_without_git(tmp_path: Path) -> None:
    """An image has no .git: the commit comes from spiral/_build_info.json, else it is unknown."""
    package = tmp_path / "image" / "spiral"
    (package / "runtime").mkdir(parents=True)
    for name in ("__init__.py", "runtime/__init__.py", "runtime/code_version.py"):
        shutil.copy(REPO_ROOT / "spiral" / name, package / name)
    probe = ["-c", "import json, spiral.runtime.code_version as c; print(json.dumps(c.code_version()))"]

    def version() -> dict[str, str]:
        result = subprocess.run([sys.executable, *probe], cwd=tmp_path, env={"PYTHONPATH": str(package.parent)},
                                capture_output=True, text=True, timeout=120, check=True)
        return json.loads(result.stdout)

    found = version()
    assert (found["commit"], found["source"]) == ("unknown", "unknown") and found["version"]
    (package / "_build_info.json").write_text(json.dumps({"commit": "0123abc", "image": "spiral:0.1.0-cpu"}))
    assert version() == {"commit": "0123abc", "source": "build-info", "version": found["version"]}
