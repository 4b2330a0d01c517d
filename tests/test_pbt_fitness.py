"""PBT fitness choices: reconstruction, the member's own discriminator, or one frozen reference discriminator."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from discriminator.training import DiscriminatorTrainer
from learner.population import (discriminator_fitness, fitness_for, heldout_fitness, load_reference_discriminator,
                                reference_discriminator_fitness)
from spiral.runtime.checkpoint import save_checkpoint
from spiral.config import ConfigError, load_experiment
from spiral.nets import build_discriminator, images_to_tensor

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


def unconditional(**pbt: object):  # noqa: ANN201
    return load_experiment(REPO / "experiments" / "tiny.yaml",
                           overrides={"env": {"conditional": False}, "pbt": {"population_size": 2, **pbt}})


def renders(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (6, 64, 64, 1), dtype=np.uint8)


def test_auto_fitness_is_reconstruction_when_conditional_and_critic_otherwise() -> None:
    conditional = load_experiment(REPO / "experiments" / "tiny.yaml", overrides={"pbt": {"population_size": 2}})
    assert conditional.pbt.fitness_kind(True) == "reconstruction"
    assert unconditional().pbt.fitness_kind(False) == "critic"
    assert fitness_for(unconditional()) is discriminator_fitness
    assert fitness_for(conditional) is heldout_fitness


@pytest.mark.parametrize("overrides, field", [
    ({"pbt": {"fitness": "loss"}}, "pbt.fitness"),
    ({"env": {"conditional": False}, "pbt": {"fitness": "reconstruction"}}, "pbt.fitness"),
    ({"pbt": {"reference_critic": "/tmp/critic.pt"}}, "pbt.reference_critic"),  # conditional: reconstruction
    ({"pbt": {"fitness_images": 0}}, "pbt.fitness_images"),
    ({"pbt": {"fitness_images": 32}}, "pbt.fitness_images"),  # retired: learner.eval_episodes
    ({"pbt": {"fitness_seed": 1}}, "pbt.fitness_seed"),  # retired: learner.eval_seed
    ({"pbt": {"population_size": 2}, "learner": {"eval_every_updates": 0}}, "learner.eval_every_updates"),
    ({"learner": {"eval_every_updates": -1}}, "learner.eval_every_updates"),
    ({"learner": {"eval_episodes": 1}}, "learner.eval_episodes"),
])
def test_fitness_config_errors_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_experiment(REPO / "experiments" / "tiny.yaml", overrides=overrides)


def test_every_member_is_scored_by_the_same_frozen_reference_discriminator(tmp_path: Path) -> None:
    cfg = unconditional()
    torch.manual_seed(0)
    trainer = DiscriminatorTrainer(cfg, build_discriminator(cfg))
    save_checkpoint(tmp_path / "reference", 7, {"trainer": trainer.state_dict()})
    from_dir = load_reference_discriminator(cfg, tmp_path / "reference")
    from_file = load_reference_discriminator(cfg, next((tmp_path / "reference").iterdir()))
    assert not any(p.requires_grad for p in from_dir.parameters())

    fitness = fitness_for(unconditional(reference_critic=str(tmp_path / "reference")))
    members = [SimpleNamespace(last_final_canvases=renders(seed), device="cpu") for seed in (1, 2)]
    with torch.no_grad():
        expected = [float(trainer.discriminator(images_to_tensor(m.last_final_canvases)).mean()) for m in members]
    assert [fitness(m) for m in members] == pytest.approx(expected, rel=1e-5)
    assert reference_discriminator_fitness(from_file)(members[0]) == pytest.approx(expected[0], rel=1e-5)
    assert expected[0] != pytest.approx(expected[1]), "different renders score differently"
    assert fitness(SimpleNamespace(last_final_canvases=None, device="cpu")) == 0.0


def test_a_bad_reference_discriminator_is_a_clear_error(tmp_path: Path) -> None:
    cfg = unconditional()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="pbt.reference_critic: no discriminator checkpoint"):
        load_reference_discriminator(cfg, tmp_path / "empty")
    with pytest.raises(ValueError, match="pbt.reference_critic: cannot read"):
        load_reference_discriminator(cfg, tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "other", 1, {"trainer": {"critic": {"bogus": torch.zeros(2)}}})
    with pytest.raises(ValueError, match="not a discriminator checkpoint of this experiment"):
        load_reference_discriminator(cfg, tmp_path / "other")
