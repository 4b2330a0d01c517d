"""A service's part in ``run.artifact_uri``: restore at start, upload while it runs.

``spiral learner``, ``spiral discriminator`` and ``spiral pbt-controller`` call
:func:`start_service_artifacts` before they build their state. With ``run.artifact_uri`` set it

1. restores: when the run directory holds none of the role's checkpoints (a new pod on an
   empty volume), the newest remote one is fetched first (the PBT controller: its ``pbt/``
   folder), so the service resumes as if the volume had been kept;
2. starts an :class:`~spiral.runtime.artifact_uploader.ArtifactUploader` for the role's files
   (:data:`ROLE_FILES`), which the service closes at shutdown, after its last checkpoint.

Remote layout: ``URI/RUN/[member-K/]PATH`` for the file ``RUN_DIR/PATH``: the run directory
``spiral up`` makes, whichever machine each service ran on.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

import yaml

from spiral.config import ExperimentConfig, to_dict
from spiral.runtime.artifact_store import CONFIG_FILE, ArtifactStore, member_prefix, open_run_store
from spiral.runtime.artifact_uploader import ArtifactUploader, UploadPlan
from spiral.runtime.checkpoint import list_checkpoints
from spiral.runtime.service_options import ServiceOptions
from spiral.runtime.tensorboard import board_dir

log = logging.getLogger(__name__)


class ArtifactRestoreError(RuntimeError):
    """The store of ``run.artifact_uri`` could not be read in ``run.artifact_restore_seconds``."""


def role_plan(role: str, member: int, cfg: ExperimentConfig) -> tuple[UploadPlan, tuple[str, ...]]:
    """What ``role`` sends (an :class:`UploadPlan`) and what it restores (checkpoint directories,
    or folders fetched whole), relative to its run directory."""
    if role == "pbt-controller":
        return UploadPlan(mirrored=("pbt",)), ("pbt",)
    if role not in ("learner", "discriminator"):
        raise ValueError(f"{role}: no artifacts to send (learner, discriminator or pbt-controller)")
    board = board_dir(Path(), role, member).as_posix()
    mirrored = (f"{role}.jsonl", board) + (("samples", "exports") if role == "learner" else ())
    prefix = member_prefix(member, cfg.pbt.population_size)
    # Member 0's learner sends the experiment, so that spiral sample / export can read the store alone.
    documents = ((CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode()),) \
        if role == "learner" and member == 0 else ()
    return UploadPlan(checkpoint_dirs=(role,), mirrored=mirrored, remote_prefix=prefix, documents=documents), (role,)


def _with_timeout(seconds: float, what: str, work: Callable[[], object]) -> object:
    """Run ``work`` on a thread; its result, or :class:`ArtifactRestoreError` after ``seconds``."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - reported on the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="artifact-restore", daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    if thread.is_alive():
        raise ArtifactRestoreError(f"{what}: no answer in run.artifact_restore_seconds ({seconds:g}s)")
    if "error" in outcome:
        raise ArtifactRestoreError(f"{what}: {outcome['error']}") from outcome["error"]  # type: ignore[misc]
    return outcome.get("value")


def restore_missing(store: ArtifactStore, run_dir: Path, plan: UploadPlan, restored: tuple[str, ...],
                    timeout: float) -> list[Path]:
    """Fetch from ``store`` what the run directory lacks: for a checkpoint directory with no
    checkpoint, the newest remote one; for another folder that is missing or empty, all of it.

    Raises:
        ArtifactRestoreError: the store could not be read within ``timeout`` seconds.
    """
    run_dir = Path(run_dir)
    fetched: list[Path] = []
    for directory in restored:
        local = run_dir / directory
        remote = f"{plan.remote_prefix}/{directory}" if plan.remote_prefix else directory
        what = f"restoring {local} from {store.url(remote)}"
        if directory in plan.checkpoint_dirs:
            if list_checkpoints(local):
                continue

            def newest(remote: str = remote, local: Path = local) -> Path | None:
                found = store.newest_checkpoint(remote)
                return None if found is None else store.get(found, local / found.rsplit("/", 1)[-1])

            path = _with_timeout(timeout, what, newest)
            if path is not None:
                log.info("restored %s from %s", path, store.url(remote))
                fetched.append(Path(path))  # type: ignore[arg-type]
        elif not (local.is_dir() and any(local.iterdir())):
            files = _with_timeout(timeout, what, lambda remote=remote, local=local: store.get_tree(remote, local))
            if files:
                log.info("restored %d file(s) of %s from %s", len(files), local, store.url(remote))
                fetched.extend(files)  # type: ignore[arg-type]
    return fetched


def start_service_artifacts(opts: ServiceOptions) -> ArtifactUploader | None:
    """Restore what the run directory lacks and start the uploader of ``opts.role`` (None when
    ``run.artifact_uri`` is empty). Call ``close(cfg.run.artifact_flush_seconds)`` at shutdown.

    Raises:
        SystemExit: the store cannot be opened or read (the message names ``run.artifact_uri``);
            the service then stops rather than train from scratch beside its saved state.
    """
    run_cfg = opts.config.run
    if not run_cfg.artifact_uri:
        return None
    plan, restored = role_plan(opts.role, opts.member, opts.config)
    try:
        store = open_run_store(run_cfg.artifact_uri, opts.run_name, run_cfg.artifact_options)
        restore_missing(store, opts.run_dir, plan, restored, run_cfg.artifact_restore_seconds)
    except (ArtifactRestoreError, ValueError, ImportError, OSError) as exc:
        raise SystemExit(f"spiral {opts.role}: run.artifact_uri {run_cfg.artifact_uri}: {exc}") from exc
    log.info("artifacts go to %s", store.url(plan.remote_prefix))
    return ArtifactUploader(store, opts.run_dir, plan, queue_size=run_cfg.artifact_queue,
                            sync_seconds=run_cfg.artifact_sync_seconds, role=opts.role,
                            member=opts.member).start()
