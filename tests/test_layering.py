"""Imports point one way: core, then services, then wiring.

* **core**: ``spiral.*`` (networks, environments, losses, the acting loop, training state, the
  gRPC toolkit in ``spiral.rpc``), except the wiring modules below;
* **services**: the packages ``actor``, ``learner``, ``discriminator``, ``replaybuffer`` and
  ``pbt_controller``, each the pure logic and gRPC adapter of one service;
* **wiring**: every service's ``main`` module, ``spiral.cli``, ``spiral.up`` and ``spiral.local``.

The test reads every ``import`` statement (at module level and inside functions) of the
production code and fails on one that points upward: core importing a service or wiring, or a
service importing another service or any wiring. A second test imports the learning modules in
a fresh interpreter and checks that they pull in no networking at all.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("actor", "learner", "discriminator", "replaybuffer", "pbt_controller")
WIRING = frozenset({"spiral.cli", "spiral.up", "spiral.local", *(f"{service}.main" for service in SERVICES)})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str | None:
    """``core``, ``service:<package>``, ``wiring``, or None for code outside the project."""
    if module in WIRING or any(module.startswith(f"{w}.") for w in WIRING):
        return "wiring"
    top = module.split(".")[0]
    if top == "spiral":
        return "core"
    if top in SERVICES:
        return f"service:{top}"
    return None


def imported_modules(path: Path) -> set[str]:
    """Absolute module names that ``path`` imports (``from a.b import c`` yields ``a.b`` and ``a.b.c``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def production_files() -> list[Path]:
    files = []
    for package in ("spiral", *SERVICES):
        files += [p for p in (ROOT / package).rglob("*.py") if "v1" not in p.relative_to(ROOT).parts]
    return sorted(files)


def upward_imports() -> list[str]:
    problems = []
    for path in production_files():
        own = module_name(path)
        own_layer = layer(own)
        for target in sorted(imported_modules(path)):
            target_layer = layer(target)
            if target_layer is None or target_layer == "core" or own_layer == "wiring":
                continue
            if own_layer == "core":
                problems.append(f"{own} (core) imports {target} ({target_layer})")
            elif target_layer == "wiring":
                problems.append(f"{own} ({own_layer}) imports {target} (wiring)")
            elif target_layer != own_layer:
                problems.append(f"{own} ({own_layer}) imports {target} ({target_layer})")
    return problems


def test_no_production_module_imports_from_a_layer_above_it() -> None:
    assert upward_imports() == []


def test_the_checker_sees_upward_imports(tmp_path: Path) -> None:
    """The rules themselves: what counts as which layer, and what an upward import is."""
    assert layer("spiral.acting") == "core" and layer("spiral.rpc.peers") == "core"
    assert layer("spiral.up") == "wiring" and layer("learner.main") == "wiring"
    assert layer("learner.training") == "service:learner" and layer("numpy") is None
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom learner.training import PolicyTrainer\n\n"
                      "def f():\n    from actor import main\n")
    assert imported_modules(sample) == {"os", "learner.training", "learner.training.PolicyTrainer",
                                        "actor", "actor.main"}


def test_the_learning_code_imports_no_networking() -> None:
    """Trainers, learners, the acting loop and the training state run without grpc."""
    modules = ["learner.training", "learner.learner", "learner.ingest", "discriminator.training",
               "discriminator.learner", "spiral.acting", "spiral.training_state", "spiral.guarded_loop",
               "spiral.sampling", "spiral.evaluation"]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'spiral.rpc', 'spiral.v1'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
