"""The one result type of every estimator, with one fixed pytree structure."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import precision as precision_lib

__all__ = ["Deviation", "DEFAULT_QUANTILES", "DATA_FIELDS", "deviation"]

DEFAULT_QUANTILES: tuple[float, ...] = (0.05, 0.5, 0.95)

# Every field below is an array in every result, whatever the estimator.
DATA_FIELDS = (
    "mean", "rms", "stderr", "quantiles", "delta_mean", "delta_cov", "flip_rate",
    "loss_change", "accuracy", "upper", "lower", "factor", "quantile_levels", "num_samples",
    "almost_sure", "mean_exact",
)
_LABELS = ("estimator", "site", "law", "precision")


@dataclasses.dataclass(frozen=True)
class Deviation:
    """Output deviation ΔF = F(perturbed) − F(clean), per example.

    Every estimator returns the same pytree: all fields below are arrays, always present,
    with the shapes given (``B`` examples, ``k`` outputs flattened, ``q`` quantile
    levels). **A quantity an estimator does not produce is NaN** (all of its entries),
    so results of different estimators stack and tree-map together
    (``jax.tree.map(lambda *a: jnp.stack(a), dev_a, dev_b)``). :meth:`has` tells, on
    concrete results, which quantities are there.

    The labels ``estimator``, ``site``, ``law`` and ``precision`` describe the call.
    They are not part of the pytree (results of different estimators have one structure),
    so a result that went through a JAX transformation (``jax.tree.map``, ``jax.vmap``,
    the output of ``jax.jit``) carries empty labels.

    Attributes:
      mean: ``(B,)`` E‖ΔF‖ (sampled: Monte Carlo mean; linearized: exact for the
        linearized network when ``mean_exact``; moments: of the Gaussian with the
        analytic mean and covariance).
      rms: ``(B,)`` (E‖ΔF‖²)^½.
      stderr: ``(B,)`` Monte Carlo standard error of ``mean`` (sampled).
      quantiles: ``(B, q)`` quantiles of ‖ΔF‖ at ``quantile_levels`` (sampled).
      delta_mean: ``(B, k)`` E ΔF (linearized: zero; moments: the mean shift).
      delta_cov: ``(B, k, k)`` Cov ΔF (linearized: J C Jᵀ).
      flip_rate: ``(B,)`` fraction of draws whose arg-max output changes (sampled,
        vector outputs).
      loss_change: ``(B,)`` mean change of the cross-entropy loss (sampled, vector
        outputs).
      accuracy: ``(B,)`` fraction of draws classified as the given label (sampled, with
        labels).
      upper: ``(B,)`` certified bound on ‖ΔF‖ (bound): for every draw when
        ``almost_sure``, else on the root mean square (Gaussian laws).
      lower: ``(B,)`` the largest ‖ΔF‖ an attack found within the law's ball (attack):
        the lower end of the worst-case bracket lower ≤ max ‖ΔF‖ ≤ upper.
      factor: ``(B,)`` sensitivity factor ‖v‖·‖J‖_F/√n of the site (linearized).
      quantile_levels: ``(q,)`` the levels of ``quantiles``.
      num_samples: ``()`` Monte Carlo draws per example (0 for deterministic estimators).
      almost_sure: ``()`` bool, whether ``upper`` holds for every draw.
      mean_exact: ``()`` bool, whether ``mean`` is exact (for the linearized network,
        if predicted).
      estimator: label: ``"sampled"``, ``"linearized"``, ``"bound"`` or ``"moments"``.
      site: label: the site name.
      law: label: a description of the noise law.
      precision: label: the matmul precision the network ran at (see
        :mod:`jaxsens.precision`; jaxsens's closed forms always run at "highest").
    """

    mean: jax.Array
    rms: jax.Array
    stderr: jax.Array
    quantiles: jax.Array
    delta_mean: jax.Array
    delta_cov: jax.Array
    flip_rate: jax.Array
    loss_change: jax.Array
    accuracy: jax.Array
    upper: jax.Array
    lower: jax.Array
    factor: jax.Array
    quantile_levels: jax.Array
    num_samples: jax.Array
    almost_sure: jax.Array
    mean_exact: jax.Array
    estimator: str = ""
    site: str = ""
    law: str = ""
    precision: str = ""

    def __repr__(self) -> str:
        """One line: the labels, then shape and batch mean of each produced quantity."""
        labels = ", ".join(f"{k}={getattr(self, k)!r}" for k in _LABELS if getattr(self, k))
        parts = []
        for name in ("mean", "rms", "stderr", "upper", "lower", "factor", "flip_rate",
                     "accuracy", "loss_change", "delta_cov"):
            value = getattr(self, name)
            try:
                arr = np.asarray(value)
            except Exception:  # noqa: BLE001 - a tracer: show its shape only
                parts.append(f"{name}{tuple(value.shape)} traced")
                continue
            if np.issubdtype(arr.dtype, np.floating) and np.all(np.isnan(arr)):
                continue  # absent
            parts.append(f"{name}{tuple(arr.shape)} mean={np.nanmean(arr):.4g}")
        return f"Deviation({labels}{'; ' if labels else ''}{', '.join(parts)})"

    def has(self, field: str) -> bool:
        """Whether ``field`` was produced (not all NaN); needs concrete values."""
        if field not in DATA_FIELDS:
            raise ValueError(f"field={field!r} is not a Deviation field; allowed: "
                             f"{list(DATA_FIELDS)}")
        value = getattr(self, field)
        return not bool(jnp.all(jnp.isnan(value))) if jnp.issubdtype(
            value.dtype, jnp.floating) else True

    def labelled(self, *, estimator: str, site: str, law: str) -> Deviation:
        """The same arrays with the given labels (a new result; this one is unchanged)."""
        new = object.__new__(Deviation)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(estimator=estimator, site=site, law=law,
                            precision=precision_lib.describe())
        return new


def _flatten_with_keys(d: Deviation):
    return tuple((jax.tree_util.GetAttrKey(f), getattr(d, f)) for f in DATA_FIELDS), None


def _flatten(d: Deviation):
    return tuple(getattr(d, f) for f in DATA_FIELDS), None


def _unflatten(_, children) -> Deviation:
    return Deviation(*children)


jax.tree_util.register_pytree_with_keys(Deviation, _flatten_with_keys, _unflatten, _flatten)


def deviation(
    batch: int,
    k: int,
    dtype,
    *,
    quantile_levels: Sequence[float] = DEFAULT_QUANTILES,
    num_samples: int = 0,
    almost_sure: bool | jax.Array = False,
    mean_exact: bool | jax.Array = True,
    **given: jax.Array | None,
) -> Deviation:
    """A :class:`Deviation` with the ``given`` fields and NaN in all others (traceable).

    Args:
      batch: number of examples ``B``.
      k: number of (flattened) outputs.
      dtype: floating dtype of the result.
      quantile_levels: the ``q`` quantile levels.
      num_samples: Monte Carlo draws per example.
      almost_sure: whether ``upper`` holds for every draw.
      mean_exact: whether ``mean`` is exact.
      **given: produced fields, by name.
    """
    q = len(quantile_levels)
    shapes = {
        "mean": (batch,), "rms": (batch,), "stderr": (batch,), "quantiles": (batch, q),
        "delta_mean": (batch, k), "delta_cov": (batch, k, k), "flip_rate": (batch,),
        "loss_change": (batch,), "accuracy": (batch,), "upper": (batch,), "lower": (batch,),
        "factor": (batch,),
    }
    unknown = set(given) - set(shapes)
    if unknown:
        raise TypeError(f"unknown Deviation fields {sorted(unknown)}")
    fields: dict[str, Any] = {}
    for name, shape in shapes.items():
        value = given.get(name)
        if value is None:
            fields[name] = jnp.full(shape, math.nan, dtype)
        else:
            fields[name] = jnp.asarray(value, dtype).reshape(shape)
    return Deviation(
        **fields,
        quantile_levels=jnp.asarray(quantile_levels, dtype).reshape(q),
        num_samples=jnp.asarray(num_samples, jnp.int32),
        almost_sure=jnp.asarray(almost_sure, bool),
        mean_exact=jnp.asarray(mean_exact, bool),
    )
