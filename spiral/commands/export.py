"""``spiral export``: pack a trained policy to hand over (safetensors, the experiment, the action spec).

Usage::

    spiral export RUN_DIR|CHECKPOINT --out DIR [--config FILE.yaml]

``RUN_DIR`` (or ``RUN_URI``: ``s3://``, ``gs://``, ``file://``, a run in ``run.artifact_uri``, fetched
first) is a ``spiral up`` run directory (its newest ``learner/ckpt-*.pt``; a PBT member
directory ``member-K`` works too) and ``CHECKPOINT`` one learner checkpoint file, whose config
is read from ``<ckpt dir>/../config.yaml`` unless ``--config`` names one: they are found exactly
as ``spiral sample`` finds them. ``DIR`` receives the trained weights and, where the run kept
one (``learner.policy_average_decay`` > 0), their moving average, each as safetensors, the
resolved experiment, the action spec, spiral's version and the code's commit (see
:mod:`spiral.evaluation.export`). ``spiral sample DIR`` paints with it (``--average``: the
averaged weights). Exit status: 0 on success, 2 for a missing or unreadable run or checkpoint,
a weight set that does not fit the config, or an ``--out`` that is not empty and not an export,
1 when the files cannot be written.
"""

from __future__ import annotations

import argparse
import sys


def register(parser: argparse.ArgumentParser) -> None:
    """Add ``spiral export``'s arguments."""
    parser.add_argument("run", metavar="RUN_DIR|CHECKPOINT",
                        help="a spiral up run directory (newest learner checkpoint) or a learner checkpoint file, local or in a "
                             "store: s3://..., gs://..., file://... (run.artifact_uri/RUN)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the export directory (new, empty, or an earlier export, which is replaced)")
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="experiment config (default: the run's config.yaml)")


def run(args: argparse.Namespace) -> int:
    """Export the policy; returns the exit status."""
    from spiral.evaluation.export import ExportError, read_export, write_export
    from spiral.evaluation.sampling import SampleError, resolve_run

    try:
        resolved = resolve_run(args.run, args.config)
        if resolved.kind == "export":
            raise SampleError(f"{args.run}: already an export; export a run directory or a learner checkpoint")
        resolved.policy()  # the weights fit the experiment they are exported with
        if resolved.has_average:
            resolved.policy(average=True)
        manifest = write_export(args.out, resolved.cfg, resolved.weights, resolved.version, resolved.training,
                                source=resolved.checkpoint)
    except (SampleError, ExportError) as exc:
        return _fail(2, str(exc))
    except OSError as exc:
        return _fail(1, f"{args.out}: cannot write the export: {exc}")
    export = read_export(manifest.parent)
    sizes = ", ".join(f"{name} {entry['bytes']} bytes" for name, entry in export.manifest["weights"].items())
    commit = export.manifest["code"]["commit"]
    print(f"exported policy version {resolved.version} from {resolved.checkpoint} to {manifest.parent} "
          f"({sizes}; spiral {export.manifest['spiral_version']}, commit {commit})")
    return 0


def _fail(status: int, message: str) -> int:
    print(f"spiral export: error: {message}", file=sys.stderr)
    return status
