"""The learning benchmarks as data: run the entries of ``bench/runs.yaml`` by name.

Each entry of ``bench/runs.yaml`` is a *run group*: one bench script (``bench/learning.py``,
``bench/unconditional.py``, ``bench/paper_smoke.py``, ``bench/rerender_brush.py``), one
experiment, and the seeds, actors, minutes and results directories of the runs that the record
(``bench/RESULTS.md``, ``bench/log/``) reports. This module checks the file and turns each entry
into the commands that repeat those runs, one command per seed, each the bench script run as a
module with every argument spelled out once::

    python -m bench.learning --config experiments/tiny-critic.yaml --seed 0 --actors 2 --minutes 10 20 \\
        --out bench/results/critic-reward/seed-0

Usage::

    python -m bench.runs list                            # every entry: its runs, hours and headline flag
    python -m bench.runs run NAME [NAME ...] [--seed S]  # those entries, all their seeds or one
    python -m bench.runs run --headline                  # the entries behind RESULTS.md's current figures
    python -m bench.runs run --all                       # every entry, in the file's order
    python -m bench.runs run ... --dry-run               # print the commands, run nothing

Commands run one after another from the repository root; each is printed before it starts, and
the first that fails stops the rest (its exit status is this command's). The ``make bench-*``
targets run these with the environment the runs had (``OMP_NUM_THREADS=1``,
``SPIRAL_OMNIGLOT_PATH``, ``MUJOCO_GL``); run directly, set them yourself.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import re
import shlex
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from spiral.config import ConfigError, resolve_experiment

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: experiments are read from ``ROOT/experiments`` and commands run here."""
RUN_FILE = ROOT / "bench" / "runs.yaml"
EXPERIMENTS = "experiments"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]*")


class RunFileError(ValueError):
    """``bench/runs.yaml`` (or another run file) is not valid; each line names the entry and field."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One command of a run group: a bench script's arguments, and what it writes.

    Attributes:
        group: the name of the entry it belongs to.
        seed: the experiment's seed, or None where the script takes no seed (a re-render, a smoke run).
        args: the arguments after the interpreter, starting ``-m bench.NAME``.
        out: the directory (or file) it writes, relative to the repository root.
        needs: files, relative to the root, that must exist when it starts (a finished run's
            checkpoint); an earlier command of the same invocation may write them.
        training_minutes: how long it trains the system (0 for one that only scores).
    """

    group: str
    seed: int | None
    args: tuple[str, ...]
    out: str
    needs: tuple[str, ...] = ()
    training_minutes: float = 0.0

    def argv(self, python: str = sys.executable) -> list[str]:
        """The full command line, run by ``python``."""
        return [python, *self.args]

    def shell_line(self, python: str = sys.executable) -> str:
        """The command as one line a shell would run: what ``--dry-run`` prints."""
        return shlex.join(self.argv(python))


@dataclasses.dataclass(frozen=True)
class RunGroup:
    """One entry of the run file: a named group of runs of one script.

    Attributes:
        name: the entry's name (``python -m bench.runs run NAME``).
        script: which bench script runs it (a key of :data:`SCRIPTS`).
        about: one line on what the group measures.
        headline: whether RESULTS.md's current figures rest on it.
        settings: what ``list`` shows beside the name (experiment, seeds, actors, minutes).
        runs: its commands, in the order they run.
    """

    name: str
    script: str
    about: str
    headline: bool
    settings: str
    runs: tuple[Run, ...]

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seeds of its runs, in order (empty for a script that takes none)."""
        return tuple(run.seed for run in self.runs if run.seed is not None)

    def select(self, seed: int | None) -> tuple[Run, ...]:
        """Its runs, or only the one of ``seed``.

        Raises:
            RunFileError: the group has no run of that seed.
        """
        if seed is None:
            return self.runs
        chosen = tuple(run for run in self.runs if run.seed == seed)
        if not chosen:
            have = ", ".join(map(str, self.seeds)) or "none: it takes no seed"
            raise RunFileError(f"{self.name}: no run of seed {seed} (its seeds: {have})")
        return chosen


# -- reading and checking the file -------------------------------------------------------------------


class _Entry:
    """One entry's raw mapping, read field by field; every problem is recorded as ``label.field: ...``."""

    def __init__(self, raw: dict[str, Any], label: str, errors: list[str]) -> None:
        self.raw = raw
        self.label = label
        self.errors = errors

    def error(self, field: str, message: str) -> None:
        self.errors.append(f"{self.label}.{field}: {message}")

    def has(self, field: str) -> bool:
        return field in self.raw

    def text(self, field: str) -> str | None:
        value = self.raw.get(field)
        if not isinstance(value, str) or not value.strip():
            self.error(field, f"must be a non-empty string, got {value!r}")
            return None
        return value

    def texts(self, field: str) -> list[str] | None:
        value = self.raw.get(field)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            self.error(field, f"must be a non-empty list of strings, got {value!r}")
            return None
        return value

    def count(self, field: str) -> int | None:
        value = self.raw.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.error(field, f"must be an integer >= 1, got {value!r}")
            return None
        return value

    def seeds(self) -> list[int] | None:
        value = self.raw.get("seeds")
        if (not isinstance(value, list) or not value
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)):
            self.error("seeds", f"must be a non-empty list of integers >= 0, got {value!r}")
            return None
        if len(set(value)) != len(value):
            self.error("seeds", f"lists a seed twice: {value}")
            return None
        return value

    def minutes(self, exactly_one: bool = False) -> list[float] | None:
        value = self.raw.get("minutes")
        numbers = (isinstance(value, list) and value
                   and all(isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0 for m in value))
        if not numbers:
            self.error("minutes", f"must be a non-empty list of positive numbers, got {value!r}")
            return None
        if exactly_one and len(value) != 1:
            self.error("minutes", f"this script runs each experiment for one length of time: one value, got {value}")
            return None
        if any(b <= a for a, b in itertools.pairwise(value)):
            self.error("minutes", f"must increase (a checkpoint is scored at each): {value}")
            return None
        return [float(m) for m in value]

    def experiment_file(self, field: str, name: str) -> str | None:
        """``experiments/NAME`` when that file exists, else an error."""
        path = f"{EXPERIMENTS}/{name}"
        if not (ROOT / path).is_file():
            self.error(field, f"{path} does not exist")
            return None
        return path

    def pattern(self, field: str, value: str, allowed: set[str]) -> bool:
        """Whether ``value``'s ``{placeholders}`` are all in ``allowed`` (and it parses)."""
        try:
            used = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            self.error(field, f"{value!r} is not a valid pattern ({exc})")
            return False
        unknown = used - allowed
        if unknown:
            self.error(field, f"{value!r} uses {{{', '.join(sorted(unknown))}}}; "
                              f"allowed: {', '.join('{' + a + '}' for a in sorted(allowed)) or 'none'}")
            return False
        return True


Reader = Callable[[_Entry, str, dict[str, str]], tuple[str, tuple[Run, ...]] | None]
"""How a script's entries become commands: ``read(entry, name, earlier_outs)`` gives the line
``list`` shows and the runs, or None after recording what is wrong. ``earlier_outs`` maps each
output of the entries above to its entry's name."""


def _minutes_args(minutes: list[float]) -> list[str]:
    """``--minutes`` values as a person types them: 10, 20, 2.5."""
    return [f"{m:g}" for m in minutes]


def _seeded_runs(module: str) -> Reader:
    """The reader of a script that trains one experiment per seed (``bench.learning``, ``bench.unconditional``)."""

    def read(entry: _Entry, name: str, earlier_outs: dict[str, str]) -> tuple[str, tuple[Run, ...]] | None:
        experiment = entry.text("experiment")
        config = entry.experiment_file("experiment", experiment) if experiment else None
        seeds = entry.seeds()
        actors = entry.count("actors")
        minutes = entry.minutes()
        outs = _seed_outs(entry, seeds)
        overrides = entry.texts("set") if entry.has("set") else []
        if None in (config, seeds, actors, minutes, outs, overrides):
            return None
        if overrides:
            try:
                resolve_experiment(ROOT / config, overrides)
            except ConfigError as exc:
                entry.error("set", str(exc))
                return None
        set_args = [arg for item in overrides for arg in ("--set", item)]
        runs = tuple(Run(group=name, seed=seed, out=outs[seed], training_minutes=max(minutes), args=(
            "-m", module, "--config", config, "--seed", str(seed), "--actors", str(actors), *set_args,
            "--minutes", *_minutes_args(minutes), "--out", outs[seed])) for seed in seeds)
        settings = (f"{experiment}{''.join(f' --set {item}' for item in overrides)}, "
                    f"seeds {','.join(map(str, seeds))}, {actors} actor{'s' * (actors > 1)}, "
                    f"{','.join(_minutes_args(minutes))} min")
        return settings, runs

    return read


def _seed_outs(entry: _Entry, seeds: list[int] | None) -> dict[int, str] | None:
    """Each seed's results directory, from ``out``: a ``{seed}`` pattern, or a mapping seed -> directory."""
    value = entry.raw.get("out")
    if seeds is None:
        return None
    if isinstance(value, str) and value.strip():
        if not entry.pattern("out", value, {"seed"}):
            return None
        if len(seeds) > 1 and "{seed}" not in value:
            entry.error("out", f"{value!r} has no {{seed}}, so its {len(seeds)} seeds would write one directory")
            return None
        return {seed: value.format(seed=seed) for seed in seeds}
    if isinstance(value, dict) and all(isinstance(v, str) and v.strip() for v in value.values()):
        if set(value) != set(seeds):
            entry.error("out", f"maps seeds {sorted(value, key=str)}, but the entry's seeds are {seeds}")
            return None
        return {seed: value[seed] for seed in seeds}
    entry.error("out", f"must be a directory pattern with {{seed}} or a mapping seed -> directory, got {value!r}")
    return None


def _paper_smoke_runs(entry: _Entry, name: str, earlier_outs: dict[str, str]) -> tuple[str, tuple[Run, ...]] | None:
    """One ``bench.paper_smoke`` command: every experiment of ``experiments`` for ``minutes`` each."""
    names = entry.texts("experiments")
    files = [entry.experiment_file("experiments", f"{n}.yaml") for n in names] if names else [None]
    actors = entry.count("actors")
    minutes = entry.minutes(exactly_one=True)
    out = entry.text("out")
    if out is not None and not entry.pattern("out", out, set()):
        out = None
    if None in files or None in (names, actors, minutes, out):
        return None
    run = Run(group=name, seed=None, out=out, training_minutes=minutes[0] * len(names), args=(
        "-m", "bench.paper_smoke", "--experiments", *names, "--minutes", *_minutes_args(minutes),
        "--actors", str(actors), "--out", out))
    return f"{', '.join(names)}, {actors} actors, {minutes[0]:g} min each", (run,)


def _rerender_brush_runs(entry: _Entry, name: str, earlier_outs: dict[str, str]) -> tuple[str, tuple[Run, ...]] | None:
    """One ``bench.rerender_brush`` command per finished run of ``runs`` (each an earlier entry's output)."""
    run_dirs = entry.texts("runs")
    checkpoint = entry.text("checkpoint")
    brushes = entry.texts("brushes")
    out = entry.text("out")
    if checkpoint is not None and "/" in checkpoint:
        entry.error("checkpoint", f"a file name inside each run's directory, got {checkpoint!r}")
        checkpoint = None
    if out is not None and not entry.pattern("out", out, {"run"}):
        out = None
    elif out is not None and "{run}" not in out:
        entry.error("out", f"{out!r} has no {{run}}, so every run would write one file")
        out = None
    unfinished = [i for i, run_dir in enumerate(run_dirs or []) if run_dir not in earlier_outs]
    for i in unfinished:
        entry.error(f"runs[{i}]", f"{run_dirs[i]} is no earlier entry's results directory "
                                  "(a re-render needs its run to come first)")
    if unfinished or None in (run_dirs, checkpoint, brushes, out):
        return None
    runs = tuple(Run(group=name, seed=None, out=out.format(run=run_dir),
                     needs=(f"{run_dir}/experiment.yaml", f"{run_dir}/{checkpoint}"), args=(
                         "-m", "bench.rerender_brush", "--config", f"{run_dir}/experiment.yaml",
                         "--checkpoint", f"{run_dir}/{checkpoint}", "--brushes", *brushes,
                         "--out", out.format(run=run_dir))) for run_dir in run_dirs)
    return f"{len(runs)} finished runs' {checkpoint}, brushes {' '.join(brushes)}", runs


@dataclasses.dataclass(frozen=True)
class Script:
    """A bench script an entry can name: the fields its entries need, and how they become commands."""

    fields: frozenset[str]
    read: Reader
    optional: frozenset[str] = frozenset()


COMMON_FIELDS = frozenset({"name", "script", "about", "headline"})
SCRIPTS: dict[str, Script] = {
    "learning": Script(frozenset({"experiment", "seeds", "actors", "minutes", "out"}), _seeded_runs("bench.learning"),
                       optional=frozenset({"set"})),
    "unconditional": Script(frozenset({"experiment", "seeds", "actors", "minutes", "out"}),
                            _seeded_runs("bench.unconditional"), optional=frozenset({"set"})),
    "paper_smoke": Script(frozenset({"experiments", "actors", "minutes", "out"}), _paper_smoke_runs),
    "rerender_brush": Script(frozenset({"runs", "checkpoint", "brushes", "out"}), _rerender_brush_runs),
}
"""Every script an entry may name (``script:``), by the bench module's name."""


def load_runs(path: Path = RUN_FILE) -> tuple[RunGroup, ...]:
    """Read and check a run file; its entries in the file's order.

    Raises:
        RunFileError: the file is not valid; the message has one line per problem, each naming
            the entry (by name, or ``runs[i]`` where it has none) and the field.
    """
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RunFileError(f"{path}: {exc}") from exc
    if not isinstance(document, dict) or set(document) != {"runs"} or not isinstance(document["runs"], list):
        raise RunFileError(f"{path}: must be a mapping with one key, runs: a list of entries")
    errors: list[str] = []
    groups: list[RunGroup] = []
    names: dict[str, str] = {}
    outs: dict[str, str] = {}
    for index, raw in enumerate(document["runs"]):
        position = f"runs[{index}]"
        if not isinstance(raw, dict):
            errors.append(f"{position}: must be a mapping of fields, got {raw!r}")
            continue
        name = raw.get("name")
        label = name if isinstance(name, str) and NAME_PATTERN.fullmatch(name) else position
        entry = _Entry(raw, label, errors)
        if label == position:
            entry.error("name", f"must be lower-case letters, digits and dashes, got {name!r}")
        elif name in names:
            entry.error("name", f"{name!r} is already the name of {names[name]}")
        else:
            names[name] = position
        script_name = raw.get("script")
        script = SCRIPTS.get(script_name) if isinstance(script_name, str) else None
        if script is None:
            entry.error("script", f"unknown script {raw.get('script')!r} (one of: {', '.join(sorted(SCRIPTS))})")
            continue
        allowed = COMMON_FIELDS | script.fields | script.optional
        for field in sorted(set(raw) - allowed, key=str):
            entry.error(str(field), f"unknown field for a {raw['script']} entry (its fields: {', '.join(sorted(allowed))})")
        for field in sorted(script.fields - set(raw)):
            entry.error(field, f"missing (a {raw['script']} entry needs: {', '.join(sorted(script.fields))})")
        headline = raw.get("headline", False)
        if not isinstance(headline, bool):
            entry.error("headline", f"must be true or false, got {headline!r}")
        about = raw.get("about", "")
        if not isinstance(about, str):
            entry.error("about", f"must be a string, got {about!r}")
        if script.fields - set(raw):
            continue
        read = script.read(entry, label, outs)
        if read is None:
            continue
        settings, runs = read
        for run in runs:
            if run.out in outs:
                entry.error("out", f"{run.out} is also written by {outs[run.out]}")
            outs[run.out] = label
        groups.append(RunGroup(name=label, script=raw["script"], about=about if isinstance(about, str) else "",
                               headline=headline is True, settings=settings, runs=runs))
    if errors:
        raise RunFileError("\n".join(f"{path}: {error}" for error in errors))
    return tuple(groups)


# -- choosing and running ------------------------------------------------------------------------------


def choose(groups: tuple[RunGroup, ...], names: list[str], seed: int | None = None, everything: bool = False,
           headline: bool = False) -> list[Run]:
    """The runs to start, in order: every group, the headline groups, or the named ones (``seed`` only).

    Raises:
        RunFileError: a name that is no entry's (with the nearest names), or a seed a group lacks.
    """
    if everything:
        return [run for group in groups for run in group.runs]
    if headline:
        return [run for group in groups if group.headline for run in group.runs]
    by_name = {group.name: group for group in groups}
    chosen: list[Run] = []
    for name in names:
        if name not in by_name:
            near = difflib.get_close_matches(name, by_name, n=3)
            hint = f"; did you mean {' or '.join(near)}?" if near else "; python -m bench.runs list names them"
            raise RunFileError(f"no entry named {name!r}{hint}")
        chosen.extend(by_name[name].select(seed))
    return chosen


def run_all(runs: list[Run], dry_run: bool = False) -> int:
    """Print each run's command and start it, one after another; stop at the first that fails.

    Returns:
        0 when every run finished (or ``dry_run``), else the failed command's exit status.
    """
    for index, run in enumerate(runs):
        print(run.shell_line(), flush=True)
        if dry_run:
            continue
        missing = [need for need in run.needs if not (ROOT / need).exists()]
        status = 2 if missing else subprocess.run(run.argv(), cwd=ROOT).returncode
        if status != 0:
            seed = f" seed {run.seed}" if run.seed is not None else ""
            why = (f"cannot start: no {', '.join(missing)} (the run of that directory writes it: run its entry first)"
                   if missing
                   else f"exited with status {status}")
            left = len(runs) - index - 1
            print(f"bench.runs: {run.group}{seed} {why}; stopped, {left} run{'s' * (left != 1)} not started",
                  file=sys.stderr, flush=True)
            return status
    return 0


def describe(groups: tuple[RunGroup, ...]) -> str:
    """The ``list`` table: one line per entry, then the totals."""
    width = max(len(group.name) for group in groups)
    lines = []
    for group in groups:
        mark = "headline" if group.headline else ""
        lines.append(f"{group.name:<{width}}  {group.script:<14} {mark:<8}  {group.settings}")
        if group.about:
            lines.append(f"{'':<{width}}  {group.about}")
    runs = [run for group in groups for run in group.runs]
    trained = sum(run.training_minutes for run in runs) / 60
    headline_runs = [run for group in groups if group.headline for run in group.runs]
    headline_hours = sum(run.training_minutes for run in headline_runs) / 60
    lines.append(f"\n{len(groups)} entries, {len(runs)} commands, {trained:.1f} hours of training in all "
                 f"(each run's scoring adds minutes); headline: {len(headline_runs)} commands, "
                 f"{headline_hours:.1f} hours")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.runs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, default=RUN_FILE, help="the run file (default: bench/runs.yaml)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every entry, its settings, and the hours of running them all")
    run = commands.add_parser("run", help="run entries by name, the headline ones, or all of them")
    run.add_argument("names", nargs="*", metavar="NAME", help="entries to run (python -m bench.runs list)")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every entry, in the file's order")
    which.add_argument("--headline", action="store_true", help="the entries marked headline: true")
    run.add_argument("--seed", type=int, default=None, help="only this seed's run of each named entry")
    run.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    try:
        groups = load_runs(args.file)
        if args.command == "list":
            print(describe(groups))
            return 0
        if bool(args.names) == (args.all or args.headline):
            run.error("name entries to run, or give --all or --headline (not both)")
        if args.seed is not None and not args.names:
            run.error("--seed picks one run of each named entry; it does not go with --all or --headline")
        chosen = choose(groups, args.names, args.seed, everything=args.all, headline=args.headline)
    except RunFileError as exc:
        print(exc, file=sys.stderr)
        return 2
    return run_all(chosen, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
