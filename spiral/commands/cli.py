"""The ``spiral`` command: one entry point for every tool and service.

Each subcommand lives in its own module, which defines ``register(parser)`` (add its flags)
and ``run(args) -> int`` (do the work); this file only routes. Modules are imported when their
subcommand runs, so ``spiral render`` never imports gRPC and ``spiral actor`` never imports
matplotlib.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "render": ("spiral.commands.render", "re-execute a program JSON and write the canvas as PNG"),
    "sample": ("spiral.commands.sample", "paint N episodes with a run's trained policy (canvases, grid, programs)"),
    "export": ("spiral.commands.export", "pack a run's trained policy to hand over (safetensors, experiment, action spec)"),
    "data": ("spiral.commands.data", "prepare and inspect datasets (spiral data prepare NAME)"),
    "config": ("spiral.commands.config", "show an experiment fully resolved (spiral config resolve NAME [--set F=V])"),
    "actor": ("actor.main", "run an actor: environments + lagging policy, streams unrolls"),
    "learner": ("learner.main", "run the policy learner service"),
    "discriminator": ("discriminator.main", "run the discriminator learner service"),
    "replaybuffer": ("replaybuffer.main", "run the replay buffer service"),
    "pbt-controller": ("pbt_controller.main", "run the population-based training controller"),
    "up": ("spiral.commands.up", "run the whole system on this machine"),
    "local": ("spiral.commands.local", "run the whole system in one process, without gRPC (debugging, baselines)"),
}
"""Subcommand -> (module defining register/run, one-line help)."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="spiral", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        return 0 if argv else 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    command_parser = argparse.ArgumentParser(prog=f"spiral {name}", description=SUBCOMMANDS[name][1])
    module.register(command_parser)
    args = command_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
