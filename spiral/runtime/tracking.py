"""An experiment tracker that mirrors a learner's TensorBoard: ``tracking.backend: wandb``.

TensorBoard stays the record (:mod:`spiral.runtime.tensorboard`); a :class:`BoardMirror` is
the hook a :class:`~spiral.runtime.tensorboard.TrainingBoard` calls with what it has just
written, the same tags at the same step, so whatever reaches TensorBoard reaches the tracker
too, with no call site of its own.

Each learner process (the policy learner and the discriminator, of each population member) is
one tracker run, named ``NAME-ROLE[-MEMBER]`` and grouped by the experiment's name. Its id is
kept in ``RUN_DIR/ROLE/tracking.json`` (next to the role's checkpoints), so a learner restarted
on the same run directory (a resumed run, a rescheduled pod) continues the same tracker run
instead of starting a new one (``spiral local`` runs both learners in one process: two
runs side by side). The run's config is the resolved experiment plus the code
version (:func:`spiral.runtime.code_version.code_version`).

Steps: every row carries ``update`` (the learner's parameter version, TensorBoard's step) and
the tracker plots against it, so a learner that resumes from a checkpoint older than its last
logged update still logs (the tracker's own step only counts rows).

Like TensorBoard, a tracker is an observer: a failure after start (no network, a full disk) logs
one warning and turns the mirror off; training goes on. Asking for a backend whose package is
not installed stops the learner at start, with the field and the package named.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import string
import threading
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from spiral.config import ConfigError, ExperimentConfig, to_dict
from spiral.runtime.atomic import atomic_write_bytes
from spiral.runtime.code_version import code_version

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
"""The tracker run a role's run directory belongs to: ``RUN_DIR/ROLE/tracking.json``."""
STEP_KEY = "update"
"""The key of every row that holds the step (the learner's parameter version)."""


class BoardMirror(Protocol):
    """What a :class:`~spiral.runtime.tensorboard.TrainingBoard` hands on after each write."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Scalars by TensorBoard tag (``loss/pg_loss``: value) at ``step``."""

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A uint8 ``[H, W, C]`` or ``[H, W]`` picture at ``step``."""

    def encoded_image(self, tag: str, encoded: bytes, step: int) -> None:
        """An encoded picture (a PNG, or an animated GIF) at ``step``."""

    def close(self) -> None:
        """Finish the tracker run (it can be continued later)."""


def tracking_file(run_dir: Path, role: str) -> Path:
    """``RUN_DIR/ROLE/tracking.json``: where a role keeps its tracker run's id."""
    return Path(run_dir) / role / TRACKING_FILE


def read_run_id(path: Path, backend: str) -> str | None:
    """The run id :func:`tracking_file` keeps for ``backend``, or None when there is none yet.

    Raises:
        ValueError: The file exists but is not one this module wrote.
    """
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a tracking record ({exc}); delete it to start a new tracker run") from exc
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str) or not record["run_id"]:
        raise ValueError(f"{path}: no run_id in it; delete it to start a new tracker run")
    if record.get("backend") != backend:
        return None  # the run was tracked elsewhere before: a new run on this backend
    return str(record["run_id"])


def write_run_id(path: Path, backend: str, run_id: str, **details: str) -> None:
    """Keep ``run_id`` in ``path`` (atomically: a crash leaves the old record or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"backend": backend, "run_id": run_id, **details}
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())


def new_run_id() -> str:
    """A fresh tracker run id: 8 lowercase letters and digits (wandb's own form)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def open_mirror(cfg: ExperimentConfig, run_dir: Path, role: str, member: int | str = 0) -> BoardMirror | None:
    """The tracker mirror of one learner process, or None with ``tracking.backend: none``.

    Args:
        cfg: The experiment (its ``tracking`` section; the whole of it becomes the run's config).
        run_dir: The service's run directory.
        role: ``learner`` or ``discriminator``.
        member: Population member index.

    Raises:
        ConfigError: The backend's package is not installed.
    """
    if cfg.tracking.backend == "none":
        return None
    if cfg.tracking.backend == "wandb":
        return WandbMirror.start(cfg, run_dir, role, member)
    raise ConfigError(f"tracking.backend: unknown backend {cfg.tracking.backend!r}")  # validate() refuses it first


class WandbMirror:
    """A Weights & Biases run mirroring one learner's TensorBoard; never raises into training.

    Use :meth:`start`, which creates or continues the run.
    """

    def __init__(self, run: Any, wandb: Any) -> None:
        self._run = run
        self._wandb = wandb
        self._lock = threading.Lock()
        self._disabled = False

    @classmethod
    def start(cls, cfg: ExperimentConfig, run_dir: Path, role: str, member: int | str) -> "WandbMirror | None":
        """Create the tracker run, or continue the one ``RUN_DIR/ROLE/tracking.json`` names.

        Returns None (after a warning) when the tracker cannot start: training goes on without it.

        Raises:
            ConfigError: wandb is not installed.
        """
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError("tracking.backend: wandb is not installed (pip install 'spiral[tracking]'), "
                              f"or set tracking.backend: none ({exc})") from exc
        tracking = cfg.tracking
        path = tracking_file(run_dir, role)
        name = cfg.name + "-" + role + ("" if str(member) == "0" else f"-{member}")
        try:
            run_id = read_run_id(path, "wandb")
            resumed = run_id is not None
            if run_id is None:
                run_id = new_run_id()
                write_run_id(path, "wandb", run_id, name=name, project=tracking.project, entity=tracking.entity)
            mode = os.environ.get("WANDB_MODE") or tracking.mode
            directory = None if os.environ.get("WANDB_DIR") else path.parent
            run = wandb.init(
                id=run_id, resume="allow", reinit="create_new", project=tracking.project, entity=tracking.entity or None,
                name=name, group=cfg.name, job_type=role, tags=list(tracking.tags), mode=mode,
                dir=str(directory) if directory else None,
                config={"experiment": to_dict(cfg), "code": code_version(), "role": role, "member": str(member)},
                settings=wandb.Settings(console="off", save_code=False, x_disable_stats=True))
            run.define_metric(STEP_KEY)
            run.define_metric("*", step_metric=STEP_KEY)
        except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
            log.warning("tracking: could not start the wandb run (%s: %s); training goes on without it",
                        type(exc).__name__, exc)
            return None
        log.info("tracking: wandb run %s (%s, %s mode)%s", run_id, name, mode,
                 " continued" if resumed else "")
        return cls(run, wandb)

    @property
    def run_id(self) -> str:
        return str(self._run.id)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self._log({**values, STEP_KEY: step}, "log scalars")

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self._log_media(tag, lambda: self._wandb.Image(np.asarray(image)), step)

    def encoded_image(self, tag: str, encoded: bytes, step: int) -> None:
        if encoded[:6] in (b"GIF87a", b"GIF89a"):
            self._log_media(tag, lambda: self._wandb.Video(io.BytesIO(encoded), format="gif"), step)
        else:
            from PIL import Image

            self._log_media(tag, lambda: self._wandb.Image(Image.open(io.BytesIO(encoded))), step)

    def close(self) -> None:
        with self._lock:
            if self._disabled:
                return
            self._disabled = True
            try:
                self._run.finish()
            except Exception as exc:  # noqa: BLE001
                log.warning("tracking: could not finish the wandb run (%s: %s)", type(exc).__name__, exc)

    def _log_media(self, tag: str, make: Any, step: int) -> None:
        try:
            media = make()
        except Exception as exc:  # noqa: BLE001 - one odd picture does not turn the tracker off
            log.warning("tracking: could not convert %s (%s: %s)", tag, type(exc).__name__, exc)
            return
        self._log({tag: media, STEP_KEY: step}, f"log {tag}")

    def _log(self, row: Mapping[str, Any], what: str) -> None:
        with self._lock:
            if self._disabled:
                return
            try:
                self._run.log(dict(row))
            except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
                self._disabled = True
                log.warning("tracking: could not %s (%s: %s); tracking is off for this process, training goes on",
                            what, type(exc).__name__, exc)
                try:
                    self._run.finish(exit_code=1)
                except Exception:  # noqa: BLE001 - already failing; the warning says why
                    pass
