"""Generate the documentation pages that must not drift from the code.

* the experiment config reference, read from the pydantic schema
  (:class:`jaxsens.config.ExperimentConfig` and every analysis kind's config class in
  :data:`jaxsens.analyses.KINDS`): field names, types, defaults, constraints, valid choices
  (read from the registries' validators) and the descriptions of the classes' Google-style
  ``Attributes:`` sections;
* one API page per public module of ``jaxsens``, listing exactly the names the module
  exports (its ``__all__``, or its public names), each object rendered once, on the page
  of the module that defines it;
* the notebook list (``notebooks/*.ipynb``) with each notebook's title.

``docs/hooks.py`` calls these functions during ``mkdocs build``, so the pages are built
from the code every time; ``python docs/gen_pages.py OUT_DIR`` writes them to a folder for
inspection. Nothing here imports MkDocs.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# The notebooks in reading order; any other notebook follows, by file name.
NOTEBOOK_ORDER = (
    "hidden_layer_noise",
    "weight_noise",
    "gaussian_moments",
    "training_for_robustness",
    "bring_your_own_model",
    "weight_margin",
    "nin_phases",
)

# API pages in reading order (the library, then the runner); other public modules follow.
MODULE_ORDER = (
    "jaxsens",
    "jaxsens.estimators",
    "jaxsens.noise",
    "jaxsens.sites",
    "jaxsens.models",
    "jaxsens.graph",
    "jaxsens.moments",
    "jaxsens.bounds",
    "jaxsens.losses",
    "jaxsens.train",
    "jaxsens.data",
    "jaxsens.nin",
    "jaxsens.linalg",
    "jaxsens.quadrature",
    "jaxsens.montecarlo",
    "jaxsens.precision",
    "jaxsens.checks",
    "jaxsens.paths",
    "jaxsens.plotting",
    "jaxsens.io",
    "jaxsens.devices",
    "jaxsens.config",
    "jaxsens.schema",
    "jaxsens.analyses",
    "jaxsens.runner",
    "jaxsens.report",
    "jaxsens.cli",
)


# --------------------------------------------------------------------------- modules
def public_modules() -> list[str]:
    """Every public module of ``jaxsens``: the package and its top-level modules.

    Returns:
      Dotted names, in :data:`MODULE_ORDER` first, then any other public module by name
      (a module added later gets a page without an edit here).
    """
    import jaxsens

    found = ["jaxsens"] + [
        f"jaxsens.{m.name}" for m in pkgutil.iter_modules(jaxsens.__path__)
        if not m.name.startswith("_")
    ]
    ordered = [m for m in MODULE_ORDER if m in found]
    return ordered + sorted(set(found) - set(ordered))


def public_names(module: types.ModuleType) -> list[str]:
    """The names a module exports: ``__all__``, else every public non-module name.

    Args:
      module: an imported module.

    Returns:
      The names, in the module's order.
    """
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items()
                 if not n.startswith("_") and not inspect.ismodule(v)
                 and not isinstance(v, type(typing.Any)) and n != "annotations"]
    return list(names)


def _home(obj: Any) -> str | None:
    """The public module whose page documents ``obj`` (functions and classes only)."""
    if not (inspect.isclass(obj) or callable(obj)):
        return None
    try:
        target = inspect.unwrap(obj)
    except (ValueError, AttributeError):
        target = obj
    module = getattr(target, "__module__", None) or getattr(obj, "__module__", None)
    if not isinstance(module, str) or not module.startswith("jaxsens"):
        return None
    parts = module.split(".")
    public = []
    for part in parts:
        if part.startswith("_"):
            break
        public.append(part)
    return ".".join(public[:2]) if len(public) > 1 else "jaxsens"


def api_page(module_name: str) -> str:
    """The Markdown of one module's API page (mkdocstrings ``:::`` directives).

    Objects that another public module defines are linked there, not rendered twice.

    Args:
      module_name: a dotted module name from :func:`public_modules`.

    Returns:
      The page's Markdown.
    """
    module = importlib.import_module(module_name)
    lines = [f"# `{module_name}`", "", f"::: {module_name}", "    options:",
             "      members: false", "      show_root_heading: false", ""]
    here, elsewhere = [], []
    for name in public_names(module):
        obj = getattr(module, name)
        home = _home(obj)
        if module_name == "jaxsens" or (home is not None and home != module_name):
            elsewhere.append((name, obj, home))
        else:
            here.append(name)
    for name in here:
        lines += [f"::: {module_name}.{name}", ""]
    if elsewhere:
        lines += ["## Re-exported names" if module_name != "jaxsens" else "## Public names",
                  "", "| name | documented at |", "|---|---|"]
        for name, obj, home in elsewhere:
            if home is None or home == "jaxsens":
                target = _find_home_by_identity(obj, module_name)
            else:
                target = f"{home}.{name}" if hasattr(importlib.import_module(home), name) \
                    else _find_home_by_identity(obj, module_name)
            link = f"[`{target}`][{target}]" if target else "—"
            lines.append(f"| `{module_name}.{name}` | {link} |")
        lines.append("")
    return "\n".join(lines)


def _find_home_by_identity(obj: Any, exclude: str) -> str | None:
    """``module.name`` of the public module page that renders ``obj``, if any."""
    for module_name in public_modules():
        if module_name in ("jaxsens", exclude):
            continue
        module = importlib.import_module(module_name)
        for name in public_names(module):
            if getattr(module, name, None) is obj:
                home = _home(obj)
                if home is None or home == module_name:
                    return f"{module_name}.{name}"
    return None


_MODULES: dict[str, types.ModuleType | None] = {}


def _import(name: str) -> types.ModuleType | None:
    if not name:
        return None
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(name)
        except (ImportError, ValueError, TypeError):
            _MODULES[name] = None
    return _MODULES[name]


def _lookup(dotted: str) -> tuple[bool, Any]:
    """``(found, object)`` for a dotted path: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = _import(".".join(parts[:i]))
        if module is None:
            continue
        obj: Any = module
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False, None
            obj = getattr(obj, attr)
        return True, obj
    return False, None


def _documented_as(obj: Any, last: str) -> str | None:
    """The identifier under which the API pages render ``obj`` (``None``: not rendered)."""
    if inspect.ismodule(obj):
        return obj.__name__ if obj.__name__ in public_modules() else None
    home = _home(obj)
    modules = [home] if home not in (None, "jaxsens") else \
        [m for m in public_modules() if m != "jaxsens"]
    for module_name in modules:
        module = _import(module_name) if module_name else None
        if module is None:
            continue
        for name in public_names(module):
            if getattr(module, name, None) is obj and (name == last or home is not None):
                return f"{module_name}.{name}"
    return None


def identifier(target: str, context: str) -> str | None:
    """The API-page identifier of a name written in a docstring, or ``None``.

    Args:
      target: the name as written (``"split"``, ``"Deviation.has"``,
        ``"jaxsens.linearized"``, ``"~jaxsens.moments.output_moments"`` without ``~``).
      context: the dotted path of the object whose docstring it is; relative names are
        looked up in it and in its parents, as Python's scoping would.

    Returns:
      ``"module.name"`` (or ``"module.Class.member"``) as rendered by :func:`api_page`, or
      ``None`` when the object is not on any page (private helpers, other libraries).
    """
    target = target.strip().rstrip("()")
    parts = context.split(".")
    candidates = [target] if target.startswith("jaxsens") else [
        ".".join(parts[:i] + [target]) for i in range(len(parts), 0, -1)]
    for candidate in candidates:
        found, obj = _lookup(candidate)
        if not found:
            continue
        head, _, last = candidate.rpartition(".")
        found_owner, owner = _lookup(head)
        if found_owner and inspect.isclass(owner):
            owner_id = _documented_as(owner, head.rpartition(".")[2])
            return f"{owner_id}.{last}" if owner_id else None
        return _documented_as(obj, last)
    return None


# --------------------------------------------------------------------------- config
# Descriptions of the runner's own sections, used only where the class's docstring has no
# ``Attributes:`` entry for the field (the schema classes of ``jaxsens/config.py`` do not
# document their fields yet); a docstring entry always wins.
FALLBACK_DOCS: dict[str, dict[str, str]] = {
    "ExperimentConfig": {
        "name": "The experiment's name (the default run directory is `runs/<name>`).",
        "description": "Free text, shown in the report.",
        "seed": "The root seed: every key of the run (initialization, data order, noise "
                "draws) derives from it.",
        "precision": "Floating-point precision of the model and data.",
        "data": "The data set.", "model": "The network.", "train": "Training.",
        "analyses": "The analyses run on the trained model, in order.",
        "output": "What the run directory receives.",
        "devices": "The device mesh.",
    },
    "DataConfig": {
        "name": "A data set of `jaxsens.data.available()`.",
        "options": "Keyword arguments of the data set's loader.",
        "n_train": "Subsample the training set to this many examples (stratified).",
        "n_test": "Subsample the test set to this many examples (stratified).",
        "normalize": "Normalization, with statistics of the training set only.",
        "path": "Folder of the data files, for the loaders that read them.",
    },
    "ModelConfig": {
        "kind": "`mlp` (`jaxsens.models.MLP`) or `lenet` (`jaxsens.models.LeNet`).",
        "widths": "Hidden widths (MLP) or dense hidden widths (LeNet).",
        "activation": "The hidden activation.",
        "use_bias": "Whether the MLP's linear layers have biases.",
        "channels": "The LeNet's convolution channels.",
        "kernel_size": "The LeNet's convolution kernel size.",
    },
    "TrainConfig": {
        "epochs": "Training epochs (0: no training).",
        "batch_size": "Examples per step.",
        "optimizer": "The Optax optimizer.",
        "schedule": "The learning-rate schedule.",
        "loss": "Weighted loss terms, summed.",
        "checkpoint_every": "Save a checkpoint every this many epochs (and after the last).",
    },
    "OptimizerConfig": {
        "name": "An optimizer of `jaxsens.train.OPTIMIZERS`.",
        "learning_rate": "The peak learning rate.",
        "options": "Keyword arguments of the Optax optimizer.",
        "clip_norm": "Clip gradients to this global norm.",
    },
    "ScheduleConfig": {
        "name": "A schedule of `jaxsens.train.SCHEDULES`.",
        "options": "Keyword arguments of the schedule.",
    },
    "LossTermConfig": {
        "kind": "A loss term of `jaxsens.losses.LOSSES`.",
        "weight": "Its weight in the sum.",
        "site": "The site it perturbs (`noise` and `linearized` terms).",
        "noise": "Its noise law (`noise` and `linearized` terms).",
        "options": "The term's other fields (`jaxsens.losses.make_loss`).",
    },
    "OutputConfig": {
        "dir": "The run directory (default `runs/<name>`).",
        "figures": "Write `figures/*.png`.",
        "report": "Write `report.md`.",
    },
    "DevicesConfig": {
        "mesh": "Devices along each axis, or `auto`.",
        "axes": "Names of the mesh axes.",
    },
    "NoiseConfig": {
        "law": "A law of `jaxsens.noise.LAWS` (`full_covariance` needs a matrix, which "
               "YAML does not carry).",
        "level": "ε, or σ for absolute noise (analyses replace it by each of their levels).",
        "reading": "`relative_norm`: uniform on the sphere of radius ε‖v‖, or Gaussian "
                   "with that root mean square.",
        "norm": "`weight_relative`: the norm in which ‖Δ‖ = ε‖W‖.",
    },
}


def _validator_choices() -> dict[tuple[str, str], tuple[str, ...]]:
    """Choices that ``field_validator``s check against a registry (not in the metadata)."""
    from jaxsens.losses import LOSSES
    from jaxsens.train import OPTIMIZERS, SCHEDULES

    return {("OptimizerConfig", "name"): tuple(sorted(OPTIMIZERS)),
            ("ScheduleConfig", "name"): tuple(sorted(SCHEDULES)),
            ("LossTermConfig", "kind"): tuple(sorted(LOSSES))}


_SECTION = re.compile(r"^(\s*)(Attributes|Args):\s*$")


def attribute_docs(cls: type) -> dict[str, str]:
    """Descriptions of a class's fields from the ``Attributes:`` (or ``Args:``) sections
    of its docstring and its bases' (the subclass's description wins).

    Args:
      cls: a class with Google-style docstrings.

    Returns:
      ``{field: description}``, descriptions joined into one line.
    """
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        lines = doc.splitlines()
        i = 0
        while i < len(lines):
            m = _SECTION.match(lines[i])
            if not m:
                i += 1
                continue
            i += 1
            current = None
            indent = None
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                line = lines[i]
                if line.strip():
                    lead = len(line) - len(line.lstrip())
                    entry = re.match(r"^\s*(\*{0,2}\w+)(?:\s*\(.*?\))?:\s*(.*)$", line)
                    if entry and (indent is None or lead == indent):
                        indent = lead
                        current = entry.group(1).lstrip("*")
                        out[current] = entry.group(2).strip()
                    elif current is not None:
                        out[current] = f"{out[current]} {line.strip()}".strip()
                i += 1
    return out


def _choices(meta: Any) -> tuple[str, ...] | None:
    """The valid choices of a ``jaxsens.schema.one_of`` validator."""
    func = getattr(meta, "func", None)
    if func is None:
        return None
    closure = inspect.getclosurevars(func).nonlocals
    allowed = closure.get("allowed")
    return tuple(allowed) if isinstance(allowed, tuple) else None


def _constraints(metadata: list[Any]) -> list[str]:
    out = []
    symbols = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥",
               "max_length": "length ≤"}
    for meta in metadata:
        for attr, symbol in symbols.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{symbol} {value}")
        if getattr(meta, "allow_inf_nan", None) is False:
            out.append("finite")
        choices = _choices(meta)
        if choices is not None:
            out.append("one of " + ", ".join(f"`{c}`" for c in choices))
    return out


def _type_name(tp: Any) -> tuple[str, list[str]]:
    """A readable type and the constraints nested in it (``list[Annotated[int, gt 0]]``)."""
    from pydantic import BaseModel
    from pydantic.fields import FieldInfo

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        inner, extra = _type_name(args[0])
        cons = []
        for meta in args[1:]:
            if isinstance(meta, FieldInfo):
                cons += _constraints(meta.metadata)
                if meta.discriminator:
                    cons.append(f"chosen by `{meta.discriminator}`")
            else:
                cons += _constraints([meta])
        return inner, extra + cons
    if origin is typing.Literal:
        return " | ".join(f"`{a!r}`".replace("'", '"') for a in args), []
    if origin in (typing.Union, types.UnionType):
        parts, cons = [], []
        for a in args:
            name, c = _type_name(a)
            parts.append(name)
            cons += c
        if len(parts) > 3 and all(inspect.isclass(a) and issubclass(a, BaseModel)
                                  for a in args):
            return "an analysis (see below)", cons
        return " | ".join(parts), cons
    if origin in (list, tuple, dict):
        inner = [_type_name(a) for a in args]
        names = ", ".join(n for n, _ in inner)
        cons = [c for _, cs in inner for c in cs]
        return f"{origin.__name__}[{names}]", [f"items: {c}" for c in cons]
    if tp is type(None):
        return "null", []
    if inspect.isclass(tp):
        from pydantic import BaseModel as _BM

        if issubclass(tp, _BM):
            return f"[{tp.__name__}](#{_anchor(tp)})", []
        return tp.__name__, []
    return str(tp).replace("typing.", ""), []


def _anchor(cls: type) -> str:
    return cls.__name__.lower()


def _default(field: Any) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "—"
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "defaults"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return "[" + ", ".join(json.dumps(v.model_dump(exclude_defaults=True)) for v in value) \
            + "]"
    return f"`{json.dumps(value)}`"


def _nested_models(tp: Any) -> Iterator[type]:
    from pydantic import BaseModel

    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        yield tp
        return
    for a in typing.get_args(tp):
        yield from _nested_models(a)


def _model_table(cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    docs = {**FALLBACK_DOCS.get(cls.__name__, {}), **attribute_docs(cls)}
    validated = _validator_choices()
    rows = ["| field | type | default | constraints | description |",
            "|---|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        tname, cons = _type_name(field.annotation)
        cons = cons + _constraints(field.metadata)
        if (cls.__name__, name) in validated:
            cons.append("one of " + ", ".join(f"`{c}`" for c in validated[cls.__name__, name]))
        desc = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", docs.get(name, "")).replace("|", "\\|")
        rows.append(f"| `{name}` | {tname.replace('|', '&#124;')} | {_default(field)} | "
                    f"{'; '.join(cons).replace('|', '&#124;')} | {desc} |")
    return rows


def _summary(cls: type) -> str:
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    first = doc.split("\n\n")[0].replace("\n", " ") if doc else ""
    return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", first)


def config_reference() -> str:
    """The experiment config reference, generated from the schema.

    Returns:
      The page's Markdown: every section of :class:`jaxsens.config.ExperimentConfig`, its
      nested sections, and one section per experiment kind of
      :data:`jaxsens.analyses.KINDS`.
    """
    from jaxsens.analyses import KINDS
    from jaxsens.config import ExperimentConfig, builtin_experiments

    out = [
        "# Experiment config reference",
        "",
        "<!-- Generated by docs/gen_pages.py from the pydantic schema; do not edit. -->",
        "",
        "An experiment is one YAML file, safe-loaded and validated into frozen objects",
        "before any work starts (`jaxsens config NAME` prints the resolved config). Unknown",
        "fields are errors that name the field's path, the bad value and the valid choices.",
        "Every section and field below is read from the schema in `jaxsens/config.py`,",
        "`jaxsens/schema.py` and each experiment kind's config class in `jaxsens/analyses/`,",
        "so this page is rebuilt with the code and cannot drift from it.",
        "",
        "```yaml",
        "name: quick",
        "data: {name: digits, n_train: 1000, n_test: 200}",
        "model: {kind: mlp, widths: [128, 128]}",
        "train: {epochs: 2, batch_size: 64}",
        "analyses:",
        "  - kind: activation_noise",
        "    noise: {law: relative_norm, level: 0.05}",
        "    levels: [0.01, 0.05, 0.1]",
        "```",
        "",
        "## Built-in experiments",
        "",
        "`jaxsens run NAME` runs one of these (`jaxsens list` lists them):",
        "",
        "| name | description |",
        "|---|---|",
    ]
    import yaml

    for name, path in builtin_experiments().items():
        raw = yaml.safe_load(path.read_text()) or {}
        desc = " ".join(str(raw.get("description", "")).split()).replace("|", "\\|")
        out.append(f"| `{name}` | {desc} |")
    out.append("")

    seen: set[type] = set()
    queue: list[tuple[type, str]] = [(ExperimentConfig, "the top level")]
    while queue:
        cls, where = queue.pop(0)
        if cls in seen:
            continue
        seen.add(cls)
        out += [f"## {cls.__name__} {{#{_anchor(cls)}}}", ""]
        summary = _summary(cls)
        out += [f"{summary} Used at {where}." if summary else f"Used at {where}.", ""]
        out += _model_table(cls)
        out.append("")
        for name, field in cls.model_fields.items():
            if name == "analyses" and cls is ExperimentConfig:
                continue
            for nested in _nested_models(field.annotation):
                if nested not in seen:
                    queue.append((nested, f"`{name}`"))

    out += [
        "## Analyses {#analyses}",
        "",
        "`analyses:` is a list; each entry's `kind` chooses its experiment kind, one of "
        + ", ".join(f"[`{k}`](#kind-{k.replace('_', '-')})" for k in KINDS) + ".",
        "Every kind shares `kind`, `name` (a label for files and the report) and `examples`",
        "(how many test examples it uses).",
        "",
    ]
    for kind_name, kind in KINDS.items():
        cls = kind.config
        out += [f"### `{kind_name}` {{#kind-{kind_name.replace('_', '-')}}}", ""]
        summary = _summary(cls)
        if summary:
            out += [summary, ""]
        out += [f"Config class: `{cls.__module__}.{cls.__name__}`.", ""]
        out += _model_table(cls, skip=("kind",))
        out.append("")
        for field in cls.model_fields.values():
            for nested in _nested_models(field.annotation):
                if nested not in seen:
                    seen.add(nested)
                    out += [f"#### {nested.__name__} {{#{_anchor(nested)}}}", "",
                            _summary(nested), ""]
                    out += _model_table(nested)
                    out.append("")
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- notebooks
def notebook_title(path: Path) -> str:
    """The first Markdown heading of a notebook (its file name if it has none).

    Args:
      path: an ``.ipynb`` file.

    Returns:
      The title, without the leading ``#``.
    """
    nb = json.loads(path.read_text())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", [])).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return path.stem.replace("_", " ")


def notebooks(folder: Path = NOTEBOOKS) -> list[Path]:
    """The notebooks in reading order (:data:`NOTEBOOK_ORDER`, then by name).

    Args:
      folder: where the notebooks are.

    Returns:
      Their paths.
    """
    found = {p.stem: p for p in folder.glob("*.ipynb")}
    order = [n for n in NOTEBOOK_ORDER if n in found]
    return [found[n] for n in order + sorted(set(found) - set(order))]


def main(argv: list[str]) -> int:
    """Write the generated pages under ``argv[0]`` (for inspection)."""
    if len(argv) != 1:
        print("usage: python docs/gen_pages.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    (out / "reference").mkdir(parents=True, exist_ok=True)
    (out / "reference" / "config.md").write_text(config_reference())
    (out / "api").mkdir(parents=True, exist_ok=True)
    for name in public_modules():
        (out / "api" / f"{name}.md").write_text(api_page(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
