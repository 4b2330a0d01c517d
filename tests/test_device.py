"""Learners train on the device they are given, and one they cannot have stops them at start.

``--device`` (else ``SPIRAL_DEVICE``, else ``cpu``) reaches both learners of ``spiral learner``,
``spiral discriminator``, ``spiral up`` and ``spiral local``, never the actors; a device this
machine lacks is refused with a message that says so, before anything runs. The tests that ask
for a GPU where there is none skip on a GPU machine (tests/test_cuda.py covers that side).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.learner import PolicyLearner
from spiral.commands.cli import main as spiral_main
from spiral.commands.layout import LEARNER_ROLES, plan_layout
from spiral.config import experiment_path, load_experiment
from spiral.runtime.device import DeviceUnavailable, host_to_device, read_floats, training_device
from spiral.runtime.service_options import add_device_argument, device_setting

ROOT = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: nothing to refuse")


def device_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_device_argument(parser)
    return parser.parse_args(list(argv))


def test_the_flag_wins_over_spiral_device_which_wins_over_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIRAL_DEVICE", raising=False)
    assert device_setting(device_args()) == ("cpu", "the default device")
    monkeypatch.setenv("SPIRAL_DEVICE", "cuda:1")
    assert device_setting(device_args()) == ("cuda:1", "SPIRAL_DEVICE")
    assert device_setting(device_args("--device", "cpu")) == ("cpu", "--device")


@pytest.mark.parametrize("name, problem", [("gpu", "is not a torch device"), ("cuda:x", "is not a torch device"),
                                           ("meta", "is no device a learner trains on")])
def test_a_name_that_is_no_training_device_is_refused_naming_where_it_came_from(name: str, problem: str) -> None:
    with pytest.raises(DeviceUnavailable, match=problem) as refused:
        training_device(name, "SPIRAL_DEVICE")
    assert str(refused.value).startswith(f"SPIRAL_DEVICE: {name!r}")


def test_the_cpu_is_always_a_training_device() -> None:
    assert training_device("cpu") == torch.device("cpu")


@no_gpu
def test_cuda_without_a_gpu_is_refused_and_never_replaced_by_the_cpu() -> None:
    with pytest.raises(DeviceUnavailable, match="no CUDA device is available") as refused:
        training_device("cuda", "--device")
    assert "does not fall back to the CPU" in str(refused.value)


@no_gpu
def test_a_learner_built_for_a_missing_gpu_refuses_before_building_anything(tmp_path: Path) -> None:
    cfg = load_experiment(experiment_path("tiny"))
    with pytest.raises(DeviceUnavailable, match="learner device: 'cuda'"):
        PolicyLearner(cfg, tmp_path / "run", device="cuda")
    assert not (tmp_path / "run").exists()


@no_gpu
@pytest.mark.parametrize("role, how", [("learner", "flag"), ("discriminator", "variable")])
def test_a_learner_process_asked_for_a_missing_gpu_exits_at_start_saying_so(tmp_path: Path, role: str,
                                                                            how: str) -> None:
    env = {**os.environ, "SPIRAL_DEVICE": "cuda"} if how == "variable" else dict(os.environ)
    argv = [sys.executable, "-m", "spiral.commands.cli", role, "--config", "tiny", "--run-dir", str(tmp_path),
            "--metrics-port", "0", "--listen", "127.0.0.1:0", *(["--device", "cuda"] if how == "flag" else [])]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    source = "--device" if how == "flag" else "SPIRAL_DEVICE"
    assert f"spiral {role}: {source}: 'cuda' was asked for, but no CUDA device is available" in done.stderr
    assert "Traceback" not in done.stderr


@no_gpu
@pytest.mark.parametrize("command", ["up", "local"])
def test_up_and_local_refuse_a_missing_gpu_before_starting_or_writing_anything(
        tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert spiral_main([command, "--config", "tiny", "--runs-dir", str(tmp_path), "--device", "cuda"]) == 2
    assert f"spiral {command}: --device: 'cuda' was asked for, but no CUDA device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("population, shared", [(1, False), (2, True)])
def test_spiral_up_gives_the_device_to_the_learners_and_to_no_other_process(tmp_path: Path, population: int,
                                                                           shared: bool) -> None:
    cfg = load_experiment(experiment_path("tiny"), overrides={"pbt": {"population_size": population,
                                                                       "shared_discriminator": shared}})
    layout = plan_layout(cfg, experiment_path("tiny"), tmp_path, num_actors=2, population=population, device="cuda:1")
    for spec in layout.processes:
        if spec.role in LEARNER_ROLES:
            assert spec.args[spec.args.index("--device") + 1] == "cuda:1", spec.name
        else:
            assert "--device" not in spec.args, f"{spec.name} (a {spec.role}) has no device to choose"
    assert {s.role for s in layout.processes if "--device" in s.args} == set(LEARNER_ROLES)


def test_on_the_cpu_a_host_array_becomes_a_tensor_without_a_copy() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = host_to_device(array, torch.device("cpu"))
    assert tensor.data_ptr() == array.__array_interface__["data"][0]
    assert host_to_device(tensor, torch.device("cpu")) is tensor


def test_figures_are_read_back_as_exactly_the_floats_float_gives() -> None:
    weights = torch.randn(5, requires_grad=True)
    figures = {"loss": (weights * 1.1).sum(), "bf16": torch.tensor(0.1, dtype=torch.bfloat16),
               "count": torch.tensor(7), "plain": 0.25, "nan": float("nan"), "mean": torch.rand(100).mean()}
    read = read_floats(figures)
    assert list(read) == list(figures)
    for name, value in figures.items():
        expected = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        assert read[name] == expected or (np.isnan(read[name]) and np.isnan(expected)), name
        assert type(read[name]) is float
