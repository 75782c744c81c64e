"""
The package layout: stages import only the stages below them, modules never
import each other in a circle, and C{fauth} itself shows exactly the public
face the implementation defines.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set

import pytest

import fauth

ROOT = pathlib.Path(fauth.__file__).parent

# Bottom to top: a package may import its own modules and those of packages
# before it in this list, never one after it.
LAYERS = ["wire", "config", "request", "routing", "auth", "upstream", "observe", "edge", "admin", "process"]


def modules() -> Dict[str, pathlib.Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(path: pathlib.Path) -> Set[str]:
    """Every fauth module C{path} imports, anywhere in it (TYPE_CHECKING and function bodies too)."""
    names: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fauth"):
            names.add(node.module)
            names.update("%s.%s" % (node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("fauth"))
    known = modules()
    return {name for name in names if name in known}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return len(LAYERS)  # fauth itself, fauth.testing: on top
    return LAYERS.index(parts[1])


def test_every_stage_is_a_package_in_the_layer_list() -> None:
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS)


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_run_downwards(module: str) -> None:
    upward = [dep for dep in imported(modules()[module]) if dep != "fauth" and layer(dep) > layer(module)]
    assert upward == [], "%s imports a stage above it: %s" % (module, upward)


def test_no_module_imports_in_a_circle() -> None:
    graph = {name: imported(path) - {name, "fauth"} for name, path in modules().items()}
    # A package's __init__ re-exporting its own modules is not a cycle.
    graph = {name: {dep for dep in deps if not name.startswith(dep + ".")} for name, deps in graph.items()}
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: %s" % " -> ".join(stack[stack.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_public_face_is_the_implementation() -> None:
    from fauth.auth import decision
    from fauth.config import document, errors
    from fauth.config.schema import SchemaError
    from fauth.edge import resources, server
    from fauth.process import service

    expected = {
        "Allow": decision.Allow,
        "ConfigError": errors.ConfigError,
        "Decision": decision.Decision,
        "Degrade": decision.Degrade,
        "ForwardAuthResource": resources.ForwardAuthResource,
        "GatewayService": service.GatewayService,
        "HardenedSite": server.HardenedSite,
        "Respond": decision.Respond,
        "load_config": document.load_config,
        "parse_config": document.parse_config,
    }
    assert sorted(fauth.__all__) == sorted(list(expected) + ["__version__"])
    for name, obj in expected.items():
        assert getattr(fauth, name) is obj, name
    assert issubclass(SchemaError, errors.ConfigError)  # one error root
    with pytest.raises(AttributeError):
        fauth.Nothing  # type: ignore[attr-defined]
