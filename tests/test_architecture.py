"""Imports point one way, no private names cross packages, no hidden deferred imports.

The package is layered (DESIGN §2): cli → runner → config, report → analyses → train →
losses → estimators → moments, schema → sites, noise, models, data → numerics (linalg,
quadrature, montecarlo) → foundations (precision, chain, plotting, io) → JAX. A module may
import its own package and anything in a lower layer, never a higher one (a back-edge)
nor a sibling of its own layer. This test parses every module (function bodies included)
and fails on a violation.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jaxsens"

LAYERS = {
    "precision": 0, "flatten": 0, "io": 0, "paths": 0, "plotting": 0, "checks": 0, "devices": 0,
    "linalg": 1, "quadrature": 1, "montecarlo": 1,
    "noise": 2, "models": 2, "sites": 2, "data": 2,
    "graph": 2.5,
    "bounds": 3,
    "moments": 3, "schema": 3,
    "estimators": 4,
    "losses": 5,
    "nin": 5.5,
    "train": 6,
    "analyses": 7,
    "config": 8, "report": 8,
    "runner": 9,
    "cli": 10,
    "__main__": 11,
}

# Imports deliberately made inside functions, each for a documented reason: heavy required
# dependencies that one path needs, kept out of `import jaxsens` (0.9 s today; orbax alone
# costs 0.7 s, matplotlib 0.4 s).
DEFERRED_OK = {
    ("plotting.py", "matplotlib.figure"),
    ("train/_checkpoints.py", "orbax.checkpoint"),
}


def _modules(root: pathlib.Path):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        yield rel, ast.parse(path.read_text(), str(path))


def _component(rel: pathlib.PurePath) -> str:
    return rel.parts[0].removesuffix(".py")


def _in_functions(tree: ast.Module) -> set[int]:
    """ids of the import statements inside function bodies."""
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            inside |= {id(n) for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)}
    return inside


def _targets(rel: pathlib.PurePath, node: ast.Import | ast.ImportFrom) -> list[list[str]]:
    """Each imported thing inside jaxsens as a path of names (component first)."""
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1:] for a in node.names if a.name.startswith("jaxsens.")]
    if node.level == 0:
        if not (node.module or "").startswith("jaxsens"):
            return []
        base = node.module.split(".")[1:]
    else:
        here = list(rel.parts[:-1])
        base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
        base = base + (node.module.split(".") if node.module else [])
    return [base + [a.name] for a in node.names]


def _violations(root: pathlib.Path = ROOT) -> list[str]:
    out = []
    for rel, tree in _modules(root):
        if rel == pathlib.PurePath("__init__.py"):
            continue  # the package root re-exports the public surface
        me = _component(rel)
        deferred = _in_functions(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _targets(rel, node):
                other = target[0]
                if other == me or other not in LAYERS:
                    continue
                if LAYERS[other] >= LAYERS[me]:
                    out.append(f"{rel}: imports {'.'.join(target)} ({other}, layer "
                               f"{LAYERS[other]}) from layer {LAYERS[me]}")
                if any(part.startswith("_") and part != "__init__" for part in target[1:]):
                    out.append(f"{rel}: imports the private {'.'.join(target)} of package "
                               f"{other}")
            if id(node) in deferred:
                if isinstance(node, ast.Import):
                    name = node.names[0].name
                else:
                    name = node.module if node.level == 0 else ast.unparse(node)
                if (rel.as_posix(), name) not in DEFERRED_OK:
                    out.append(f"{rel}:{node.lineno}: deferred import ({ast.unparse(node)})")
    return out


def test_layers_are_declared_for_every_component():
    components = {_component(rel) for rel, _ in _modules(ROOT)} - {"__init__"}
    assert components <= set(LAYERS), sorted(components - set(LAYERS))


def test_imports_point_one_way_and_no_private_names_cross_packages():
    assert _violations() == []


@pytest.mark.parametrize("bad,expect", [
    ("from ..runner import run_experiment\n", "imports runner"),
    ("from ..estimators._sampled import sampled\n", "private"),
    ("def f():\n    from ..noise import Absolute\n", "deferred import"),
])
def test_the_checker_catches_violations(tmp_path, bad, expect):
    """The check can fail: a back-edge, a private import, a deferred import."""
    pkg = tmp_path / "jaxsens"
    (pkg / "moments").mkdir(parents=True)
    (pkg / "moments" / "bad.py").write_text(bad)
    found = _violations(pkg)
    assert any(expect in v for v in found), found
