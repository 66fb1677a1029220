"""The authors' tightness protocol: analytic output moments against Monte Carlo.

Per example and logit, the symmetric relative error 2|a − b|/(|a| + |b|) between the
Monte Carlo estimate (b) and the analytic value (a), for the output mean, the exact
(general-mean) variance and the old zero-mean-formula variance (Bibi et al. 2018).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import montecarlo
from ..sites import PureModel, split
from ._gaussian import affine_relu_affine, affine_relu_affine_zero_mean_cov
from ._network import bypass_terms, layerwise_moments, two_stage_linearization

__all__ = ["symmetric_relative_error", "tightness_study"]


def symmetric_relative_error(a: jax.Array, b: jax.Array) -> jax.Array:
    """The symmetric relative error 2|a − b| / (|a| + |b|), elementwise; 0 where both are 0.

    Args:
      a: an array.
      b: an array of the same shape (or broadcastable).

    Returns:
      The elementwise error, in [0, 2].
    """
    den = jnp.abs(a) + jnp.abs(b)
    return jnp.where(den > 0, 2.0 * jnp.abs(a - b) / jnp.where(den > 0, den, 1.0), 0.0)


def _analytic(pm: PureModel, x1, sigma, split_at):
    d = x1.size
    cov = sigma**2 * jnp.eye(d, dtype=x1.dtype)
    ts = two_stage_linearization(pm, x1, split_at=split_at)
    mu = x1.reshape(-1)
    exact = affine_relu_affine(ts.A, ts.c1, ts.B, ts.c2, mu, cov)
    old = affine_relu_affine_zero_mean_cov(ts.A, ts.c1, ts.B, ts.c2, mu, cov)
    with jax.default_matmul_precision("highest"):
        pre_mean = ts.A @ mu + ts.c1
        pre_sd = sigma * jnp.sqrt(jnp.sum(ts.A * ts.A, axis=1))
        dm, dc = bypass_terms(ts, mu, cov @ ts.C.T, pre_mean, pre_sd)
    return (exact.mean + dm, jnp.diagonal(exact.cov + dc), jnp.diagonal(old.cov + dc))


def tightness_study(model, x: jax.Array, *, sigmas, key: jax.Array, num_samples: int = 10_000,
                    split_at: str | None = None, layerwise: bool = True,
                    chunk: int = 1000) -> list[dict]:
    """Analytic vs Monte Carlo output moments under input noise N(0, σ² I).

    Args:
      model: an NNX module or ``PureModel`` with a ReLU site to split at.
      x: clean inputs ``(batch, *input_shape)``.
      sigmas: input noise standard deviations.
      key: PRNG key for the Monte Carlo draws.
      num_samples: draws per example (the authors used 10⁴).
      split_at: two-stage split site (default: the last ReLU site).
      layerwise: also evaluate full-covariance layerwise propagation (skipped for models
        it cannot read, e.g. with residual connections).

    Returns:
      Records per σ: means over examples and logits of the symmetric relative error of
      the mean (two-stage and layerwise), the exact variance and the zero-mean-formula
      variance; and the median Monte Carlo / analytic ratios.
    """
    pm = split(model)
    struct, params, rest = pm.structure, pm.params, pm.rest
    x = jnp.asarray(x)
    if layerwise:
        try:
            layerwise_moments(pm, x[0], jnp.zeros_like(x[0]), jnp.eye(x[0].size, dtype=x.dtype))
        except ValueError:
            layerwise = False

    @jax.jit
    def analytic(x1, sigma):
        m, v, v_old = _analytic(pm, x1, sigma, split_at)
        if layerwise:
            lw = layerwise_moments(pm, x1, jnp.zeros_like(x1),
                                   sigma**2 * jnp.eye(x1.size, dtype=x1.dtype))
            return m, v, v_old, lw.mean, jnp.diagonal(lw.cov)
        return m, v, v_old, m, v

    @jax.jit
    def monte_carlo(x1, sigma, k):
        def draw(kk):
            out = struct.apply_one(params, rest, x1 + sigma * jax.random.normal(
                kk, x1.shape, x1.dtype)).reshape(-1)
            return out, out**2

        (m1, m2), _ = montecarlo.average(draw, k, num_samples=num_samples,
                                         chunk=min(chunk, num_samples))
        return m1, (m2 - m1**2) * num_samples / (num_samples - 1)

    records = []
    for i, sigma in enumerate(sigmas):
        sre: dict[str, list[jax.Array]] = {
            "mean": [], "mean_layerwise": [], "var": [], "var_zero_mean": [],
            "var_layerwise": []}
        ratios: dict[str, list[jax.Array]] = {"mean": [], "var": [], "var_zero_mean": []}
        for b in range(x.shape[0]):
            kb = jax.random.fold_in(jax.random.fold_in(key, i), b)
            m, v, v_old, lm, lv = analytic(x[b], sigma)
            mc_m, mc_v = monte_carlo(x[b], sigma, kb)
            sre["mean"].append(symmetric_relative_error(m, mc_m))
            sre["mean_layerwise"].append(symmetric_relative_error(lm, mc_m))
            sre["var"].append(symmetric_relative_error(v, mc_v))
            sre["var_zero_mean"].append(symmetric_relative_error(v_old, mc_v))
            sre["var_layerwise"].append(symmetric_relative_error(lv, mc_v))
            ratios["mean"].append(mc_m / m)
            ratios["var"].append(mc_v / v)
            ratios["var_zero_mean"].append(mc_v / v_old)
        rec = {"level": float(sigma), "num_examples": int(x.shape[0]),
               "num_samples": int(num_samples)}
        for name, vals in sre.items():
            if not layerwise and "layerwise" in name:
                continue
            rec[f"sre_{name}"] = float(jnp.mean(jnp.stack(vals)))
        for name, vals in ratios.items():
            rec[f"ratio_{name}"] = float(np.median(np.asarray(jnp.stack(vals))))
        records.append(rec)
    return records
