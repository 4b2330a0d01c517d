"""What a learning run's per-update record says: speed, collapses, and how far it had settled.

The policy learner writes one JSON line per update to ``RUN_DIR/learner.jsonl`` (plain or
gzipped). bench/RESULTS.md reports the same figures for every learning run; this module
computes them from that record, so they are measured the same way each time:

- ``updates`` and ``updates_per_second`` (over the record's wall clock, first update to last);
- ``collapse_updates``: updates whose batch painted on fewer than ``COLLAPSE_PAINT`` of its
  steps (the single-stroke or blank collapse of issue #10), counted after the first
  ``WARMUP_UPDATES`` (an untrained policy's paint fraction wanders);
- ``lowest_paint_fraction`` after the warm-up, and the largest gradient norm (before clipping);
- the mean entropy, trust-region clip fraction and policy lag over the last
  ``TAIL_UPDATES`` updates;
- the training-batch reconstruction error at the start and end of the last quarter, which says
  whether the run was still improving when it stopped.

Usage::

    python -m bench.run_record bench/results/critic-reward/seed-0/run/learner.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np

COLLAPSE_PAINT = 0.04
WARMUP_UPDATES = 300
TAIL_UPDATES = 200
QUARTER_WINDOW = 100  # updates averaged at each end of the last quarter


def read_record(path: Path) -> list[dict[str, Any]]:
    """The record's update rows, in update order (a ``.gz`` file is read through gzip); event rows
    (``"event"``: a held-out evaluation, a PBT copy) are left out."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        rows = [row for line in f if line.strip() and "event" not in (row := json.loads(line))]
    if not rows:
        raise ValueError(f"{path}: no updates recorded")
    return sorted(rows, key=lambda row: row["update"])


def _column(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.asarray([row[key] for row in rows if key in row], dtype=np.float64)


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The figures named in the module docstring, from the rows of one run's record."""
    settled = rows[WARMUP_UPDATES:] or rows
    tail = rows[-TAIL_UPDATES:]
    quarter = rows[3 * len(rows) // 4:]
    paint = _column(settled, "paint_fraction")
    seconds = rows[-1]["time"] - rows[0]["time"]
    summary: dict[str, float] = {
        "updates": float(rows[-1]["update"]),
        "updates_per_second": (len(rows) - 1) / seconds if seconds > 0 else 0.0,
        "collapse_updates": float(np.sum(paint < COLLAPSE_PAINT)),
        "lowest_paint_fraction": float(paint.min()),
        "largest_grad_norm": float(_column(rows, "grad_norm").max()),
        "tail_mean_entropy": float(_column(tail, "mean_entropy").mean()),
        "tail_policy_lag": float(_column(tail, "policy_lag").mean()),
        "last_quarter_l2_start": float(_column(quarter[:QUARTER_WINDOW], "reconstruction_l2").mean()),
        "last_quarter_l2_end": float(_column(quarter[-QUARTER_WINDOW:], "reconstruction_l2").mean()),
    }
    clip = _column(tail, "clip_fraction")
    if clip.size:
        summary["tail_clip_fraction"] = float(clip.mean())
    returns = _column(rows, "mean_reward")
    summary["lowest_batch_return"] = float(returns.min())
    summary["highest_batch_return"] = float(returns.max())
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, nargs="+", help="learner.jsonl or learner.jsonl.gz files")
    args = parser.parse_args()
    summaries = {str(path): summarize(read_record(path)) for path in args.records}
    for path, summary in summaries.items():
        print(path)
        for key, value in summary.items():
            print(f"  {key:24s} {value:.4g}")
    print(json.dumps(summaries))


if __name__ == "__main__":
    main()
