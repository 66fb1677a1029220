"""What every experiment kind is: a config class, ``run``, ``figures``, ``markdown``."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import jax
from pydantic import Field

from ..moments import METHODS, check_method
from ..schema import ConfigError, Frozen, one_of
from ..sites import PureModel

__all__ = ["AnalysisConfig", "WithLevels", "WithMoments", "AnalysisKind", "Context",
           "check_moments_model", "a_kind", "summary_row"]


class AnalysisConfig(Frozen):
    """Fields every analysis has; each kind subclasses it with ``kind: Literal[...]``.

    Attributes:
      kind: the experiment kind (the discriminator of the config union).
      name: a label for files and the report (default: the kind).
      examples: how many test examples the analysis uses.
    """

    kind: str
    name: str | None = None
    examples: int = Field(256, gt=0)

    @property
    def label(self) -> str:
        return self.name or self.kind

    def check(self, where: str) -> None:
        """Checks that need no model (after parsing); ConfigError naming ``where``."""

    def validate_model(self, where: str, model: PureModel) -> None:
        """Checks against the model built from the config, before any training."""


class WithLevels(AnalysisConfig):
    """An analysis over a list of noise levels (ε, or σ for Gaussian input noise).

    Attributes:
      levels: the noise levels; required.
    """

    levels: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(
        None, min_length=1)

    def check(self, where: str) -> None:
        if self.levels is None:
            raise ConfigError(f"config error at {where}.levels: {a_kind(self.kind)} analysis "
                              "needs a non-empty list of noise levels")


class WithMoments(AnalysisConfig):
    """An analysis that uses the analytic Gaussian-input moments.

    Attributes:
      moments_method: ``"two_stage"``, ``"layerwise_full"`` or ``"layerwise_diag"``.
      split_at: the two-stage split site (default: the last ReLU site).
    """

    moments_method: Annotated[str, one_of(METHODS, "moments method")] = "two_stage"
    split_at: str | None = None


@dataclasses.dataclass(frozen=True)
class Context:
    """What a running analysis gets from the runner.

    Attributes:
      model: the trained (or loaded) Flax module.
      x: the analysed test inputs ``(examples, ...)``.
      y: their labels.
      key: this analysis's PRNG key (from the config's seed and its index).
      index: its position in ``analyses``.
      quiet: no progress output.
      initial_model: the model as initialized, before training (``None`` when the run
        did not train, or from callers that do not have it).
    """

    model: Any
    x: jax.Array
    y: jax.Array
    key: jax.Array
    index: int
    quiet: bool
    initial_model: Any = None

    def error(self, err: Exception) -> ConfigError:
        """A user error found while running, as a one-line config error."""
        return ConfigError(f"config error at analyses[{self.index}]: {err}")


@dataclasses.dataclass(frozen=True)
class AnalysisKind:
    """A registry entry: one experiment kind.

    Attributes:
      config: its config class (``kind: Literal["name"]``).
      run: ``run(config, context) -> records`` (JSON-able dicts).
      figures: ``figures(run_dir, analysis) -> file names`` written under ``figures/``;
        ``analysis`` is the saved entry (``name``, ``kind``, ``records`` ...).
      markdown: ``markdown(analysis, figures) -> str``, its report section.
      summary: ``summary(analysis) -> lines`` for the terminal table.
      columns: the names of the summary's columns after ``analysis`` (its header).
    """

    config: type[AnalysisConfig]
    run: Callable[[Any, Context], list[dict]]
    figures: Callable[[Path, dict], list[str]]
    markdown: Callable[[dict, list[str]], str]
    summary: Callable[[dict], list[str]]
    columns: tuple[str, ...] = ("site", "ε", "sampled", "predicted", "bound", "accuracy")

    @property
    def name(self) -> str:
        (value,) = typing.get_args(self.config.model_fields["kind"].annotation)
        return value


def summary_row(name: str, *cells: str) -> str:
    """One line of the terminal summary table.

    Args:
      name: the analysis name (or ``"analysis"`` for a header line).
      *cells: the cells; widths 18, 6, 10, 10, 10 and 9 characters, the first (a site
        or an example) left-aligned, the others right-aligned.

    Returns:
      The line.
    """
    widths = (18, 6, 10, 10, 10, 9)
    out = f"{name:<18.18}"
    for i, (cell, width) in enumerate(zip(cells, widths, strict=False)):
        out += f" {cell:<{width}.{width}}" if i == 0 else f" {cell:>{width}}"
    return out


def a_kind(kind: str) -> str:
    """``"an activation_noise"``, ``"a weight_noise"``: the kind with its article."""
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def check_moments_model(where: str, model: PureModel, method: str, split_at: str | None
                        ) -> None:
    """ConfigErrors, before any work, if the analytic moments cannot run on ``model``."""
    if method not in METHODS:
        raise ConfigError(f"config error at {where}.moments_method: {method!r} is not a "
                          f"moments method; choose one of {list(METHODS)}")
    try:
        check_method(model, method, split_at)
    except ValueError as err:
        msg = str(err)
        field = ""
        if split_at is not None and f"split={split_at!r}" in msg:
            field, msg = ".split_at", msg.replace(f"split={split_at!r}", repr(split_at))
        raise ConfigError(f"config error at {where}{field}: {msg}") from None
