"""The dependency rules of the layout (README "Layout"): each package imports only the layers below it.

Read from the source with ``ast`` (imports inside functions count too), so a
rule broken anywhere, even on a rarely taken path, fails here.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

#: package (as installed) -> (what it may import from this project, may it import torch)
RULES: dict[str, tuple[frozenset[str], bool]] = {
    "fsmoe_compiler.names": (frozenset(), False),
    "fsmoe_compiler.config": (frozenset({"fsmoe_compiler.names"}), False),
    "fsmoe_compiler.gc_pause": (frozenset(), False),
    "fsmoe_compiler.ecosystem": (frozenset(), False),
    "fsmoe_compiler.examples": (frozenset({"fsmoe_compiler.moe", "fsmoe_compiler.examples"}), True),
    "fsmoe_compiler.ops": (frozenset({"fsmoe_compiler.names"}), True),
    "fsmoe_compiler.inductor_codegen": (frozenset({"fsmoe_compiler.ops", "fsmoe_compiler.passes"}), True),
    "fsmoe_compiler.scheduler": (frozenset({"fsmoe_compiler.names", "fsmoe_compiler.scheduler"}), False),
    "fsmoe_compiler.reporting": (frozenset({"fsmoe_compiler.names", "fsmoe_compiler.reporting",
                                            "fsmoe_compiler.scheduler"}), False),
    "fsmoe_compiler.runtime": (frozenset({"fsmoe_compiler.names", "fsmoe_compiler.ops", "fsmoe_compiler.runtime"}),
                               True),
    "fsmoe_compiler.passes": (frozenset({"fsmoe_compiler.names", "fsmoe_compiler.ops", "fsmoe_compiler.config",
                                         "fsmoe_compiler.scheduler", "fsmoe_compiler.passes"}), True),
    "fsmoe_compiler.profiler": (frozenset({"fsmoe_compiler.names", "fsmoe_compiler.ops", "fsmoe_compiler.scheduler",
                                           "fsmoe_compiler.runtime", "fsmoe_compiler.profiler"}), True),
    "fsmoe_compiler.sim": (frozenset({"fsmoe_compiler.names", "fsmoe_compiler.scheduler", "fsmoe_compiler.sim"}),
                           False),
    "fsmoe_compiler.moe": (frozenset({"fsmoe_compiler.names", "fsmoe_compiler.ops", "fsmoe_compiler.runtime",
                                      "fsmoe_compiler.moe"}), True),
}
#: Command-line front ends may import everything (lazily), so they are not held to their package's rule.
FRONT_ENDS = frozenset({"fsmoe_compiler.sim.cli"})


def _source_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None, package
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin)


def _modules(package: str) -> list[tuple[str, Path]]:
    where = _source_dir(package)
    if where.is_file():
        return [(package, where)]
    return [(f"{package}.{p.stem}" if p.stem != "__init__" else package, p) for p in sorted(where.rglob("*.py"))]


def _imports(module: str, path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = module.rsplit(".", node.level if not path.name == "__init__.py" else node.level - 1)[0]
                out.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                out.add(node.module)
    return out


def _owner(name: str) -> str | None:
    """The rule that governs module ``name`` (the longest matching package), or None outside the project."""
    best = None
    for package in RULES:
        if name == package or name.startswith(package + "."):
            best = package if best is None or len(package) > len(best) else best
    return best


@pytest.mark.parametrize("package", sorted(RULES))
def test_each_package_imports_only_what_its_layer_may(package):
    allowed, torch_ok = RULES[package]
    broken = []
    for module, path in _modules(package):
        if module in FRONT_ENDS:
            continue
        for name in _imports(module, path):
            if name.split(".")[0] == "torch" and not torch_ok:
                broken.append(f"{module} imports {name}")
            if name.startswith("fsmoe_compiler") and name != "fsmoe_compiler":
                target = _owner(name) or ".".join(name.split(".")[:2])
                if target not in allowed and target != package:
                    broken.append(f"{module} imports {name}")
    assert not broken, "\n".join(broken)
