"""Imports point one way: core, then services, then wiring; and inside the core, layer by layer.

Layers are packages, not lists of modules:

* **core**: the ``spiral`` package except ``spiral.commands``, itself in ranks that import only
  downward (or within their own package):

  0. ``spiral.config``, ``spiral.losses``, ``spiral.v1``: typed settings, pure loss functions,
     generated wire messages;
  1. ``spiral.runtime`` (process runtime), ``spiral.envs`` (renderers and action spaces);
  2. ``spiral.nets`` (networks), ``spiral.data`` (datasets);
  3. ``spiral.agent`` (acting, unrolls, rewards, what the discriminator judges, training state);
  4. ``spiral.core`` (the interfaces between the parts), ``spiral.evaluation``;
  5. ``spiral.rpc`` (the same interfaces over gRPC);

* **services**: the packages ``actor``, ``learner``, ``discriminator``, ``replaybuffer`` and
  ``pbt_controller``, each the pure logic and gRPC adapter of one service;
* **wiring**: ``spiral.commands`` (the ``spiral`` command: ``up``, ``local``, ``sample``, ...)
  and every service's ``main`` module.

The test reads every ``import`` statement (at module level and inside functions) of the
production code and fails on one that points upward: a core package importing a higher rank, a
service or wiring, or a service importing another service or any wiring. A second test imports
the learning modules in a fresh interpreter and checks that they pull in no networking at all.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("actor", "learner", "discriminator", "replaybuffer", "pbt_controller")
CORE_RANKS: dict[str, int] = {
    "spiral.config": 0, "spiral.losses": 0, "spiral.v1": 0,
    "spiral.runtime": 1, "spiral.envs": 1,
    "spiral.nets": 2, "spiral.data": 2,
    "spiral.agent": 3,
    "spiral.core": 4, "spiral.evaluation": 4,
    "spiral.rpc": 5,
}
"""Each core package's rank: a package imports only from lower ranks and from itself."""
WIRING_PACKAGE = "spiral.commands"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def core_package(module: str) -> str | None:
    """The core package (a key of :data:`CORE_RANKS`) that ``module`` belongs to, if any."""
    parts = module.split(".")
    return ".".join(parts[:2]) if ".".join(parts[:2]) in CORE_RANKS else None


def layer(module: str) -> str | None:
    """``core:<package>``, ``service:<package>``, ``wiring``, or None for code outside the project.

    Raises:
        ValueError: for a ``spiral`` module in no known package (add its package to a layer).
    """
    top = module.split(".")[0]
    if module == WIRING_PACKAGE or module.startswith(f"{WIRING_PACKAGE}.") or (
            top in SERVICES and module.split(".")[1:2] == ["main"]):
        return "wiring"
    if top in SERVICES:
        return f"service:{top}"
    if top == "spiral":
        if module == "spiral":
            return "core:spiral"
        package = core_package(module)
        if package is None:
            raise ValueError(f"{module} is in no layer: put it in a package of CORE_RANKS or {WIRING_PACKAGE}")
        return f"core:{package}"
    return None


def upward(own: str, target: str) -> str | None:
    """Why importing ``target`` from ``own`` points upward, or None when it may."""
    own_layer, target_layer = layer(own), layer(target)
    if target_layer is None or own_layer == "wiring" or target_layer == own_layer or target_layer == "core:spiral":
        return None
    if target_layer == "wiring":
        return "wiring"
    if own_layer.startswith("service:"):
        return None if target_layer.startswith("core:") else "another service"
    if target_layer.startswith("service:"):
        return "a service"
    if own_layer == "core:spiral":
        return None
    own_rank, target_rank = CORE_RANKS[own_layer[5:]], CORE_RANKS[target_layer[5:]]
    return f"rank {target_rank} from rank {own_rank}" if target_rank >= own_rank else None


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
        for target in sorted(imported_modules(path)):
            reason = upward(own, target)
            if reason:
                problems.append(f"{own} ({layer(own)}) imports {target} ({layer(target)}): {reason}")
    return problems


def test_no_production_module_imports_from_a_layer_above_it() -> None:
    assert upward_imports() == []


def test_the_checker_sees_upward_imports(tmp_path: Path) -> None:
    """The rules themselves: what counts as which layer, and what an upward import is."""
    assert layer("spiral.agent.acting") == "core:spiral.agent" and layer("spiral.rpc.peers") == "core:spiral.rpc"
    assert layer("spiral.commands.up") == "wiring" and layer("learner.main") == "wiring"
    assert layer("learner.training") == "service:learner" and layer("numpy") is None
    assert upward("spiral.agent.rewards", "spiral.nets.policy") is None
    assert upward("spiral.nets.policy", "spiral.agent.rewards") == "rank 3 from rank 2"
    assert upward("spiral.rpc.peers", "learner.training") == "a service"
    assert upward("learner.training", "actor.actor") == "another service"
    assert upward("learner.learner", "spiral.commands.up") == "wiring"
    assert upward("spiral.commands.up", "learner.learner") is None
    try:
        layer("spiral.stray_module")
    except ValueError as error:
        assert "spiral.stray_module is in no layer" in str(error)
    else:
        raise AssertionError("a module outside every layer must be refused")
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom learner.training import PolicyTrainer\n\n"
                      "def f():\n    from actor import main\n")
    assert imported_modules(sample) == {"os", "learner.training", "learner.training.PolicyTrainer",
                                        "actor", "actor.main"}


def test_the_learning_code_imports_no_networking() -> None:
    """Trainers, learners, the acting loop and the training state run without grpc."""
    modules = ["learner.training", "learner.learner", "learner.ingest", "discriminator.training",
               "discriminator.learner", "spiral.agent.acting", "spiral.agent.training_state", "spiral.runtime.guarded_loop",
               "spiral.evaluation.sampling", "spiral.evaluation.reconstruction"]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'spiral.rpc', 'spiral.v1'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
