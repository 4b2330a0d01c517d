"""``spiral config``: look at experiments as the services will see them.

``spiral config resolve NAME|FILE [--set FIELD=VALUE ...]`` prints the experiment fully resolved:
its chain of bases merged, the overrides applied, every field written out and no ``base``
left. A Kubernetes overlay keeps such a file, because kustomize reads nothing outside the
overlay's folder and a pod cannot follow a ``base:`` that lives elsewhere::

    spiral config resolve mnist > deploy/overlays/mnist/mnist.yaml

The output starts with a comment naming the files and overrides it was made from; it loads
with :func:`spiral.config.load_experiment` to exactly the same experiment.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from spiral.commands.overrides import add_override_arguments
from spiral.config import ConfigError, ResolvedExperiment, experiment_path, resolve_experiment, to_dict


def register(parser: argparse.ArgumentParser) -> None:
    """Add ``spiral config``'s actions and their arguments."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    resolve = actions.add_parser("resolve", help="print an experiment fully resolved (bases merged, overrides "
                                                 "applied, every field)")
    resolve.add_argument("experiment", metavar="NAME|FILE", help="a name under experiments/ or a YAML file")
    add_override_arguments(resolve, seed=False)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else as it is."""
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else Path(relative).as_posix()


def resolved_yaml(experiment: ResolvedExperiment, command: str) -> str:
    """The YAML text of a resolved experiment, after a comment saying how it was made.

    Args:
        experiment: The experiment and how it was made.
        command: The command line that regenerates the text, for the comment.
    """
    made = _shown(experiment.chain[0])
    if len(experiment.chain) > 1:
        made += " on " + " on ".join(_shown(p) for p in experiment.chain[1:])
    header = (f"# {made}, fully resolved{' with --set ' + ' '.join(experiment.overrides) if experiment.overrides else ''}"
              f".\n# Generated: edit the experiment instead and regenerate with\n#   {command}\n")
    return header + yaml.safe_dump(to_dict(experiment.config), sort_keys=False)


def run(args: argparse.Namespace) -> int:
    """Run ``spiral config ACTION``; returns the exit status."""
    path = experiment_path(args.experiment)
    if not path.is_file():
        print(f"spiral config: {path}: no such experiment file", file=sys.stderr)
        return 2
    try:
        experiment = resolve_experiment(path, args.set)
    except ConfigError as exc:
        print(f"spiral config: {exc}", file=sys.stderr)
        return 2
    command = " ".join(["spiral config resolve", args.experiment, *(f"--set {item}" for item in args.set)])
    sys.stdout.write(resolved_yaml(experiment, command))
    return 0
