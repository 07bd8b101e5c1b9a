"""The import contract of src/lorabound: layers, no circles, no private names across modules.

A unit is a top-level module or subpackage of lorabound (``rules``, ``runtime``, ``lora``, ...). Each unit sits in
one layer and imports only units of lower layers; units that share a layer do not import each other. Inside a unit,
modules import each other freely, but never in a circle. No module imports another module's ``_private`` name,
neither ``from x import _name`` nor ``x._name``. Imports inside function bodies count like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorabound"

LAYERS = [  # lowest first
    ["errors", "results"],
    ["rules", "formatting"],
    ["runtime", "metrics"],
    ["data", "model"],
    ["options", "lora"],
    ["training", "analysis", "generation"],
    ["decision"],
    ["evaluation", "timing"],
    ["report"],
    ["pipeline"],
    ["studies"],
    ["cli"],
]
LAYER_OF = {unit: position for position, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_sources(root: Path = SRC) -> dict[str, tuple[str, bool]]:
    """module name -> (source, is_package)"""
    return {module_name(path, root): (path.read_text(encoding="utf-8"), path.name == "__init__.py")
            for path in sorted(root.rglob("*.py"))}


def imports_of(module: str, source: str, is_package: bool, known: set[str]):
    """(imported module, names taken from it, line) for every lorabound import, relative ones resolved. A name that
    is itself a module (``from . import files``) counts as an import of that module."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lorabound":
                    yield alias.name, [], node.lineno, alias.asname
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lorabound":
                continue
            names = []
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    yield f"{target}.{alias.name}", [], node.lineno, alias.asname or alias.name
                else:
                    names.append(alias.name)
            if names:
                yield target, names, node.lineno, None


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    known = set(sources)
    found, edges = [], {module: set() for module in sources}
    for module, (source, is_package) in sources.items():
        if module == "lorabound":
            continue  # the root's curated API imports by name on first use; see lorabound/__init__.py
        unit = unit_of(module)
        if unit not in LAYER_OF:
            found.append(f"{module}: its unit {unit!r} is in no layer of LAYERS")
            continue
        bound = {}  # local name -> lorabound module, for the x._name check
        for target, names, line, alias in imports_of(module, source, is_package, known):
            if alias:
                bound[alias] = target
            target_unit = unit_of(target)
            if target != "lorabound" and target != module:
                edges[module].add(target)
            if target_unit is not None and target_unit != unit:
                if target_unit not in LAYER_OF:
                    found.append(f"{module}:{line} imports {target}, whose unit is in no layer")
                elif LAYER_OF[target_unit] >= LAYER_OF[unit]:
                    relation = "a sibling in its layer" if LAYER_OF[target_unit] == LAYER_OF[unit] else "a higher layer"
                    found.append(f"{module}:{line} imports {target}, {relation}")
            for name in names:
                if is_private(name) and target != module:
                    found.append(f"{module}:{line} imports the private name {name} from {target}")
        for node in ast.walk(ast.parse(source)):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and is_private(node.attr)):
                found.append(f"{module}:{node.lineno} uses the private {bound[node.value.id]}.{node.attr}")
    found += [f"import circle: {' -> '.join(circle)}" for circle in circles(edges)]
    return found


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan), as a path that returns to its start."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for following in edges.get(node, ()):
            if following not in index:
                visit(following)
                low[node] = min(low[node], low[following])
            elif following in on_stack:
                low[node] = min(low[node], index[following])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group) + [sorted(group)[0]])

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def test_every_unit_has_a_layer_and_every_layer_a_unit():
    units = {unit_of(module) for module in read_sources()} - {None}
    assert units == set(LAYER_OF), f"in no layer: {units - set(LAYER_OF)}; no such unit: {set(LAYER_OF) - units}"


def test_the_package_keeps_the_contract():
    assert violations(read_sources()) == []


def test_subpackages_name_their_modules():
    """Each subpackage's __init__ has a docstring naming its modules, and an __all__."""
    for init in sorted(SRC.glob("*/__init__.py")):
        tree = ast.parse(init.read_text(encoding="utf-8"))
        doc = ast.get_docstring(tree) or ""
        assert any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
                   for node in tree.body), f"{init} has no __all__"
        for module in sorted(init.parent.glob("*.py")):
            if module.name != "__init__.py":
                assert f".{module.stem}`" in doc, f"{init}'s docstring does not name {module.stem}"


def synthetic(**modules: str) -> dict[str, tuple[str, bool]]:
    """lorabound modules from source text: runtime__files="..." is lorabound.runtime.files; a name ending in
    __init__ is a package."""
    out = {"lorabound": ("", True)}
    for key, source in modules.items():
        name = "lorabound." + key.replace("__", ".")
        if name.endswith(".init"):
            out[name[: -len(".init")]] = (source, True)
        else:
            out[name] = (source, False)
    return out


@pytest.mark.parametrize("modules, expected", [
    (dict(runtime__init="", runtime__files="from ..cli import main\n", cli="from .runtime.files import x\n"),
     "lorabound.runtime.files:1 imports lorabound.cli, a higher layer"),
    (dict(runtime__init="", runtime__files="def f():\n    from ..report import document\n",
          report__init="", report__document=""),
     "lorabound.runtime.files:2 imports lorabound.report.document, a higher layer"),
    (dict(data="from .model import load_model\n", model__init=""),
     "lorabound.data:1 imports lorabound.model, a sibling in its layer"),
    (dict(timing="from .generation.decode import _encode_batch\n", generation__init="", generation__decode=""),
     "lorabound.timing:1 imports the private name _encode_batch from lorabound.generation.decode"),
    (dict(timing="from .generation import decode\ndecode._cache_of(1)\n", generation__init="", generation__decode=""),
     "lorabound.timing:2 uses the private lorabound.generation.decode._cache_of"),
    (dict(lora__init="", lora__surgery="from .selection import x\n", lora__selection="from . import surgery\n"),
     "import circle: lorabound.lora.selection -> lorabound.lora.surgery -> lorabound.lora.selection"),
    (dict(plugins="import os\n"), "lorabound.plugins: its unit 'plugins' is in no layer of LAYERS"),
])
def test_the_contract_catches_a_violation(modules, expected):
    assert expected in violations(synthetic(**modules))


def test_the_contract_passes_allowed_imports():
    assert violations(synthetic(cli="from . import __version__\nfrom .runtime.files import x\n", runtime__init="",
                                runtime__files="from ..errors import LoraboundError\nfrom .threads import y\n",
                                runtime__threads="def f():\n    from ..rules import check\n", errors="",
                                rules="")) == []
