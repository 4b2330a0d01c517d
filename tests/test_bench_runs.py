"""bench/runs.yaml and its runner (bench/runs.py): the learning benchmarks as data.

The shipped file must load, name real experiments, and print, for each entry, the exact bench
commands that produced the record's results directories (which RESULTS.md and bench/log/ link).
A run file with mistakes must be refused with one message per mistake naming the entry and the
field. Nothing here trains: ``--dry-run`` prints the commands, and the one real run fails fast.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.runs import RunFileError, choose, load_runs

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HEADLINE = {"critic-reward-clip-lr-ent-1actor", "critic-reward-clip-lr-ent", "l2-reward-lr-ent",
            "omniglot-lr-ent-1actor", "scenes", "scenes-recovery", "faces", "unconditional-pen"}
"""The entries behind the current figures (README's "The CPU profile and its reward", RESULTS.md)."""


def runs_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "bench.runs", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def write_run_file(tmp_path: Path, entries: str) -> Path:
    path = tmp_path / "runs.yaml"
    path.write_text("runs:\n" + entries)
    return path


LEARNING_ENTRY = """\
  - name: {name}
    script: learning
    experiment: tiny-critic.yaml
    seeds: [0, 1]
    actors: 1
    minutes: [10, 20]
    out: {out}
"""


# -- the shipped file -------------------------------------------------------------------------------


def test_the_shipped_run_file_loads_and_every_experiment_it_names_exists() -> None:
    groups = load_runs()
    assert len(groups) >= 30
    for group in groups:
        for run in group.runs:
            if "--config" in run.args and group.script in ("learning", "unconditional"):
                assert (ROOT / run.args[run.args.index("--config") + 1]).is_file(), group.name
            if group.script == "paper_smoke":
                names = run.args[run.args.index("--experiments") + 1:run.args.index("--minutes")]
                assert all((ROOT / "experiments" / f"{name}.yaml").is_file() for name in names)


def test_every_run_in_the_file_happened_and_wrote_where_the_file_says() -> None:
    missing = [f"{run.group}: {run.out}" for group in load_runs() for run in group.runs if not (ROOT / run.out).exists()]
    assert not missing, "results the record links must keep their paths:\n" + "\n".join(missing)


def test_a_dry_run_of_each_entry_prints_exactly_its_commands_and_runs_nothing() -> None:
    groups = load_runs()
    result = runs_cli("run", *(group.name for group in groups), "--dry-run")
    assert result.returncode == 0, result.stderr
    expected = [run.shell_line() for group in groups for run in group.runs]
    assert result.stdout.splitlines() == expected
    everything = runs_cli("run", "--all", "--dry-run")
    assert everything.returncode == 0 and everything.stdout.splitlines() == expected


def test_the_commands_are_the_bench_scripts_as_modules_with_every_argument_once() -> None:
    for group in load_runs():
        for run in group.runs:
            argv = run.argv()
            assert argv[:3] == [PYTHON, "-m", f"bench.{group.script}"], argv
            flags = [arg for arg in argv if arg.startswith("--")]
            assert len(flags) == len(set(flags)), f"{group.name}: a flag given twice: {argv}"


def test_an_entry_prints_the_command_that_produced_its_results() -> None:
    one_seed = runs_cli("run", "critic-reward-clip-lr-ent-1actor", "--seed", "1", "--dry-run")
    assert one_seed.stdout.splitlines() == [shlex.join([
        PYTHON, "-m", "bench.learning", "--config", "experiments/tiny-critic-clip-lr-ent.yaml", "--seed", "1",
        "--actors", "1", "--minutes", "10", "20", "--out", "bench/results/critic-reward-clip-lr-ent-1actor/seed-1"])]
    pen = runs_cli("run", "unconditional-pen", "--dry-run").stdout.splitlines()
    assert pen[0] == shlex.join([PYTHON, "-m", "bench.unconditional", "--config", "experiments/tiny-unconditional-pen.yaml",
                                 "--seed", "0", "--actors", "1", "--minutes", "10", "20",
                                 "--out", "bench/results/unconditional-pen"])
    assert [line.split("--out ")[1] for line in pen] == [
        "bench/results/unconditional-pen", "bench/results/unconditional-pen-seed1", "bench/results/unconditional-pen-seed2"]
    assert runs_cli("run", "paper-smoke", "--dry-run").stdout.splitlines() == [shlex.join([
        PYTHON, "-m", "bench.paper_smoke", "--experiments", "mnist", "omniglot", "celeba", "mujoco",
        "--minutes", "3", "--actors", "2", "--out", "bench/results/paper-smoke"])]
    rerender = runs_cli("run", "rerender-brush", "--dry-run").stdout.splitlines()
    assert rerender[-1] == shlex.join([
        PYTHON, "-m", "bench.rerender_brush", "--config", "bench/results/unconditional-pen/experiment.yaml",
        "--checkpoint", "bench/results/unconditional-pen/policy-20min.pt", "--brushes", "classic/dry_brush",
        "classic/pen", "--out", "bench/results/unconditional-pen/rerender-brush.json"])
    four_bins = runs_cli("run", "scenes-4bins", "--dry-run").stdout.splitlines()
    assert four_bins == [shlex.join([
        PYTHON, "-m", "bench.learning", "--config", "experiments/tiny-scenes.yaml", "--seed", "0", "--actors", "1",
        "--set", "env.mujoco.color_bins=4", "--minutes", "10", "20", "--out", "bench/results/scenes-4bins/seed-0"])]
    shaped = runs_cli("run", "l2-shaped", "--dry-run").stdout
    assert "--config experiments/tiny-l2-shaped.yaml" in shaped and "--minutes 10 30" in shaped
    assert shaped.rstrip().endswith("--out bench/results/learning")


def test_the_headline_entries_are_the_runs_behind_the_current_figures() -> None:
    groups = load_runs()
    assert {group.name for group in groups if group.headline} == HEADLINE
    for group in groups:
        if group.headline:
            assert all((ROOT / run.out).is_dir() for run in group.runs), group.name
    result = runs_cli("run", "--headline", "--dry-run")
    assert result.stdout.splitlines() == [run.shell_line() for run in choose(groups, [], headline=True)]
    front_page = (ROOT / "bench" / "RESULTS.md").read_text().split("## The record")[0]
    for name in HEADLINE:
        assert re.search(rf"python -m bench\.runs run [a-z0-9 -]*\b{re.escape(name)}\b", front_page), \
            f"RESULTS.md's current figures must say how to repeat {name}"


def test_every_re_render_comes_after_the_run_it_redraws() -> None:
    outs_so_far: set[str] = set()
    for group in load_runs():
        for run in group.runs:
            for need in run.needs:
                assert str(Path(need).parent) in outs_so_far, f"{group.name} needs {need} before it is written"
            outs_so_far.add(run.out)


# -- mistakes in a run file ----------------------------------------------------------------------------


@pytest.mark.parametrize("entries, message", [
    (LEARNING_ENTRY.format(name="a", out="x/{seed}") + "    colour: red\n",
     "a.colour: unknown field for a learning entry"),
    (LEARNING_ENTRY.format(name="a", out="x/{seed}").replace("tiny-critic.yaml", "tiny-critc.yaml"),
     "a.experiment: experiments/tiny-critc.yaml does not exist"),
    (LEARNING_ENTRY.format(name="a", out="x/{seed}") + LEARNING_ENTRY.format(name="a", out="y/{seed}"),
     "a.name: 'a' is already the name of runs[0]"),
    (LEARNING_ENTRY.format(name="a", out="x/{seed}").replace("script: learning", "script: learnin"),
     "a.script: unknown script 'learnin' (one of: learning, paper_smoke, rerender_brush, unconditional)"),
    (LEARNING_ENTRY.format(name="a", out="x/{seed}").replace("    minutes: [10, 20]\n", ""),
     "a.minutes: missing"),
    (LEARNING_ENTRY.format(name="a", out="x"), "a.out: 'x' has no {seed}, so its 2 seeds would write one directory"),
    (LEARNING_ENTRY.format(name="a", out="{0: x, 2: y}"), "a.out: maps seeds [0, 2], but the entry's seeds are [0, 1]"),
    (LEARNING_ENTRY.format(name="a", out="x/{seed}") + LEARNING_ENTRY.format(name="b", out="x/{seed}"),
     "b.out: x/0 is also written by a"),
    (LEARNING_ENTRY.format(name="a", out="x/{seed}").replace("actors: 1", "actors: 0"),
     "a.actors: must be an integer >= 1, got 0"),
    (LEARNING_ENTRY.format(name="a", out="x/{seed}").replace("[10, 20]", "[20, 10]"), "a.minutes: must increase"),
    (LEARNING_ENTRY.format(name="Bad Name", out="x/{seed}"), "runs[0].name: must be lower-case letters"),
    (LEARNING_ENTRY.format(name="a", out="x/{seed}") + "    set: [env.mujoco.colour_bins=2]\n",
     "a.set: --set env.mujoco.colour_bins=2: env.mujoco.colour_bins: unknown field"),
    ("  - name: r\n    script: rerender_brush\n    runs: [bench/results/nowhere]\n    checkpoint: policy-20min.pt\n"
     "    brushes: [classic/pen]\n    out: '{run}/r.json'\n",
     "r.runs[0]: bench/results/nowhere is no earlier entry's results directory"),
])
def test_a_run_file_with_a_mistake_is_refused_naming_the_entry_and_field(tmp_path: Path, entries: str,
                                                                          message: str) -> None:
    path = write_run_file(tmp_path, entries)
    with pytest.raises(RunFileError) as refused:
        load_runs(path)
    assert f"{path}: {message}" in str(refused.value)


def test_every_mistake_of_an_entry_is_reported_at_once(tmp_path: Path) -> None:
    path = write_run_file(tmp_path, LEARNING_ENTRY.format(name="a", out="x").replace("actors: 1", "actors: 0")
                          .replace("tiny-critic.yaml", "nope.yaml") + "    colour: red\n")
    result = runs_cli("--file", str(path), "run", "--all", "--dry-run")
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert [line.split(": ", 2)[1] for line in result.stderr.splitlines()] == [
        "a.colour", "a.experiment", "a.actors", "a.out"]


def test_an_unknown_entry_or_seed_is_refused_with_what_there_is() -> None:
    unknown = runs_cli("run", "critic-reward-clip-lr-ent-1actr", "--dry-run")
    assert unknown.returncode == 2 and "did you mean critic-reward-clip-lr-ent-1actor" in unknown.stderr
    seed = runs_cli("run", "critic-reward", "--seed", "7", "--dry-run")
    assert seed.returncode == 2 and "critic-reward: no run of seed 7 (its seeds: 0, 1, 2)" in seed.stderr
    nothing = runs_cli("run")
    assert nothing.returncode == 2 and "name entries to run, or give --all or --headline" in nothing.stderr


def test_a_failing_run_stops_the_runs_after_it(tmp_path: Path) -> None:
    # bench.unconditional refuses a conditional experiment before it trains anything.
    path = write_run_file(tmp_path, (
        "  - name: refused\n    script: unconditional\n    experiment: tiny-critic.yaml\n    seeds: [0, 1]\n"
        f"    actors: 1\n    minutes: [1]\n    out: {tmp_path}/refused-{{seed}}\n"))
    result = runs_cli("--file", str(path), "run", "refused")
    assert result.returncode == 2, result.stderr
    assert result.stdout.splitlines() == [next(run for run in load_runs(path)[0].runs).shell_line()]
    assert "a conditional experiment" in result.stderr
    assert "bench.runs: refused seed 0 exited with status 2; stopped, 1 run not started" in result.stderr


def test_a_re_render_of_a_run_that_never_finished_does_not_start(tmp_path: Path) -> None:
    path = write_run_file(tmp_path, (
        f"  - name: trained\n    script: unconditional\n    experiment: tiny-unconditional.yaml\n    seeds: [0]\n"
        f"    actors: 1\n    minutes: [20]\n    out: {tmp_path}/trained\n"
        f"  - name: redrawn\n    script: rerender_brush\n    runs: [{tmp_path}/trained]\n    checkpoint: policy-20min.pt\n"
        f"    brushes: [classic/pen]\n    out: '{{run}}/rerender-brush.json'\n"))
    result = runs_cli("--file", str(path), "run", "redrawn")
    assert result.returncode == 2
    assert f"redrawn cannot start: no {tmp_path}/trained/experiment.yaml, {tmp_path}/trained/policy-20min.pt" \
        in result.stderr
    assert not (tmp_path / "trained").exists()


def test_the_makefile_runs_the_entries_through_the_runner() -> None:
    def commands(*args: str) -> str:
        result = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "-m bench.runs run --all" in commands("bench-learning")
    assert "-m bench.runs run --headline" in commands("bench-headline")
    assert re.search(r"-m bench\.runs run unconditional-pen +--seed 1\b", commands("bench-run", "NAME=unconditional-pen",
                                                                                  "SEED=1"))
    assert "-m bench.runs run critic-reward-bf16" in commands("bench-learning-bf16")
    assert "-m bench.runs run l2-shaped" in commands("bench-learning-shaped")
    assert "-m bench.runs run paper-smoke" in commands("bench-paper-smoke")
    help_text = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "default L2-shaped" not in help_text and "bench-headline" in help_text


def test_the_record_links_resolve() -> None:
    pages = [ROOT / "bench" / "RESULTS.md", *sorted((ROOT / "bench" / "log").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: broken link {target}"
