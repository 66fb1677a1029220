"""The moments estimator: analytic output moments under Gaussian input noise."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from .. import noise as noise_lib
from ..moments import METHODS, check_method, noncentral_norm_mean, output_moments
from ..sites import INPUT, PureModel, Structure
from ._common import check_inputs, compiled_kernel, quantile_levels
from ._deviation import DEFAULT_QUANTILES, Deviation, deviation

__all__ = ["moments", "moments_body", "check_moments"]


def _full_cov(cov: noise_lib.Covariance, n: int, dtype) -> jax.Array:
    if isinstance(cov, noise_lib.Isotropic):
        return cov.scale2 * jnp.eye(n, dtype=dtype)
    if isinstance(cov, noise_lib.Diagonal):
        return jnp.diag(cov.var.reshape(-1))
    return cov.matrix


def check_moments(site: str, noise, method: str) -> None:
    """One-line ValueErrors for a site, law or method the moments do not handle."""
    if site != INPUT:
        raise ValueError(f"moments propagate input noise only: site must be 'input', got "
                         f"{site!r}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a moments method; choose one of "
                         f"{list(METHODS)}")
    if isinstance(noise, noise_lib.NoiseLaw) and noise.mean_rule == "sphere":
        raise ValueError("moments need Gaussian input noise; RelativeNorm(reading='sphere') "
                         "is uniform on a sphere: use reading='gaussian', Absolute or "
                         "FullCovariance")


def moments_body(struct: Structure, params, rest, x, law, *, method: str,
                 split_at: str | None, qlevels: tuple[float, ...] = DEFAULT_QUANTILES
                 ) -> Deviation:
    """The traceable moments estimate (see :func:`moments`)."""
    pm = PureModel(struct, params, rest)

    def per_example(x1):
        c = _full_cov(law.covariance(x1), x1.size, x1.dtype)
        mom = output_moments(pm, x1, jnp.zeros_like(x1), c, method=method, split_at=split_at)
        f0 = struct.apply_one(params, rest, x1).reshape(-1)
        d = mom.mean - f0
        rms = jnp.sqrt(jnp.maximum(jnp.sum(d**2) + jnp.trace(mom.cov), 0.0))
        return noncentral_norm_mean(d, mom.cov), rms, d, mom.cov

    mean, rms, d, c = jax.lax.map(per_example, x, batch_size=min(x.shape[0], 16))
    return deviation(x.shape[0], d.shape[-1], d.dtype, quantile_levels=qlevels,
                     mean_exact=False, mean=mean, rms=rms, delta_mean=d, delta_cov=c)


_kernel = compiled_kernel(moments_body, static=("method", "split_at", "qlevels"))


def moments(
    model: nnx.Module | PureModel,
    x: Float[Array, "batch ..."],
    *,
    noise: noise_lib.NoiseLaw,
    site: str = INPUT,
    key: jax.Array | None = None,
    method: str = "two_stage",
    split_at: str | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> Deviation:
    """Analytic output moments under Gaussian input noise (Bibi et al. 2018).

    The input is N(x, C) with C from ``noise`` (a Gaussian law: ``Absolute``,
    ``FullCovariance``, ``RelativeNorm(reading="gaussian")`` or ``Multiplicative``). The
    output mean and covariance come from ``method``: ``"two_stage"`` (linearize both
    halves around a ReLU site and apply the exact Affine-ReLU-Affine moments),
    ``"layerwise_full"`` or ``"layerwise_diag"`` (propagate through every layer).
    Unlike ``linearized`` these capture the mean shift E ΔF ≠ 0 that ReLUs cause.
    ``mean`` is E‖ΔF‖ of the Gaussian with that mean and covariance
    (``mean_exact=False``); ``rms`` = (‖E ΔF‖² + tr Cov)^½.

    Args:
      model: an NNX module or a ``PureModel`` with a ReLU site (two-stage) or made of affine steps
        and ReLUs (layerwise).
      x: inputs ``(batch, *input_shape)``.
      noise: a Gaussian law for the input.
      site: must be ``"input"`` (the moments propagate input noise).
      key: ignored (deterministic); accepted so that every estimator has one call shape.
      method: ``"two_stage"``, ``"layerwise_full"`` or ``"layerwise_diag"``.
      split_at: the ReLU site of the two-stage split (default: the last one).
      quantiles: levels of the (absent, NaN) quantiles, for stacking with sampled results.

    Returns:
      A :class:`Deviation` with mean, rms, delta_mean and delta_cov.

    Examples:
      >>> import jax, jaxsens as js
      >>> from flax import nnx
      >>> model = js.models.MLP(4, [8], 2, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(1), (3, 4))
      >>> m = js.propagate_moments(model, x, noise=js.noise.Absolute(0.1))
      >>> m.delta_mean.shape, m.delta_cov.shape, m.estimator
      ((3, 2), (3, 2, 2), 'moments')
    """
    del key
    check_moments(site, noise, method)
    p = check_inputs(model, x, INPUT, noise)
    check_method(PureModel(p.structure, None, None), method, split_at)
    res = _kernel(p.adapter, p.arrays, p.x, noise, method=method, split_at=split_at,
                  qlevels=quantile_levels(quantiles))
    return res.labelled(estimator="moments", site=INPUT, law=noise.describe())


def moments_applies(site: str, law) -> bool:
    """The moments propagate Gaussian input noise only."""
    return site == INPUT and law.mean_rule != "sphere"


def moments_table(struct: Structure, params, rest, x, laws, levels, *,
                  sites: tuple[str, ...], method: str, split_at: str | None,
                  qlevels: tuple[float, ...]) -> tuple[Deviation, tuple[bool, ...]]:
    """Every site × level (the mean shift is not linear in the level: one evaluation
    per level); sites other than the input are absent."""
    rows, present = [], []
    k = math.prod(struct.output_shape)
    for site, law in zip(sites, laws, strict=True):
        if site == INPUT:
            check_moments(site, law, method)

            def one(level, law=law):
                return moments_body(struct, params, rest, x, law.with_level(level),
                                    method=method, split_at=split_at, qlevels=qlevels)

            rows.append(jax.lax.map(one, levels))
            present.append(True)
        else:
            dev = deviation(x.shape[0], k, x.dtype, quantile_levels=qlevels)
            rows.append(jax.tree.map(
                lambda a, n=levels.shape[0]: jnp.broadcast_to(a, (n, *a.shape)), dev))
            present.append(False)
    return jax.tree.map(lambda *a: jnp.stack(a), *rows), tuple(present)
