"""The package's layers point down: every module imports on its own and in any order, nothing
in the package imports the CLI (``convstate.cli`` is only the entry point), and the low
modules never import the layers above them (the clients, the adapters, the operator views,
the daemon, the demo, the CLI), nor the package itself (its ``__init__`` imports the
client)."""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyclient" / "convstate"
PYCLIENT = PACKAGE.parent
#: Modules that must stay below the clients, the operator views, the daemon, the demo and the CLI.
LOW = (
    *("errors", "tokens", "keys", "models", "operations", "scripts", "planner", "verify"),
    *("urls", "window", "transport", "timeouts", "summarizers", "sdnotify", "embedded"),
)
#: The upper layers the low modules must not reach.
UPPER = (
    *("convstate.client", "convstate.adapters", "convstate.admin"),
    *("convstate.cli", "convstate.daemon", "convstate.demo"),
)
TIMEOUT = 120


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PYCLIENT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = sorted(_module_name(p) for p in PACKAGE.rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (function-level imports count
    too), with relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return _imports_of(path.read_text(encoding="utf-8"), package)


def _imports_of(source: str, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                module = ".".join([*base, *([module] if module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _reaches(imported: set[str], target: str) -> bool:
    return any(m == target or m.startswith(target + ".") for m in imported)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PYCLIENT), env.get("PYTHONPATH")]))
    return env


def test_the_module_list_is_the_package() -> None:
    assert "convstate.cli" in MODULES
    assert "convstate.tokens" in MODULES
    assert all(m == "convstate" or m.startswith("convstate.") for m in MODULES)


def test_nothing_in_the_package_imports_the_cli() -> None:
    offenders = {
        _module_name(path): sorted(m for m in _imported(path) if _reaches({m}, "convstate.cli"))
        for path in PACKAGE.rglob("*.py")
        if _module_name(path) != "convstate.cli" and _reaches(_imported(path), "convstate.cli")
    }
    assert offenders == {}


@pytest.mark.parametrize(
    "source",
    [
        "import convstate.cli",
        "from convstate.cli import main",
        "from convstate import cli",
        "def f():\n    from .cli import main",
        "from ..cli import main",
    ],
)
def test_the_scan_sees_every_spelling_of_an_import(source: str) -> None:
    """The scan is not vacuous: each way of importing the CLI is caught (``..`` as written
    in a subpackage such as ``convstate.demo``)."""
    package = "convstate.demo" if source.startswith("from ..") else "convstate"
    assert _reaches(_imports_of(source, package), "convstate.cli")


@pytest.mark.parametrize("low", LOW)
def test_low_modules_never_import_the_upper_layers(low: str) -> None:
    path = PACKAGE / f"{low}.py"
    if not path.exists():
        path = PACKAGE / low / "__init__.py"
    assert path.exists(), f"{low} is in LOW but not in the package"
    imported = _imported(path)
    assert [upper for upper in UPPER if _reaches(imported, upper)] == []
    # ``from convstate import X`` runs the package's __init__, which imports the client.
    assert "convstate" not in imported, "import from convstate.X, not from the package"


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """What ``python -c "import convstate.X"`` does: a cycle shows up when X comes first."""
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


#: What ``convstate --help`` and the operator commands must not load: the daemon's stack and
#: the demo import on first use, by the commands that run them.
LAZY = ("convstate.daemon", "convstate.compactor", "convstate.summarizers", "convstate.demo")
LOADED = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from convstate.cli import main

    def loaded():
        return sorted(m for m in sys.modules if m.startswith("convstate."))

    steps = {"import": loaded()}
    for args in (["--help"], ["stats", "--help"], ["daemon", "--help"]):
        with contextlib.redirect_stdout(io.StringIO()):
            main.main(args, standalone_mode=False)
        steps[" ".join(args)] = loaded()
    print(json.dumps(steps))
    """
)


def test_the_cli_loads_the_daemon_and_the_demo_only_for_their_commands() -> None:
    """Importing ``convstate.cli``, its ``--help`` and an operator command's leave the daemon,
    the compactor, the summarizers and the demo unloaded; ``daemon --help`` loads the daemon
    (which shows the check sees an import)."""
    proc = subprocess.run(
        [sys.executable, "-c", LOADED],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    steps = json.loads(proc.stdout)
    for step in ("import", "--help", "stats --help"):
        assert [m for m in LAZY if _reaches(set(steps[step]), m)] == [], step
    assert "convstate.daemon" in steps["daemon --help"]


ORDERS = textwrap.dedent(
    """
    import importlib, json, sys
    orders = json.loads(sys.argv[1])
    for order in orders:
        for name in [m for m in sys.modules if m == "convstate" or m.startswith("convstate.")]:
            del sys.modules[name]
        for module in order:
            importlib.import_module(module)
    print(len(orders))
    """
)


def test_every_module_imports_in_any_order() -> None:
    """Each module first, then the rest shuffled; plus the full list forwards and backwards.
    convstate's modules are dropped from ``sys.modules`` before each order (third-party ones
    stay loaded: a cycle can only run through convstate's own)."""
    rng = random.Random(14)
    orders = [MODULES, MODULES[::-1]]
    for first in MODULES:
        rest = [m for m in MODULES if m != first]
        rng.shuffle(rest)
        orders.append([first, *rest])
    proc = subprocess.run(
        [sys.executable, "-c", ORDERS, json.dumps(orders)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(len(orders))


#: The soak harness (tests/reliability/soak), its modules lowest first.
SOAK = PACKAGE.parent.parent / "tests" / "reliability" / "soak"
SOAK_LAYERS = (
    *("config", "writers", "ledger", "invariants", "daemons"),
    *("monitor", "result", "faults", "run"),
)


def _runtime_imports(path: Path, package: str) -> set[str]:
    """What ``path`` imports when it runs: imports under ``if TYPE_CHECKING:`` (names for
    annotations only) are left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    tree.body = [
        node
        for node in tree.body
        if not (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING"
        )
    ]
    return _imports_of(ast.unparse(tree), package)


def test_the_soak_harness_layers_point_down() -> None:
    """Each module of the soak harness imports only the modules below it (so none is part of
    a cycle, whatever is imported first); the package re-exports them all."""
    package = "tests.reliability.soak"
    assert sorted(p.stem for p in SOAK.glob("*.py")) == sorted([*SOAK_LAYERS, "__init__"])
    for i, name in enumerate(SOAK_LAYERS):
        imported = _runtime_imports(SOAK / f"{name}.py", package)
        reached = {m for m in SOAK_LAYERS if _reaches(imported, f"{package}.{m}")}
        assert reached <= set(SOAK_LAYERS[:i]), f"{name} imports {sorted(reached)}"
        assert package not in imported, f"{name} imports the package (its __init__)"


SCRIPTS = PACKAGE.parent.parent / "scripts"


def test_the_benchmark_package_runs_and_shares_one_fake_summarizer() -> None:
    """``python scripts/bench`` (the command the README gives) parses its arguments, and
    ``bench_compaction.py`` measures against the benchmark package's fake summarizer."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench"), "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bench_compaction as bc; "
        "from bench.fake_summarizer import SleepSummarizer; "
        "assert bc.SleepSummarizer is SleepSummarizer"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(SCRIPTS)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
