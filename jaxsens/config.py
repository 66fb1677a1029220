"""Experiment configs: YAML, safely loaded and validated into typed, frozen objects.

A bad config fails before any work starts with one line naming the field's path, the
bad value and the valid choices (:class:`ConfigError`).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from . import data as data_lib
from .analyses import KINDS, AnalysisUnion
from .losses import LOSSES
from .models import ACTIVATIONS
from .schema import ConfigError, Frozen, NoiseConfig, one_of
from .train import OPTIMIZERS, SCHEDULES

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "load_config",
    "parse_config",
    "apply_overrides",
    "builtin_experiments",
    "builtin_path",
    "to_dict",
]

EXPERIMENTS_DIR = Path(__file__).parent / "experiments"
class DataConfig(Frozen):
    name: Annotated[str, one_of(data_lib.available(), "dataset")] = "digits"
    options: dict[str, Any] = Field(default_factory=dict)
    n_train: int | None = Field(None, gt=0)
    n_test: int | None = Field(None, gt=0)
    normalize: Literal["standardize", "minmax", "none"] = "minmax"
    path: str | None = None


class ModelConfig(Frozen):
    kind: Literal["mlp", "lenet"] = "mlp"
    widths: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [256, 256, 256])
    activation: Annotated[str, one_of(ACTIVATIONS, "activation")] = "relu"
    use_bias: bool = True
    channels: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [6, 16])
    kernel_size: int = Field(5, gt=0)


class OptimizerConfig(Frozen):
    name: str = "adam"
    learning_rate: float = Field(1e-3, gt=0, allow_inf_nan=False)
    options: dict[str, Any] = Field(default_factory=dict)
    clip_norm: float | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {v!r}; choose one of {sorted(OPTIMIZERS)}")
        return v


class ScheduleConfig(Frozen):
    name: str = "constant"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in SCHEDULES:
            raise ValueError(f"unknown schedule {v!r}; choose one of {sorted(SCHEDULES)}")
        return v


class LossTermConfig(Frozen):
    """One weighted loss term: ``kind`` from :data:`jaxsens.losses.LOSSES`.

    ``warmup_steps`` > 0 ramps the weight linearly from 0 to ``weight`` over the first
    that many optimizer steps of the training (:class:`jaxsens.losses.Warmup`).
    """

    kind: str
    weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    warmup_steps: int = Field(0, ge=0)
    site: str | None = None
    noise: NoiseConfig | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in LOSSES:
            raise ValueError(f"unknown loss kind {v!r}; choose one of {sorted(LOSSES)}")
        return v


class TrainConfig(Frozen):
    epochs: int = Field(5, ge=0)
    batch_size: int = Field(128, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loss: list[LossTermConfig] = Field(
        default_factory=lambda: [LossTermConfig(kind="cross_entropy")]
    )
    checkpoint_every: int = Field(1, gt=0)


class DevicesConfig(Frozen):
    """Where a run computes: a mesh over the devices JAX sees.

    ``mesh`` is the number of devices along each of the named ``axes``, or ``auto``:
    every device (every process's, in a multi-process run) on the first axis. Training
    splits each batch over the whole mesh (the parameters replicated); with
    ``split_examples`` the analyses split their examples over it when their number
    divides evenly (in a one-process run), else they run on one device. ``auto`` splits
    them on accelerators only: CPU devices forced with
    ``--xla_force_host_platform_device_count`` share the same cores, so splitting gains
    nothing there, and analyses that loop over single examples would spread each one's
    program over every device, whose collectives can stall XLA's CPU runtime. One device
    is the single-device program of old.
    """

    mesh: Literal["auto"] | list[int] = "auto"
    axes: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["data"], min_length=1)
    split_examples: bool | Literal["auto"] = "auto"

    @field_validator("mesh", mode="before")
    @classmethod
    def _shape(cls, v: Any) -> Any:
        if v == "auto":
            return v
        if not isinstance(v, list) or not v or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in v):
            raise ValueError("mesh must be 'auto' or a list of device counts >= 1, one per "
                             "axis (e.g. [4] or [2, 2])")
        return v


class OutputConfig(Frozen):
    dir: str | None = None
    figures: bool = True
    report: bool = True


class ExperimentConfig(Frozen):
    """A whole experiment: seed, precision, data, model, train, analyses, output, devices."""

    name: str = "experiment"
    description: str = ""
    seed: int = 0
    precision: Literal["float32", "float64"] = "float32"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    analyses: list[AnalysisUnion] = Field(default_factory=list)
    output: OutputConfig = Field(default_factory=OutputConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)


# --------------------------------------------------------------------------- loading
def _fmt_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _field_choices(loc: Sequence[Any]) -> list[str]:
    model: Any = ExperimentConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if part in KINDS and model is ExperimentConfig:
            model = KINDS[part].config
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) + (ann,):
            inner = getattr(cand, "__args__", ())
            for c in (cand, *inner):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    model = c
                    break
    return sorted(getattr(model, "model_fields", {}))


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    # Drop pydantic's union-branch tags (e.g. 'literal['all']', 'list[str]').
    loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int")))]
    shown_loc = [p for i, p in enumerate(loc)
                 if not (p in KINDS and i >= 2 and loc[0] == "analyses")]  # union tags
    path = _fmt_loc(shown_loc)
    if e["type"] == "extra_forbidden":
        choices = _field_choices(loc)
        near = difflib.get_close_matches(str(loc[-1]), choices, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"config error at {path}: unknown field{hint}; allowed fields: {choices}"
    msg = e["msg"].removeprefix("Value error, ")
    value = e.get("input")
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    more = f" ({len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    return f"config error at {path}: {msg}; got {shown}{more}"


def parse_config(raw: Mapping[str, Any] | None, source: str = "<config>") -> ExperimentConfig:
    """Validate a mapping into an :class:`ExperimentConfig` (raises :class:`ConfigError`).

    Args:
      raw: the config as plain data (e.g. loaded YAML); ``None`` is the empty config
        (every field at its default).
      source: where ``raw`` came from, named in error messages.

    Returns:
      The validated, frozen :class:`ExperimentConfig`, analyses as their kinds' config
      classes.

    Raises:
      ConfigError: ``raw`` is not a mapping, a field is unknown or has a bad value (one
        line naming the field's path, the value and the valid choices), or the sections
        do not fit together (an analysis's own checks; a ``noise`` or ``linearized`` loss
        term without ``site`` and ``noise``).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config {source} must be a mapping at the top level, got "
                          f"{type(raw).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None
    _cross_checks(cfg)
    return cfg


def _cross_checks(cfg: ExperimentConfig) -> None:
    dc = cfg.devices
    if len(set(dc.axes)) != len(dc.axes):
        raise ConfigError(f"config error at devices.axes: axis names must be distinct; got "
                          f"{dc.axes}")
    if dc.mesh != "auto" and len(dc.mesh) != len(dc.axes):
        raise ConfigError(f"config error at devices.mesh: one size per axis of {dc.axes}; got "
                          f"{dc.mesh} (or use 'auto')")
    for i, a in enumerate(cfg.analyses):
        a.check(f"analyses[{i}]")
    for i, t in enumerate(cfg.train.loss):
        if t.kind in ("noise", "linearized") and (t.site is None or t.noise is None):
            raise ConfigError(f"config error at train.loss[{i}]: a {t.kind!r} term needs "
                              "`site` and `noise`")


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for j, part in enumerate(parts[:-1]):
        key: Any = int(part) if part.isdigit() and isinstance(node, list) else part
        if isinstance(node, list):
            if not isinstance(key, int) or key >= len(node):
                raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:j + 1])} is not a "
                                  f"valid list index (length {len(node)})")
            node = node[key]
            continue
        if key not in node or node[key] is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:j + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {dotted!r}: {last!r} is not a valid list index")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a raw config.

    Args:
      raw: the raw (unvalidated) config; not modified.
      overrides: ``"key.path=value"`` strings applied in order, e.g.
        ``"train.epochs=3"`` or ``"analyses.0.levels=[0.1, 0.2]"``. A digit key indexes
        into a list; missing or null sections on the way are created. A value that is not
        valid YAML is kept as the string.

    Returns:
      A deep copy of ``raw`` with the overrides set (validate it with
      :func:`parse_config`).

    Raises:
      ConfigError: an override without ``=`` or with an empty key, a path through a value
        that is no section, or a list index out of range.
    """
    tree = copy.deepcopy(dict(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value "
                              "(e.g. train.epochs=3)")
        dotted, text = item.split("=", 1)
        if not dotted.strip():
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _set_path(tree, dotted.strip(), value)
    return tree


def read_yaml(path: str | Path) -> dict:
    """Safely load a YAML file into a mapping (ConfigError on any problem)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config {str(path)!r} is a directory; give a YAML file or the name "
                          f"of a built-in experiment ({', '.join(builtin_experiments())})")
    if not p.is_file():
        hint = ""
        if p.stem in builtin_experiments():
            hint = f" (a built-in experiment of that name exists: use `{p.stem}`)"
        raise ConfigError(f"config file {str(path)!r} does not exist{hint}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: "
                          f"{getattr(err, 'problem', err)}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got "
                          f"{type(raw).__name__}")
    return raw or {}


def builtin_experiments() -> dict[str, Path]:
    """Built-in experiment configs shipped with the package: ``{name: path}``.

    Returns:
      ``{file stem: path}`` of every ``*.yaml`` in the package's ``experiments`` folder,
      sorted by file name.
    """
    return {p.stem: p for p in sorted(EXPERIMENTS_DIR.glob("*.yaml"))}


def builtin_path(name: str) -> Path:
    """The config file of a built-in experiment.

    Args:
      name: a key of :func:`builtin_experiments` (e.g. ``"noise_propagation"``).

    Returns:
      The path of the experiment's YAML file inside the package.

    Raises:
      ConfigError: ``name`` is no built-in experiment (the message lists them).
    """
    exps = builtin_experiments()
    if name not in exps:
        raise ConfigError(f"unknown built-in experiment {name!r}; choose one of {sorted(exps)}")
    return exps[name]


def resolve_source(spec: str | None) -> Path:
    """A config path, or the name of a built-in experiment (default: noise_propagation)."""
    if spec is None:
        return builtin_path("noise_propagation")
    p = Path(spec)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return builtin_path(spec)


def load_config(spec: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load, override and validate a config (path or built-in name).

    Args:
      spec: a YAML file (a path ending in ``.yaml`` / ``.yml``, or any existing path) or
        the name of a built-in experiment (:func:`builtin_experiments`); ``None`` is the
        built-in ``noise_propagation``.
      overrides: ``"key.path=value"`` strings applied before validation (see
        :func:`apply_overrides`).

    Returns:
      The validated :class:`ExperimentConfig`.

    Raises:
      ConfigError: unknown built-in name, missing file, invalid YAML or a top level that
        is not a mapping, a bad override, or a config that does not validate (see
        :func:`parse_config`).
    """
    path = resolve_source(None if spec is None else str(spec))
    raw = apply_overrides(read_yaml(path), overrides)
    return parse_config(raw, str(path))


def to_dict(cfg: ExperimentConfig) -> dict:
    """The resolved config as plain data (for config.yaml in a run directory).

    Args:
      cfg: a validated config.

    Returns:
      Every field, defaults included, as JSON-compatible data (dicts, lists, strings,
      numbers, booleans, ``None``); :func:`parse_config` of it gives an equal config.
    """
    return cfg.model_dump(mode="json")
