"""The steps of ``bench/gpu_check.sh``, each writing its log and a JSON summary into the output folder.

``bench/gpu_check.sh`` installs the carried wheels and spiral first (that must happen before
Python imports grpc), then runs ``python -m bench.gpu_check CALL``:

* ``call1``: ``install.json`` (what the install did, the versions and the GPU it runs on),
  ``cuda_tests`` (``pytest -m cuda``: tests/test_cuda.py, every computation on cuda against the
  CPU) and ``update_speed`` (:mod:`bench.update_speed` for ``tiny`` and ``mnist``, fp32 and
  bf16, batch 64, with the device's matmul peak in the same run);
* ``call2``: ``install.json`` and ``actor_scaling`` (:mod:`bench.actor_scaling`: ``mnist`` with
  1, 4 and 12 actors on the fast renderer, the learners on the device), with the learners' own
  logs beside it.

Each step is a subprocess with a time limit (so a call stays well under 5 minutes of device
time); ``STEP.log`` holds its output and ``STEP.json`` holds ``ok``, its exit status, its
seconds, the command and its figures (the step's last JSON line, or pytest's counts). With
``--quick`` the same steps run at tiny sizes, seconds each: what the test suite runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CUDA_TEST_FILES = ["tests/test_cuda.py"]
"""The files that hold the ``cuda``-marked tests (collecting the whole suite would need every test
dependency on the device)."""
RENDERER = "fast"
"""The scaling figures' renderer: the GPU machine has no libmypaint, and the fast renderer
needs nothing but torch and numba (which it has)."""
LOG_TAIL_BYTES = 2 << 20
"""How much of a learner's log is kept beside the figures (the device returns few, small files)."""

STEPS: dict[str, dict[bool, dict[str, Any]]] = {
    # step -> quick? -> settings
    "update_speed": {
        False: {"args": ["--config", "tiny", "mnist", "--batch", "64", "--updates", "5"], "timeout": 170},
        True: {"args": ["--config", "tiny", "mnist", "--batch", "2", "--updates", "1"], "timeout": 300},
    },
    "actor_scaling": {
        False: {"args": ["--config", "mnist", "--actors", "1", "4", "12", "--seconds", "40", "--settle", "8",
                         "--warmup-updates", "3", "--warmup-timeout", "120"], "timeout": 290},
        True: {"args": ["--config", "tiny", "--actors", "1", "2", "--seconds", "4", "--settle", "3",
                        "--warmup-updates", "1", "--warmup-timeout", "150", "--set", "learner.compile=false"],
               "timeout": 300},
    },
}
"""Each timed step's arguments and time limit (seconds), at full size and with ``--quick``."""


def write_json(out: Path, step: str, summary: dict[str, Any]) -> None:
    (out / f"{step}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"gpu check: {step}: {'ok' if summary.get('ok') else 'FAILED'} ({summary.get('seconds', 0):.0f} s)",
          flush=True)


def last_json_line(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that is a JSON object (how the benchmarks report)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_step(out: Path, step: str, command: list[str], timeout: float) -> tuple[dict[str, Any], str]:
    """Run ``command`` with its output in ``STEP.log``; its summary and its output.

    On the time limit it is sent SIGTERM (the system benchmark then stops its processes) and,
    20 s later, SIGKILL.
    """
    log_path = out / f"{step}.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
        timed_out = False
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            process.send_signal(signal.SIGTERM)
            try:
                returncode = process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                returncode = process.wait()
    text = log_path.read_text(errors="replace")
    summary = {"step": step, "ok": returncode == 0 and not timed_out, "returncode": returncode,
               "timed_out": timed_out, "seconds": time.monotonic() - started, "command": command}
    return summary, text


def versions() -> dict[str, Any]:
    """What this Python runs: its version, torch and CUDA, grpc and protobuf, and the GPU."""
    import torch

    found: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                             "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for package in ("grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection", "dacite", "mlxtend",
                    "numba", "numpy", "spiral"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        found["gpu"] = {"name": properties.name, "memory_gib": properties.total_memory / 2 ** 30,
                        "multiprocessors": properties.multi_processor_count,
                        "capability": f"{properties.major}.{properties.minor}"}
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        found["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    found["cores"] = len(os.sched_getaffinity(0))
    return found


def install_summary(out: Path, args: argparse.Namespace) -> bool:
    """``install.json``: the shell's install results (its log is ``install.log``) and what imports now."""
    started = time.monotonic()
    summary: dict[str, Any] = {"step": "install", "wheels": args.wheels, "spiral": args.spiral_install,
                               "quick": args.quick}
    try:
        summary["versions"] = versions()
        import grpc  # noqa: F401 - the stubs refuse an older grpcio at import

        from spiral.v1 import learner_pb2_grpc  # noqa: F401
        summary["imports"] = "ok"
    except Exception as exc:  # noqa: BLE001 - recorded, and the later steps show what it breaks
        summary["imports"] = f"{type(exc).__name__}: {exc}"
    summary["ok"] = summary["imports"] == "ok" and args.wheels in ("installed", "checked", "none")
    summary["seconds"] = time.monotonic() - started
    write_json(out, "install", summary)
    return summary["ok"]


def cuda_tests(out: Path, args: argparse.Namespace) -> bool:
    """``pytest -m cuda`` on the device; the counts and each failure from its JUnit report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "cuda", *CUDA_TEST_FILES, "-q", "-rA", "-p",
                   "no:cacheprovider", f"--junit-xml={report}"]
        summary, _ = run_step(out, "cuda_tests", command, timeout=150)
        counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
        failures = []
        if report.exists():
            for case in ElementTree.parse(report).getroot().iter("testcase"):
                problem = case.find("failure") if case.find("failure") is not None else case.find("error")
                if problem is not None:
                    counts["failed" if problem.tag == "failure" else "errors"] += 1
                    failures.append({"test": case.get("name"), "message": (problem.get("message") or "")[:2000]})
                elif case.find("skipped") is not None:
                    counts["skipped"] += 1
                else:
                    counts["passed"] += 1
    summary.update(counts, failures=failures, device=args.device)
    summary["ok"] = summary["ok"] and counts["failed"] == counts["errors"] == 0
    write_json(out, "cuda_tests", summary)
    return summary["ok"]


def timed_bench(out: Path, args: argparse.Namespace, step: str, extra: list[str]) -> dict[str, Any]:
    """A benchmark module run as one step; its last JSON line is the step's ``results``."""
    settings = STEPS[step][args.quick]
    command = [sys.executable, "-m", f"bench.{step}", *settings["args"], "--device", args.device, *extra]
    summary, text = run_step(out, step, command, settings["timeout"])
    summary.update(device=args.device, quick=args.quick, results=last_json_line(text))
    summary["ok"] = summary["ok"] and summary["results"] is not None
    return summary


def update_speed(out: Path, args: argparse.Namespace) -> bool:
    summary = timed_bench(out, args, "update_speed", ["--backend", RENDERER])
    write_json(out, "update_speed", summary)
    return summary["ok"]


def actor_scaling(out: Path, args: argparse.Namespace) -> bool:
    with tempfile.TemporaryDirectory(prefix="spiral-gpu-check-") as work:
        summary = timed_bench(out, args, "actor_scaling", ["--set", f"env.paint.backend={RENDERER}",
                                                           "--work-dir", work])
        for role in ("learner", "discriminator"):  # what to read when the figures look wrong
            log = Path(work) / "run" / "logs" / f"{role}.log"
            if log.exists():
                with open(log, "rb") as source:
                    source.seek(max(0, log.stat().st_size - LOG_TAIL_BYTES))
                    (out / f"actor_scaling_{role}.log").write_bytes(source.read())
    summary["renderer"] = RENDERER
    write_json(out, "actor_scaling", summary)
    return summary["ok"]


CALLS = {"call1": (install_summary, cuda_tests, update_speed), "call2": (install_summary, actor_scaling)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("call", choices=sorted(CALLS))
    parser.add_argument("--device", default="cuda", help="the learners' device (cpu for a dry run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds per step")
    parser.add_argument("--out", required=True, help="folder for STEP.log and STEP.json")
    parser.add_argument("--wheels", default="none", help="what the shell did with .whl: installed, checked, none, "
                                                         "failed")
    parser.add_argument("--spiral-install", default="not run", help="what the shell's pip install of spiral did")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {step.__name__: step(out, args) for step in CALLS[args.call]}
    print(f"gpu check {args.call}: {json.dumps(results)}", flush=True)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
