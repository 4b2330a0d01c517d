"""``--set FIELD=VALUE`` and ``--seed N``: how a command changes its experiment for one run.

``spiral up``, ``spiral local``, ``spiral sample`` and ``spiral config resolve`` take
``--set`` (repeatable; parsed by :func:`spiral.config.parse_overrides`, the value is YAML);
``spiral up`` and ``spiral local`` also take ``--seed N``, the same as ``--set seed=N``, and
``--frames N``, the same as ``--set learner.max_frames=N`` (the run's budget)
(``spiral sample --seed`` keeps its own meaning: the sampling seed). The services take
``--set`` through :mod:`spiral.runtime.service_options`, with ``SPIRAL_SET`` as its fallback.
"""

from __future__ import annotations

import argparse

SET_HELP = ("override a setting of the experiment, e.g. --set learner.batch_size=32 (VALUE is YAML, so [-5,5] "
            "is a list and false a boolean; repeatable)")


def add_override_arguments(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    """Add ``--set FIELD=VALUE`` (repeatable) and, with ``seed``, ``--seed N`` (``--set seed=N``)."""
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help=SET_HELP)
    if seed:
        parser.add_argument("--seed", type=int, default=None, dest="run_seed", metavar="N",
                            help="the run's seed (the same as --set seed=N)")


def add_budget_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--frames N`` (``--set learner.max_frames=N``)."""
    parser.add_argument("--frames", type=int, default=None, metavar="N",
                        help="the run's budget: stop training once the learner has consumed N environment steps "
                             "(the same as --set learner.max_frames=N; 0: no budget)")


def override_items(args: argparse.Namespace) -> list[str]:
    """The ``FIELD=VALUE`` items of ``--set`` and of the flags that stand for one, in the order they apply.

    Besides ``--set``: ``--seed N`` (``seed=N``), ``--frames N`` (``learner.max_frames=N``), and
    ``spiral up``'s ``--population K``
    (``pbt.population_size=K``) and ``--[no-]shared-discriminator``
    (``pbt.shared_discriminator=true|false``). The population size goes into the run's config
    file like any override: a population experiment run with ``--population 1`` has no
    controller, so its learner must not report to one nor its actors ask one for a member.
    """
    items = list(args.set)
    if getattr(args, "run_seed", None) is not None:
        items.append(f"seed={args.run_seed}")
    if getattr(args, "frames", None) is not None:
        items.append(f"learner.max_frames={args.frames}")
    if getattr(args, "population", None) is not None:
        items.append(f"pbt.population_size={args.population}")
    if getattr(args, "shared_discriminator", None) is not None:
        items.append(f"pbt.shared_discriminator={str(args.shared_discriminator).lower()}")
    return items
