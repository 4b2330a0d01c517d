"""The export format: a trained policy packed to hand over, without the learner's training state.

A learner checkpoint (``torch.save`` of the trainer: weights, Adam moments, hyperparameters)
is for resuming. An export is for painting, and for other code: everything it holds is an open
format. ``spiral export`` writes a directory::

    DIR/
      export.json                 the manifest, written last: what is here, and where it came from
      policy.safetensors          the trained policy weights (safetensors, float32)
      policy_average.safetensors  their moving average, where the run kept one
                                  (learner.policy_average_decay > 0)
      experiment.yaml             the resolved experiment: the architecture, the environment
      action_spec.json            the action heads in sampling order and the mask of each flag

``export.json`` names each file with its size and SHA-256, the parameter version, frames and
updates of the checkpoint it came from, spiral's version and the code's commit
(:func:`spiral.runtime.code_version.code_version`). Each file is written atomically and the
manifest last, so a directory either reads as a whole export or as none (a rewrite first
removes the old manifest). :func:`read_export` checks the manifest and, when weights are
loaded, their checksums.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load, save

from spiral.config import ExperimentConfig, to_dict
from spiral.envs import action_spec_for
from spiral.envs.spec import ActionSpec
from spiral.runtime.atomic import atomic_write_bytes
from spiral.runtime.code_version import code_version

EXPORT_FORMAT = "spiral-export"
"""The manifest's ``format``: what tells an export directory from any other."""
EXPORT_FORMAT_VERSION = 1
"""The layout version this code writes and the newest it reads."""
MANIFEST_NAME = "export.json"
EXPERIMENT_NAME = "experiment.yaml"
ACTION_SPEC_NAME = "action_spec.json"
WEIGHT_FILES: Mapping[str, str] = {"policy": "policy.safetensors", "policy_average": "policy_average.safetensors"}
"""Weight set (the learner checkpoint's trainer key) -> its file in an export."""


class ExportError(ValueError):
    """A directory that is no (readable) export, or one an export may not be written into."""


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding an export manifest."""
    return (Path(path) / MANIFEST_NAME).is_file()


def action_spec_document(spec: ActionSpec) -> dict[str, Any]:
    """The action spec as JSON: heads in autoregressive sampling order, and each flag value's mask."""
    return {
        "heads": [{"name": h.name, "num_values": h.num_values, "spatial": h.spatial, "grid_size": h.grid_size}
                  for h in spec.heads],
        "flag_masks": [list(mask) for mask in spec.flag_masks],
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_export(out_dir: str | Path, cfg: ExperimentConfig, weights: Mapping[str, Mapping[str, torch.Tensor]],
                 policy_version: int, training: Mapping[str, int], source: str) -> Path:
    """Write an export of ``weights`` into ``out_dir``; returns the manifest's path.

    Args:
        out_dir: The export directory: new, empty, or an earlier export (replaced).
        cfg: The experiment the weights were trained for (written resolved, as YAML).
        weights: ``"policy"`` (required) and ``"policy_average"`` (optional) state dicts.
        policy_version: The parameter version of the checkpoint the weights come from.
        training: What the checkpoint says of its training (``frames``, ``updates``).
        source: Where the weights came from (a checkpoint path), recorded in the manifest.

    Raises:
        ExportError: ``out_dir`` is a file, or a non-empty directory that is not an export, or
            ``weights`` has no ``policy`` or an unknown weight set.
        OSError: a file cannot be written.
    """
    out = Path(out_dir)
    if "policy" not in weights or set(weights) - set(WEIGHT_FILES):
        raise ExportError(f"an export holds {sorted(WEIGHT_FILES)} weights with 'policy' among them, got {sorted(weights)}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise ExportError(f"{out}: not empty and not an export; refusing to write into it (choose a new --out)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # until the new manifest lands, this is no export
    metadata = {"format": "pt", "spiral_export": str(EXPORT_FORMAT_VERSION), "policy_version": str(policy_version)}
    files: dict[str, dict[str, Any]] = {}
    for name, file_name in WEIGHT_FILES.items():
        if name not in weights:
            (out / file_name).unlink(missing_ok=True)  # a previous export's, not this checkpoint's
            continue
        tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in weights[name].items()}
        data = save(tensors, metadata=metadata)
        atomic_write_bytes(out / file_name, data)
        files[name] = {"file": file_name, "bytes": len(data), "sha256": _sha256(data)}
    documents = {
        EXPERIMENT_NAME: yaml.safe_dump(to_dict(cfg), sort_keys=False).encode(),
        ACTION_SPEC_NAME: (json.dumps(action_spec_document(action_spec_for(cfg)), indent=2) + "\n").encode(),
    }
    for file_name, data in documents.items():
        atomic_write_bytes(out / file_name, data)
    code = code_version()
    manifest = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "spiral_version": code["version"],
        "code": code,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "policy_version": int(policy_version),
        **{key: int(value) for key, value in training.items()},
        "experiment": EXPERIMENT_NAME,
        "action_spec": ACTION_SPEC_NAME,
        "weights": files,
    }
    atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    return out / MANIFEST_NAME


@dataclass(frozen=True)
class Export:
    """An export directory read back (:func:`read_export`).

    Attributes:
        directory: The export directory.
        manifest: ``export.json``, parsed.
    """

    directory: Path
    manifest: Mapping[str, Any]

    @property
    def policy_version(self) -> int:
        return int(self.manifest["policy_version"])

    @property
    def experiment_path(self) -> Path:
        """The resolved experiment the policy was trained for."""
        return self.directory / str(self.manifest["experiment"])

    @property
    def weight_sets(self) -> tuple[str, ...]:
        """The weight sets the export holds: ``policy`` and, where kept, ``policy_average``."""
        return tuple(self.manifest["weights"])

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """The state dict of weight set ``name``, its checksum verified.

        Raises:
            ExportError: the export has no such set, or its file is missing, changed or unreadable.
        """
        entry = self.manifest["weights"].get(name)
        if entry is None:
            raise ExportError(f"{self.directory}: the export holds no {name!r} weights (it has {list(self.weight_sets)})")
        path = self.directory / str(entry["file"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ExportError(f"{path}: cannot read the export's {name!r} weights: {exc}") from exc
        if _sha256(data) != entry["sha256"]:
            raise ExportError(f"{path}: its SHA-256 differs from the one in {MANIFEST_NAME}: the file was changed "
                              "or damaged after the export was written")
        try:
            return load(data)
        except SafetensorError as exc:
            raise ExportError(f"{path}: not a readable safetensors file: {exc}") from exc


def read_export(path: str | Path) -> Export:
    """Read and check an export directory's manifest (weights are read on demand, :meth:`Export.weights`).

    Raises:
        ExportError: no manifest, a manifest of another format or a newer layout, or files it
            names that are missing.
    """
    directory = Path(path)
    manifest_path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise ExportError(f"{directory}: not an export (no {MANIFEST_NAME})") from exc
    except (OSError, ValueError) as exc:
        raise ExportError(f"{manifest_path}: unreadable export manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{manifest_path}: not a {EXPORT_FORMAT} manifest")
    layout = manifest.get("format_version")
    if not isinstance(layout, int) or layout > EXPORT_FORMAT_VERSION:
        raise ExportError(f"{manifest_path}: export layout version {layout!r}; this spiral reads versions up to "
                          f"{EXPORT_FORMAT_VERSION} (upgrade spiral)")
    weights = manifest.get("weights")
    if not isinstance(weights, dict) or "policy" not in weights:
        raise ExportError(f"{manifest_path}: the manifest names no 'policy' weights")
    named = [str(manifest.get("experiment")), *(str(entry.get("file")) for entry in weights.values())]
    missing = [name for name in named if not (directory / name).is_file()]
    if missing:
        raise ExportError(f"{directory}: the export is incomplete, missing {missing}")
    return Export(directory=directory, manifest=manifest)
