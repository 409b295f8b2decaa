"""The layout's dependency rules (DESIGN.md), read from every module's imports: data, model and privacy
know nothing of Flower or of the boxes that use them; the operator (server) and inference never import
the bank (client), the bank never imports the operator, and nothing but simulations imports simulations
(one exception below). The bank may use infer/ to open a published model, as model users do."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fingpt_federated"
BOXES = ("data", "model", "privacy", "federation", "client", "server", "infer", "simulations")
FORBIDDEN = {
    "data": {"flwr", "model", "privacy", "federation", "client", "server", "infer", "simulations"},
    "model": {"flwr", "privacy", "federation", "client", "server", "infer", "simulations"},
    "privacy": {"flwr", "federation", "client", "server", "infer", "simulations"},
    "federation": {"client", "server", "infer", "simulations"},
    "client": {"server", "simulations"},
    "server": {"client", "infer", "simulations"},
    "infer": {"client", "simulations"},
}

EXCEPTIONS = {
    # the hostile-bank harness poisons a simulated bank's data with fingpt-audit's canaries and backdoor,
    # imported inside the function that only a simulation's FederationSpec reaches
    "client/hostile.py": {"simulations"},
}


def imported(path: Path) -> set[str]:
    """The top-level names a module imports: `flwr`, or the box of a fingpt_federated module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        for module in modules:
            parts = module.split(".")
            names.add(parts[1] if parts[0] == PACKAGE and len(parts) > 1 else parts[0])
    return names


@pytest.mark.parametrize("box", sorted(FORBIDDEN))
def test_a_box_imports_only_what_the_layout_allows(box):
    broken = {}
    for path in (ROOT / box).rglob("*.py"):
        name = path.relative_to(ROOT).as_posix()
        broken[name] = sorted(imported(path) & FORBIDDEN[box] - EXCEPTIONS.get(name, set()))
    assert {path: names for path, names in broken.items() if names} == {}


def test_the_rule_sees_imports_inside_functions_and_from_the_package(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from fingpt_federated.server.publish import publish\n    import flwr.app\n")
    assert imported(module) == {"server", "flwr"}
