"""Every public function documents its arguments and its result; every public class too.

Public means named in a module's ``__all__``, or, for the packages that re-export with
``from ._x import f as f`` and have no ``__all__``, every name not starting with ``_``.
A function needs a Google-style ``Args:`` section when it takes parameters (other than
``self``/``cls``) and a ``Returns:`` (or ``Yields:``) section unless its return annotation
is ``None``. Objects re-exported by several modules are checked once.
"""

from __future__ import annotations

import importlib
import inspect
import re

MODULES = (
    "jaxsens",
    "jaxsens.estimators",
    "jaxsens.noise",
    "jaxsens.sites",
    "jaxsens.models",
    "jaxsens.moments",
    "jaxsens.graph",
    "jaxsens.bounds",
    "jaxsens.nin",
    "jaxsens.devices",
    "jaxsens.losses",
    "jaxsens.train",
    "jaxsens.data",
    "jaxsens.linalg",
    "jaxsens.quadrature",
    "jaxsens.montecarlo",
    "jaxsens.paths",
    "jaxsens.checks",
    "jaxsens.precision",
    "jaxsens.plotting",
    "jaxsens.config",
    "jaxsens.runner",
    "jaxsens.report",
    "jaxsens.analyses",
    "jaxsens.schema",
    "jaxsens.io",
    "jaxsens.cli",
)


def _section(doc: str, *names: str) -> bool:
    return any(re.search(rf"^\s*{name}:\s*$", doc, re.MULTILINE) for name in names)


def _function(obj: object):
    """The plain Python function behind ``obj`` (jit, custom_jvp, lru_cache...), or None."""
    if inspect.isclass(obj) or not callable(obj):
        return None
    try:
        fn = inspect.unwrap(obj)
    except (ValueError, AttributeError):
        return None
    return fn if inspect.isfunction(fn) else None


def _class_problem(cls: type) -> str | None:
    doc = cls.__dict__.get("__doc__")
    # NamedTuple and dataclass generate ``Name(field, ...)`` when the class has none.
    if not doc or not doc.strip() or doc.startswith(f"{cls.__name__}("):
        return "missing [docstring]"
    return None


def _function_problem(obj: object, fn) -> str | None:
    doc = inspect.getdoc(obj) or inspect.getdoc(fn) or ""
    if not doc.strip():
        return "missing [docstring]"
    sig = inspect.signature(fn)
    missing = []
    if any(name not in ("self", "cls") for name in sig.parameters) and not _section(doc, "Args"):
        missing.append("Args")
    # Annotations may be strings (``from __future__ import annotations``).
    if sig.return_annotation not in (None, "None") and not _section(doc, "Returns", "Yields"):
        missing.append("Returns")
    return f"missing [{', '.join(missing)}]" if missing else None


def _public_objects():
    seen: set[int] = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n in vars(module) if not n.startswith("_")
                     and not inspect.ismodule(getattr(module, n))]
        for name in names:
            obj = getattr(module, name)
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{module_name}.{name}", obj


def test_public_api_is_documented():
    offenders = []
    for qualname, obj in _public_objects():
        if inspect.isclass(obj):
            problem = _class_problem(obj)
        elif (fn := _function(obj)) is not None:
            problem = _function_problem(obj, fn)
        else:  # constants and type aliases
            continue
        if problem:
            offenders.append(f"{qualname}: {problem}")
    assert not offenders, "undocumented public API:\n" + "\n".join(offenders)
