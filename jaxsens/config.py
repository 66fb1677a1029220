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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import noise as noise_lib
from .losses import LOSSES
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
DATASETS = ("digits", "digits8x8", "mnist", "fashion_mnist", "cifar10", "teacher", "gaussian")


class ConfigError(ValueError):
    """A config problem, reported in one line before any work starts."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoiseConfig(_Frozen):
    """A noise law: ``law`` names a class of :mod:`jaxsens.noise`, the rest its options."""

    law: Literal["relative_norm", "absolute", "weight_relative", "multiplicative"]
    level: float = Field(0.05, ge=0, allow_inf_nan=False)
    reading: Literal["sphere", "gaussian"] = "sphere"
    norm: Literal["frobenius", "spectral", "linf"] = "frobenius"

    def build(self, level: float | None = None) -> noise_lib.NoiseLaw:
        lvl = self.level if level is None else level
        if self.law == "relative_norm":
            return noise_lib.RelativeNorm(lvl, reading=self.reading)
        if self.law == "weight_relative":
            return noise_lib.WeightRelative(lvl, norm=self.norm)
        return noise_lib.LAWS[self.law](lvl)


class DataConfig(_Frozen):
    name: Literal[DATASETS] = "digits"  # type: ignore[valid-type]
    options: dict[str, Any] = Field(default_factory=dict)
    n_train: int | None = Field(None, gt=0)
    n_test: int | None = Field(None, gt=0)
    normalize: Literal["standardize", "minmax", "none"] = "minmax"
    path: str | None = None


class ModelConfig(_Frozen):
    kind: Literal["mlp", "lenet"] = "mlp"
    widths: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [256, 256, 256])
    activation: Literal["relu", "tanh", "sigmoid", "gelu", "identity"] = "relu"
    use_bias: bool = True
    channels: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [6, 16])
    kernel_size: int = Field(5, gt=0)


class OptimizerConfig(_Frozen):
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


class ScheduleConfig(_Frozen):
    name: str = "constant"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in SCHEDULES:
            raise ValueError(f"unknown schedule {v!r}; choose one of {sorted(SCHEDULES)}")
        return v


class LossTermConfig(_Frozen):
    """One weighted loss term: ``kind`` from :data:`jaxsens.losses.LOSSES`."""

    kind: str
    weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    site: str | None = None
    noise: NoiseConfig | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in LOSSES:
            raise ValueError(f"unknown loss kind {v!r}; choose one of {sorted(LOSSES)}")
        return v


class TrainConfig(_Frozen):
    epochs: int = Field(5, ge=0)
    batch_size: int = Field(128, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loss: list[LossTermConfig] = Field(
        default_factory=lambda: [LossTermConfig(kind="cross_entropy")]
    )
    checkpoint_every: int = Field(1, gt=0)


class AnalysisConfig(_Frozen):
    """One analysis: where the noise enters, its law, levels and estimators."""

    kind: Literal["activation_noise", "weight_noise", "input_noise", "moments_tightness",
                  "sensitivity_map", "gaussian_attack"]
    name: str | None = None
    sites: Literal["all"] | list[str] = "all"
    noise: NoiseConfig | None = None
    levels: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(
        None, min_length=1)
    samples: int = Field(256, ge=2)
    estimators: list[Literal["sampled", "linearized", "bound", "moments"]] = Field(
        default_factory=lambda: ["sampled", "linearized", "bound"], min_length=1
    )
    examples: int = Field(256, gt=0)
    moments_method: Literal["two_stage", "layerwise_full", "layerwise_diag"] = "two_stage"
    split_at: str | None = None
    # sensitivity_map: block size of the regions (levels are the noise σ per coordinate).
    region: int = Field(1, ge=1)
    # gaussian_attack: (E‖x − x_clean‖²)^½ ≤ budget; untargeted unless target is set.
    budget: float | None = Field(None, gt=0, allow_inf_nan=False)
    target: int | None = Field(None, ge=0)
    objective: Literal["margin", "ce"] = "margin"
    steps: int = Field(200, ge=1)
    learning_rate: float = Field(0.01, gt=0, allow_inf_nan=False)
    sparsity: float = Field(0.0, ge=0, allow_inf_nan=False)
    smoothness: float = Field(0.0, ge=0, allow_inf_nan=False)
    optimize_mean: bool = True  # False: a pure noise attack (zero mean shift)

    @property
    def label(self) -> str:
        return self.name or self.kind


class OutputConfig(_Frozen):
    dir: str | None = None
    figures: bool = True
    report: bool = True


class ExperimentConfig(_Frozen):
    """A whole experiment: seed, precision, data, model, train, analyses, output."""

    name: str = "experiment"
    description: str = ""
    seed: int = 0
    precision: Literal["float32", "float64"] = "float32"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    analyses: list[AnalysisConfig] = Field(default_factory=list)
    output: OutputConfig = Field(default_factory=OutputConfig)


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
    path = _fmt_loc(loc)
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
    """Validate a mapping into an :class:`ExperimentConfig` (raises :class:`ConfigError`)."""
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
    for i, a in enumerate(cfg.analyses):
        where = f"analyses[{i}]"
        if a.kind != "gaussian_attack" and a.levels is None:
            raise ConfigError(f"config error at {where}.levels: a {a.kind} analysis needs a "
                              "non-empty list of noise levels")
        if a.kind == "gaussian_attack" and a.budget is None:
            raise ConfigError(f"config error at {where}.budget: a gaussian_attack needs a budget "
                              "(> 0) on the root-mean-square input change")
        if a.kind in ("moments_tightness", "sensitivity_map", "gaussian_attack"):
            continue
        if a.noise is None:
            raise ConfigError(f"config error at {where}.noise: a {a.kind} analysis needs a noise "
                              "law (e.g. {law: relative_norm})")
        if "moments" in a.estimators and a.kind != "input_noise":
            raise ConfigError(f"config error at {where}.estimators: 'moments' applies to "
                              f"input_noise analyses only, not {a.kind}")
        if a.kind == "weight_noise" and a.noise.law not in ("weight_relative", "relative_norm",
                                                           "multiplicative", "absolute"):
            raise ConfigError(f"config error at {where}.noise.law: {a.noise.law!r} cannot perturb "
                              "weights")
        if a.kind != "weight_noise" and a.noise.law == "weight_relative":
            raise ConfigError(
                f"config error at {where}.noise.law: 'weight_relative' applies to weight sites "
                f"only (kind: weight_noise); for {a.kind} use relative_norm, absolute or "
                "multiplicative"
            )
        if a.kind == "input_noise" and a.sites != "all" and a.sites != ["input"]:
            raise ConfigError(f"config error at {where}.sites: input_noise has the one site "
                              f"'input'; got {a.sites!r}")
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
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a raw config."""
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
    """Built-in experiment configs shipped with the package: ``{name: path}``."""
    return {p.stem: p for p in sorted(EXPERIMENTS_DIR.glob("*.yaml"))}


def builtin_path(name: str) -> Path:
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
    """Load, override and validate a config (path or built-in name)."""
    path = resolve_source(None if spec is None else str(spec))
    raw = apply_overrides(read_yaml(path), overrides)
    return parse_config(raw, str(path))


def to_dict(cfg: ExperimentConfig) -> dict:
    """The resolved config as plain data (for config.yaml in a run directory)."""
    return cfg.model_dump(mode="json")
