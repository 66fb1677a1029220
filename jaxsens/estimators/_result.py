"""The one result type of every estimator."""

from __future__ import annotations

import dataclasses
import functools

import jax

__all__ = ["Deviation"]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "mean", "rms", "stderr", "quantiles", "delta_mean", "delta_cov", "flip_rate",
        "loss_change", "accuracy", "upper", "factor",
    ],
    meta_fields=[
        "estimator", "site", "law", "num_samples", "quantile_levels", "almost_sure",
        "mean_exact",
    ],
)
@dataclasses.dataclass(frozen=True)
class Deviation:
    """Output deviation ΔF = F(perturbed) − F(clean), per example.

    Fields an estimator does not produce are ``None``. Shapes: ``B`` examples, ``k``
    outputs (flattened), ``q`` quantile levels.

    Attributes:
      mean: ``(B,)`` E‖ΔF‖ (sampled: Monte Carlo mean; linearized: exact for the
        linearized network when ``mean_exact``).
      rms: ``(B,)`` (E‖ΔF‖²)^½.
      stderr: ``(B,)`` Monte Carlo standard error of ``mean`` (sampled only).
      quantiles: ``(B, q)`` quantiles of ‖ΔF‖ at ``quantile_levels`` (sampled only).
      delta_mean: ``(B, k)`` E ΔF (zero to first order).
      delta_cov: ``(B, k, k)`` Cov ΔF (linearized: J C Jᵀ).
      flip_rate: ``(B,)`` fraction of draws whose arg-max output changes (sampled).
      loss_change: ``(B,)`` mean change of the cross-entropy loss (sampled).
      accuracy: ``(B,)`` fraction of draws classified as the given label (sampled, with
        labels).
      upper: ``(B,)`` certified bound on ‖ΔF‖ (bound only): for every draw when
        ``almost_sure``, else on the root mean square (Gaussian laws).
      factor: ``(B,)`` sensitivity factor ‖v‖·‖J‖_F/√n of the site (linearized).
      estimator: ``"sampled"``, ``"linearized"``, ``"bound"`` or ``"moments"``.
      site: the site name.
      law: a description of the noise law.
      num_samples: Monte Carlo draws (sampled), else 0.
      quantile_levels: the levels of ``quantiles``.
      almost_sure: whether ``upper`` holds for every draw.
      mean_exact: whether ``mean`` is exact (for the linearized network, if predicted).
    """

    mean: jax.Array | None = None
    rms: jax.Array | None = None
    stderr: jax.Array | None = None
    quantiles: jax.Array | None = None
    delta_mean: jax.Array | None = None
    delta_cov: jax.Array | None = None
    flip_rate: jax.Array | None = None
    loss_change: jax.Array | None = None
    accuracy: jax.Array | None = None
    upper: jax.Array | None = None
    factor: jax.Array | None = None
    estimator: str = ""
    site: str = ""
    law: str = ""
    num_samples: int = 0
    quantile_levels: tuple[float, ...] = ()
    almost_sure: bool = False
    mean_exact: bool = True
