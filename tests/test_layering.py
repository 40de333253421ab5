"""Dependencies point one way: the device SDK does not import the aggregator, the aggregator
does not import the training stack (torch, transformers, PEFT), which an aggregator host need
not install, and test modules import what they share from ``tests/helpers/``, not each other.
And one place per concern: only the adapter kinds' packages know which kind an adapter is, and
no source file grows past 500 lines.

The source is read with ``ast``, not imported: an import inside a function, which runs only on
some paths and so slips past a test that imports the package, is found like one at the top.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SDK = REPO / "sdk" / "edgetune"
AGGREGATOR = REPO / "aggregator" / "edgetune_aggregator"
TESTS = REPO / "tests"

#: the sdk modules that run both sides in one process, so import the aggregator on purpose
RUNS_BOTH_SIDES = {
    "sdk/edgetune/demo.py": "`edgetune demo` runs the aggregator daemon on a thread beside its device processes",
    "sdk/edgetune/sim/runner.py": "the simulator drives the real daemon and real devices on one simulated clock",
    "sdk/edgetune/bench/personalization.py": "the benchmark merges its rounds in process with the aggregator's "
                                             "own strategy",
}
TRAINING_STACK = ("torch", "transformers", "peft")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every absolute import in the file, wherever it stands, and for
    ``importlib.import_module`` or ``__import__`` called with a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            found.append((node.lineno, node.args[0].value))
    return found


def _is_dynamic_import(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return (name in ("import_module", "__import__") and bool(call.args)
            and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str))


def imports_of(package: Path, forbidden: Callable[[str], bool]) -> dict[str, list[str]]:
    """``{file: ["file:line imports module", …]}`` for the package's files that import a module
    whose top-level name is ``forbidden``."""
    files = sorted(package.rglob("*.py"))
    assert files, f"no Python files under {package}"
    found: dict[str, list[str]] = {}
    for path in files:
        name = path.relative_to(REPO).as_posix()
        hits = [f"{name}:{line} imports {module}" for line, module in imported_modules(path)
                if forbidden(module.split(".")[0])]
        if hits:
            found[name] = hits
    return found


def test_the_sdk_does_not_import_the_aggregator():
    found = imports_of(SDK, lambda top: top == "edgetune_aggregator")
    unexpected = [hit for name, hits in found.items() if name not in RUNS_BOTH_SIDES for hit in hits]
    assert not unexpected, ("the device SDK must not depend on the aggregator (a device installs only edgetune); "
                            "move the shared code into edgetune:\n" + "\n".join(unexpected))
    stale = sorted(set(RUNS_BOTH_SIDES) - set(found))
    assert not stale, f"these no longer import the aggregator: take them off RUNS_BOTH_SIDES: {stale}"


def test_the_aggregator_does_not_import_the_training_stack():
    found = [hit for hits in imports_of(AGGREGATOR, lambda top: top in TRAINING_STACK).values() for hit in hits]
    assert not found, ("the aggregator must run without torch, transformers and PEFT; do that work on the "
                       "device side or with numpy:\n" + "\n".join(found))


def test_test_modules_share_code_through_helpers_only():
    found = [hit for hits in imports_of(TESTS, lambda top: top.startswith("test_") or top == "conftest").values() for hit in hits]
    assert not found, ("a test module or helper imports a test module or conftest; move what is shared into "
                       "tests/helpers/:\n" + "\n".join(found))


def test_imports_inside_functions_and_by_name_are_found(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import os.path\nfrom . import sibling\n\n\ndef late():\n"
                      "    from edgetune_aggregator.daemon import Aggregator\n"
                      "    return importlib.import_module('torch'), __import__('peft')\n")
    assert sorted(imported_modules(source)) == [(1, "os.path"), (6, "edgetune_aggregator.daemon"), (7, "peft"), (7, "torch")]


# --- one place per concern ------------------------------------------------------------------

ADAPTERS = SDK / "adapters"
#: the adapter kinds' specs and names: code outside ``sdk/edgetune/adapters/`` asks the registry
#: (``adapter_kind(spec)``) instead of testing which of them it holds
KIND_SPECS, KIND_NAMES = {"LoraSpec", "PromptSpec"}, {"lora", "prompt"}
#: the size past which a file should be split (docs/architecture.md, ../shared/STYLE.md)
MAX_LINES = 500


def kind_branches(path: Path) -> list[tuple[int, str]]:
    """``(line, what)`` for each test of an adapter's kind in the file: ``isinstance`` with a
    kind's spec class, or a comparison with a kind's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                and len(node.args) == 2):
            classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            names = {c.id if isinstance(c, ast.Name) else c.attr if isinstance(c, ast.Attribute) else "" for c in classes}
            if names & KIND_SPECS:
                found.append((node.lineno, f"isinstance(…, {'/'.join(sorted(names & KIND_SPECS))})"))
        elif isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                if isinstance(side, ast.Constant) and side.value in KIND_NAMES:
                    found.append((node.lineno, f"a comparison with {side.value!r}"))
    return found


def test_only_the_adapter_kinds_know_which_kind_they_are():
    found = [f"{path.relative_to(REPO).as_posix()}:{line} {what}"
             for package in (SDK, AGGREGATOR) for path in sorted(package.rglob("*.py"))
             if ADAPTERS not in path.parents for line, what in kind_branches(path)]
    assert not found, ("code outside sdk/edgetune/adapters/ tests which adapter kind it holds; ask the kind "
                       "instead (adapter_kind(spec), docs/architecture.md):\n" + "\n".join(found))


def test_kind_branches_are_found(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("def f(spec, w):\n    if isinstance(spec, (LoraSpec, int)):\n        return 1\n"
                      "    return spec.kind == 'prompt' or 'lora' != w or isinstance(spec, wire.PromptSpec)\n")
    assert [line for line, _ in kind_branches(source)] == [2, 4, 4, 4]


def test_no_source_file_is_over_500_lines():
    long = [f"{path.relative_to(REPO).as_posix()}: {n} lines" for package in (SDK, AGGREGATOR)
            for path in sorted(package.rglob("*.py")) if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, f"split these along their jobs (at most {MAX_LINES} lines a file):\n" + "\n".join(long)
