"""The linearized estimator: exact first-order propagation, every site in one sweep."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from .. import noise as noise_lib
from ..paths import param
from ..quadrature import gaussian_norm_mean
from ..sites import PureModel, Structure
from ._common import (
    check_inputs,
    check_positive_int,
    chunked_map,
    compiled_kernel,
    memory_budget,
    quantile_levels,
    safe_norm,
)
from ._deviation import DEFAULT_QUANTILES, Deviation, deviation

__all__ = ["linearized", "sandwiches", "linear_predictions", "example_chunk"]


@functools.lru_cache(maxsize=256)
def example_chunk(struct: Structure, sites: tuple[str, ...], batch: int, itemsize: int) -> int:
    """Examples per step so that the Jacobians of one step fit the memory budget
    (cached: a repeated call costs a look-up, not the site sizes and device queries)."""
    k = math.prod(struct.output_shape)
    per_example = k * sum(struct.site(s).size for s in sites) * itemsize * 3
    return int(max(1, min(batch, memory_budget() // max(per_example, 1))))


def _per_example(struct, params, rest, x1, sites, laws):
    """One example's reverse sweep: ``{site: (m, factor, mean_factor)}``.

    k vector-Jacobian products (one per output, vmapped) of a single VJP give
    ∂F/∂(every requested site) at once. Vmapped over the examples this is one batched
    sweep whose Jacobians come out example-major, the layout in which the k × k
    sandwiches J C Jᵀ are cheapest (measured: 2× faster than output-major).
    """
    deltas = {}
    for s in sites:
        info = struct.site(s)
        if info.kind == "weight":
            deltas[s] = jnp.zeros_like(param(params, info.path))
        else:
            deltas[s] = jnp.zeros(info.shape, x1.dtype)

    def f(d):
        out, vals = struct.apply_one_with_values(params, rest, x1, d)
        return out.reshape(-1), vals

    out, vjp_fn, vals = jax.vjp(f, deltas, has_aux=True)
    (jac,) = jax.vmap(vjp_fn)(jnp.eye(out.shape[0], dtype=out.dtype))
    res = {}
    for s, law in zip(sites, laws, strict=True):
        info = struct.site(s)
        if info.kind == "input":
            v = x1
        elif info.kind == "activation":
            v = vals[s]
        else:
            v = param(params, info.path)
        j = jac[s]
        m = law.covariance(v).sandwich(j)
        factor = safe_norm(j.reshape(-1), 0) * safe_norm(v.reshape(-1), 0)
        res[s] = (m, factor / math.sqrt(v.size), law.mean_factor(v))
    return res


def sandwiches(struct: Structure, params, rest, x, laws, *, sites: Sequence[str],
               chunk: int) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """J C Jᵀ, the sensitivity factor and the mean factor of every site (traceable).

    Every site comes from one reverse sweep (k VJPs), ``chunk`` examples at a time.

    Args:
      struct: the model structure; ``params``, ``rest`` its arrays.
      x: inputs ``(batch, *input_shape)``.
      laws: one noise law per site (aligned with ``sites``).
      sites: the site names.
      chunk: examples per step (memory bound).

    Returns:
      Per site ``(m, factor, mean_factor)``: ``m`` ``(batch, k, k)`` = J C Jᵀ, ``factor``
      ``(batch,)`` = ‖v‖·‖J‖_F/√n and ``mean_factor`` ``(batch,)`` with E‖Jη‖ =
      mean_factor · E‖z‖, z ~ N(0, m).
    """
    sites = tuple(sites)
    laws = tuple(laws)

    def step(xc):
        return jax.vmap(lambda x1: _per_example(struct, params, rest, x1, sites, laws))(xc)

    res = chunked_map(step, x, chunk)
    return [res[s] for s in sites]


def linear_predictions(m: jax.Array, mean_factor: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and root mean square of ‖Jη‖ per example from M = J C Jᵀ.

    Args:
      m: ``(batch, k, k)`` J C Jᵀ.
      mean_factor: ``(batch,)`` the law's factor (1 for Gaussian laws, √n/E‖g‖ on spheres).

    Returns:
      ``(mean, rms)``: E‖Jη‖ = mean_factor · E‖z‖ for z ~ N(0, M) (exact for the law's
      mean rule, from the spectrum of M: :func:`jaxsens.quadrature.gaussian_norm_mean`)
      and (tr M)^½.
    """
    rms = jnp.sqrt(jnp.maximum(jnp.trace(m, axis1=-2, axis2=-1), 0.0))
    mean = mean_factor * gaussian_norm_mean(m)
    return mean, rms


def linearized_body(struct: Structure, params, rest, x, law, *, site: str, chunk: int,
                    qlevels: tuple[float, ...] = DEFAULT_QUANTILES) -> Deviation:
    """The traceable linearized estimate at one site (see :func:`linearized`)."""
    ((m, factor, mf),) = sandwiches(struct, params, rest, x, (law,), sites=(site,),
                                    chunk=chunk)
    mean, rms = linear_predictions(m, mf)
    return deviation(
        x.shape[0], m.shape[-1], m.dtype, quantile_levels=qlevels,
        mean_exact=law.mean_rule != "approx",
        mean=mean, rms=rms, delta_mean=jnp.zeros(m.shape[:2], m.dtype), delta_cov=m,
        factor=factor,
    )


_kernel = compiled_kernel(linearized_body, static=("site", "chunk", "qlevels"))


def linearized(
    model: nnx.Module | PureModel,
    x: Float[Array, "batch ..."],
    *,
    site: str,
    noise: noise_lib.NoiseLaw,
    key: jax.Array | None = None,
    chunk_size: int | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> Deviation:
    """Exact first-order propagation of the noise to the output, per example.

    ΔF ≈ Jη with J = ∂F/∂site at the clean point. With C = E[ηηᵀ] from the law:
    Cov ΔF = J C Jᵀ, E‖Jη‖² = tr(J C Jᵀ), and E‖Jη‖ exactly from the spectrum of
    J C Jᵀ (Gaussian laws) or with the sphere correction √n/E‖g‖ (sphere laws);
    for spectral/ℓ∞ weight laws the mean is that of a Gaussian with the same covariance
    (``mean_exact=False``). Also the sensitivity factor ‖v‖·‖J‖_F/√n, so that under
    relative-norm noise rms = ε · factor: the per-site number that says which layers
    resist. The sweep, the spectral reduction and the quadrature are one compiled call.

    Args:
      model: an NNX module or a ``PureModel``.
      x: inputs ``(batch, *input_shape)``.
      site: ``"input"``, an activation site or a weight path.
      noise: a law from :mod:`jaxsens.noise`.
      key: ignored (deterministic); accepted so that every estimator has one call shape.
      chunk_size: examples per step of the Jacobian computation (memory bound).
      quantiles: levels of the (absent, NaN) quantiles, for stacking with sampled results.

    Returns:
      A :class:`Deviation` with mean, rms, delta_mean (zeros), delta_cov and factor.

    Examples:
      Under relative-norm noise the root mean square is exactly ε times the factor:

      >>> import jax, jax.numpy as jnp, jaxsens as js
      >>> from flax import nnx
      >>> model = js.models.MLP(4, [8], 2, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(1), (3, 4))
      >>> p = js.linearized(model, x, site="h0", noise=js.noise.RelativeNorm(0.05))
      >>> p.mean.shape, p.delta_cov.shape
      ((3,), (3, 2, 2))
      >>> bool(jnp.allclose(p.rms, 0.05 * p.factor, rtol=1e-5))
      True
    """
    del key
    p = check_inputs(model, x, site, noise)
    struct = p.structure
    itemsize = jnp.dtype(x.dtype).itemsize if jnp.issubdtype(x.dtype, jnp.floating) else 4
    chunk = chunk_size or example_chunk(struct, (site,), x.shape[0], itemsize)
    chunk = check_positive_int("chunk_size", chunk)
    res = _kernel(p.adapter, p.arrays, p.x, noise, site=site, chunk=chunk,
                  qlevels=quantile_levels(quantiles))
    return res.labelled(estimator="linearized", site=site, law=noise.describe())


def linearized_table(struct: Structure, params, rest, x, laws, levels, *,
                     sites: tuple[str, ...], chunk: int, qlevels: tuple[float, ...]
                     ) -> tuple[Deviation, tuple[bool, ...]]:
    """Every site × level from one reverse sweep at level 1, rescaled.

    Every law's covariance is homogeneous of degree 2 in its level, so J C Jᵀ scales
    with level², E‖Jη‖ and the rms with the level; the factor does not depend on it.
    """
    unit = tuple(law.with_level(1.0) for law in laws)
    outs = sandwiches(struct, params, rest, x, unit, sites=sites, chunk=chunk)
    # Every site's k × k eigenproblems in one batched call: one LAPACK loop on a CPU
    # instead of one per site competing with the sweep, and never two batched LAPACK
    # calls at once, which can deadlock XLA's CPU runtime (see ``_common.after``).
    batch = x.shape[0]
    means, rmss = linear_predictions(jnp.concatenate([m for m, _, _ in outs]),
                                     jnp.concatenate([mf for _, _, mf in outs]))
    rows = []
    for i, (law, (m, factor, _)) in enumerate(zip(laws, outs, strict=True)):
        mean1, rms1 = means[i * batch:(i + 1) * batch], rmss[i * batch:(i + 1) * batch]
        dev = deviation(x.shape[0], m.shape[-1], m.dtype, quantile_levels=qlevels,
                        mean_exact=law.mean_rule != "approx", mean=mean1, rms=rms1,
                        delta_mean=jnp.zeros(m.shape[:2], m.dtype), delta_cov=m,
                        factor=factor)
        lv = levels.astype(m.dtype)
        rows.append(dataclasses.replace(
            jax.tree.map(lambda a, n=lv.shape[0]: jnp.broadcast_to(a, (n, *a.shape)), dev),
            mean=lv[:, None] * mean1, rms=lv[:, None] * rms1,
            delta_cov=lv[:, None, None, None] ** 2 * m))
    return jax.tree.map(lambda *a: jnp.stack(a), *rows), (True,) * len(sites)
