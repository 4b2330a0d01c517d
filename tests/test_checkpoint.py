"""Atomic checkpoints: round trip, newest wins, torn files are skipped, old ones pruned."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spiral.runtime.checkpoint import checkpoint_version, latest_checkpoint, list_checkpoints, save_checkpoint


def test_round_trip_and_newest_wins(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 3, {"w": torch.ones(2), "step": 3})
    save_checkpoint(tmp_path, 7, {"w": torch.zeros(2), "step": 7, "nested": {"lr": 1e-4}})
    version, state = latest_checkpoint(tmp_path)  # type: ignore[misc]
    assert version == 7
    assert torch.equal(state["w"], torch.zeros(2))
    assert state["nested"]["lr"] == 1e-4


def test_torn_newest_file_falls_back_to_previous(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"step": 1})
    (tmp_path / "ckpt-000000000002.pt").write_bytes(b"torn")
    version, state = latest_checkpoint(tmp_path)  # type: ignore[misc]
    assert (version, state["step"]) == (1, 1)


def test_keeps_only_the_newest(tmp_path: Path) -> None:
    for v in range(6):
        save_checkpoint(tmp_path, v, {"step": v}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000000004.pt", "ckpt-000000000005.pt"]
    assert not list(tmp_path.glob(".*tmp*"))


def test_empty_directory_has_no_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None


def test_the_version_is_read_from_the_file_name(tmp_path: Path) -> None:
    assert checkpoint_version(save_checkpoint(tmp_path, 1234, {"step": 1})) == 1234
    with pytest.raises(ValueError, match="not a checkpoint file name"):
        checkpoint_version(tmp_path / "ckpt-12.pt")
