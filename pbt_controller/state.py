"""The controller's durable state, its logs, and the population plot.

Everything lives under ``RUN_DIR/pbt/``:

* ``state.json``: :class:`ControllerState` (every member's record, the actor assignments with
  their last-seen times, and the random generator's state), rewritten atomically (temporary
  file, fsync, rename, directory fsync) after every change and reloaded on start, so a
  restarted controller continues exactly where it stopped: no member, hyperparameter, exploit
  count or actor assignment is lost, and its random choices continue the same sequence.
* ``lineage.jsonl``: one JSON line per event, appended and fsynced before the answer leaves:
  ``start`` (a member's sampled initial hyperparameters), ``exploit`` (it copied ``donor``:
  hyperparameters before = its own, after = the donor's) and ``explore`` (the copied ones were
  perturbed: before = the donor's, after = the new ones). Fields: ``time``, ``member``,
  ``event``, ``donor``, ``hyperparameters_before``, ``hyperparameters_after``, ``fitness``
  (the member's last reported fitness), ``donor_fitness``.
* ``reports.jsonl``: every accepted report (time, member, updates, policy_version, fitness,
  the hyperparameters in effect, and the action answered).
* ``population.png``: :func:`plot_population`: fitness and each hyperparameter over time per
  member, with exploits marked.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pbt_controller.decision import MemberRecord
from spiral.runtime.atomic import atomic_write_bytes

STATE_FILE = "state.json"
LINEAGE_FILE = "lineage.jsonl"
REPORTS_FILE = "reports.jsonl"
PLOT_FILE = "population.png"
STATE_FORMAT = 1


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (a crash after the return cannot lose it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn last line (a crash mid-write) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@dataclass
class ActorRecord:
    """An actor's assignment: the member it serves and when it last asked (Unix seconds)."""

    member: int
    last_seen: float


@dataclass
class ControllerState:
    """Everything the controller must not forget.

    Attributes:
        members: Member index -> record.
        actors: Actor id -> assignment.
        rng_state: ``random.Random.getstate()`` of the decision generator (JSON-friendly lists).
        seed: The seed the generator started from.
    """

    members: dict[int, MemberRecord] = field(default_factory=dict)
    actors: dict[str, ActorRecord] = field(default_factory=dict)
    rng_state: Any = None
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "members": [asdict(r) for r in sorted(self.members.values(), key=lambda r: r.member)],
            "actors": {actor: asdict(a) for actor, a in sorted(self.actors.items())},
            "rng_state": _jsonable(self.rng_state),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ControllerState":
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"state format {data.get('format')!r} is not {STATE_FORMAT}")
        members = {}
        for row in data["members"]:
            record = MemberRecord(**row)
            record.hyperparameters = {str(k): float(v) for k, v in record.hyperparameters.items()}
            members[record.member] = record
        actors = {str(k): ActorRecord(**v) for k, v in data.get("actors", {}).items()}
        return cls(members=members, actors=actors, rng_state=data.get("rng_state"), seed=int(data.get("seed", 0)))

    def restore_rng(self) -> random.Random:
        """A generator in the saved state (or freshly seeded when none was saved)."""
        rng = random.Random(self.seed)
        if self.rng_state is not None:
            rng.setstate(_tupled(self.rng_state))
        return rng


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


class StateStore:
    """The files under ``RUN_DIR/pbt``: load/save the state, append lineage and reports."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def lineage_path(self) -> Path:
        return self.directory / LINEAGE_FILE

    @property
    def reports_path(self) -> Path:
        return self.directory / REPORTS_FILE

    @property
    def plot_path(self) -> Path:
        return self.directory / PLOT_FILE

    def load(self) -> ControllerState | None:
        """The saved state, or None when there is none.

        Raises:
            ValueError: ``state.json`` exists but cannot be read (never silently start over:
                that would lose the population).
        """
        if not self.state_path.exists():
            return None
        try:
            return ControllerState.from_json(json.loads(self.state_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read PBT state {self.state_path}: {exc}") from None

    def save(self, state: ControllerState) -> None:
        atomic_write_bytes(self.state_path, json.dumps(state.to_json(), sort_keys=True).encode("utf-8"))

    def append_lineage(self, row: dict[str, Any]) -> None:
        append_jsonl(self.lineage_path, row)

    def append_report(self, row: dict[str, Any]) -> None:
        append_jsonl(self.reports_path, row)

    def lineage(self) -> list[dict[str, Any]]:
        return read_jsonl(self.lineage_path)

    def reports(self) -> list[dict[str, Any]]:
        return read_jsonl(self.reports_path)

    def plot(self) -> Path:
        return plot_population(self.reports(), self.lineage(), self.plot_path)


def plot_population(reports: list[dict[str, Any]], lineage: list[dict[str, Any]], out_path: str | Path) -> Path:
    """Fitness and each hyperparameter against time (minutes since the first event) per member.

    Hyperparameter curves start at the sampled values (lineage ``start``) and follow the values
    in effect after each report, so a member's line jumps where it copied a donor and explored;
    each exploit is marked with an ``x`` at the fitness that triggered it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [float(r["time"]) for r in (*reports, *lineage) if "time" in r]
    t0 = min(times) if times else 0.0
    names = sorted({name for r in (*reports, *lineage)
                    for name in (r.get("hyperparameters") or r.get("hyperparameters_after") or {})})
    panels = ["fitness", *names]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), squeeze=False, sharex=True)
    members = sorted({int(r["member"]) for r in (*reports, *lineage)})
    colors = plt.get_cmap("tab20")
    for index, member in enumerate(members):
        color = colors(index % 20)
        mine = sorted((r for r in reports if int(r["member"]) == member), key=lambda r: r["time"])
        events = sorted((r for r in lineage if int(r["member"]) == member), key=lambda r: r["time"])
        xs = [(r["time"] - t0) / 60 for r in mine if math.isfinite(r.get("fitness", math.nan))]
        ys = [r["fitness"] for r in mine if math.isfinite(r.get("fitness", math.nan))]
        axes[0, 0].plot(xs, ys, color=color, label=f"member {member}", marker=".", markersize=3)
        for panel, name in enumerate(names, start=1):
            # Start values, then each report's values in effect after its answer (an exploit's
            # explored values appear at the report that caused it).
            points = [((e["time"] - t0) / 60, e["hyperparameters_after"][name]) for e in events
                      if e.get("event") == "start" and name in (e.get("hyperparameters_after") or {})]
            points += [((r["time"] - t0) / 60, r["hyperparameters"][name]) for r in mine
                       if name in r.get("hyperparameters", {})]
            points.sort(key=lambda p: p[0])  # stable: a start precedes a report at the same time
            axes[panel, 0].step([p[0] for p in points], [p[1] for p in points], where="post", color=color)
        exploits = [e for e in events if e.get("event") == "exploit" and math.isfinite(e.get("fitness") or math.nan)]
        axes[0, 0].plot([(e["time"] - t0) / 60 for e in exploits], [e["fitness"] for e in exploits], "x",
                        color=color, markersize=7)
    axes[0, 0].set_ylabel("fitness")
    for panel, name in enumerate(names, start=1):
        axes[panel, 0].set_ylabel(name)
        axes[panel, 0].set_yscale("log")
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
    if members:
        axes[0, 0].legend(fontsize=7, ncol=min(4, len(members)), loc="best")
    axes[-1, 0].set_xlabel("minutes")
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)
    return out
