"""The building blocks of experiment configs that analyses and the runner share.

Frozen pydantic models that reject unknown fields, the one-line :class:`ConfigError`, and
the noise-law section. Choices come from the library's own registries
(:data:`jaxsens.noise.LAWS`), never from copied lists.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from . import noise as noise_lib

__all__ = ["ConfigError", "Frozen", "NoiseConfig", "LAW_NAMES", "one_of"]


class ConfigError(ValueError):
    """A config problem, reported in one line before any work starts."""


class Frozen(BaseModel):
    """An immutable config section; unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def one_of(names: Iterable[str], what: str) -> AfterValidator:
    """A validator for a config choice among a registry's names.

    Use as ``Annotated[str, one_of(REGISTRY, "estimator")]``: the error names the bad value
    and every valid choice, and the choices are the registry's own keys.

    Args:
      names: the valid choices (a registry mapping gives its keys); read once, when the
        validator is made.
      what: what is chosen, for the message (``"dataset"``, ``"noise law"``).

    Returns:
      A pydantic ``AfterValidator`` that passes a valid value through unchanged and
      otherwise raises ``ValueError("unknown <what> <value> (did you mean ...?); choose one
      of [...]")``, which pydantic reports as a validation error of the field.
    """
    allowed = tuple(names)

    def check(value: str) -> str:
        if value not in allowed:
            near = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"unknown {what} {value!r}{hint}; choose one of {list(allowed)}")
        return value

    return AfterValidator(check)


# Every law a config can build: FullCovariance needs a matrix, which YAML does not carry.
LAW_NAMES: tuple[str, ...] = tuple(n for n in noise_lib.LAWS if n != "full_covariance")


class NoiseConfig(Frozen):
    """A noise law: ``law`` names a law of :mod:`jaxsens.noise`, the rest its options."""

    law: Annotated[str, one_of(LAW_NAMES, "noise law")]
    level: float = Field(0.05, ge=0, allow_inf_nan=False)
    reading: Literal["sphere", "gaussian"] = "sphere"
    norm: Literal["frobenius", "spectral", "linf"] = "frobenius"

    def build(self, level: float | None = None) -> noise_lib.NoiseLaw:
        """The law at ``level`` (default: the configured one)."""
        lvl = self.level if level is None else level
        if self.law == "relative_norm":
            return noise_lib.RelativeNorm(lvl, reading=self.reading)
        if self.law == "weight_relative":
            return noise_lib.WeightRelative(lvl, norm=self.norm)
        return noise_lib.LAWS[self.law](lvl)
