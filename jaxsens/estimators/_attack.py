"""The attack estimator: projected gradient ascent on ‖ΔF‖ over the noise law's ball.

For every example it searches the perturbation of the site, within the ball the law
defines, that moves the output most: the lower end of the worst-case bracket
``attack ≤ max ‖ΔF‖ ≤ bound`` (the bound uses the same radius). Balls:

* input and activation sites: the ℓ2 ball of the law's radius (exact for bounded laws —
  ``RelativeNorm`` sphere — the root mean square for Gaussian ones);
* weight sites, :class:`~jaxsens.noise.WeightRelative`: the Frobenius, spectral or
  ℓ∞-operator (row-ℓ1) ball of radius ε‖W‖ in that norm; other laws at weights: the ℓ2
  ball of the law's radius. Multiplicative noise defines no norm ball and is refused.

Restarts start from the top singular direction of the clean Jacobian (both signs; the
exact maximizer for a linear network), and from random points of the ball.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from .. import noise as noise_lib
from ..bounds import project_l1_ball
from ..paths import param
from ..sites import INPUT, PureModel, SiteInfo, Structure
from ._common import after, check_inputs, compiled_kernel, example_index, quantile_levels
from ._deviation import DEFAULT_QUANTILES, Deviation, deviation

__all__ = ["attack", "attack_body", "attack_table", "attack_applies", "check_attack_law"]

DEFAULT_STEPS = 30
DEFAULT_RESTARTS = 2


def check_attack_law(law, info: SiteInfo) -> str:
    """Why the attack cannot run with ``law`` at this site ("" if it can)."""
    if isinstance(law, noise_lib.Multiplicative):
        return "multiplicative noise defines no norm ball to attack in"
    return ""


def attack_applies(law, info: SiteInfo) -> bool:
    """Whether the attack runs with ``law`` at a site of this kind.

    Args:
      law: the noise law.
      info: the site.

    Returns:
      ``False`` for laws without a norm ball (multiplicative noise).
    """
    return not check_attack_law(law, info)


def _l2_project(v, r):
    n = jnp.sqrt(jnp.sum(v * v))
    return v * jnp.minimum(1.0, r / jnp.where(n > 0, n, 1.0))


def _spectral_project(v, r):
    m = v.reshape(-1, v.shape[-1]) if v.ndim > 1 else v.reshape(1, -1)
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    return ((u * jnp.minimum(s, r)) @ vt).reshape(v.shape)


def _rows_project(v, r):
    m = v.reshape(-1, v.shape[-1]) if v.ndim > 1 else v.reshape(-1, 1)
    return project_l1_ball(m, r, axis=0).reshape(v.shape)


def _ball(law, info: SiteInfo, value) -> tuple[jax.Array, Callable]:
    """(radius, projection) of the law's ball around ``value``."""
    if info.kind == "weight" and isinstance(law, noise_lib.WeightRelative):
        if law.norm == "spectral":
            return law.level * noise_lib.spectral_norm(value), _spectral_project
        if law.norm == "linf":
            return law.level * noise_lib.linf_operator_norm(value), _rows_project
        return law.level * jnp.sqrt(jnp.sum(value * value)), _l2_project
    r, _ = law.radius(value)
    return r, _l2_project


def _ascend(gain, project, start, r, steps):
    """Projected normalized-gradient ascent; the best value seen."""
    def step(carry, t):
        eta, best = carry
        g = jax.grad(gain)(eta)
        gn = jnp.sqrt(jnp.sum(g * g))
        eta = project(eta + (0.5 / (1.0 + 0.1 * t)) * r * g / jnp.where(gn > 0, gn, 1.0), r)
        return (eta, jnp.maximum(best, gain(eta))), None

    eta0 = project(start, r)
    (_, best), _ = jax.lax.scan(step, (eta0, gain(eta0)),
                                jnp.arange(steps, dtype=start.dtype))
    return best


def attack_body(struct: Structure, params, rest, x, law, key, *, site: str,
                steps: int = DEFAULT_STEPS, restarts: int = DEFAULT_RESTARTS,
                qlevels: tuple[float, ...] = DEFAULT_QUANTILES) -> Deviation:
    """The traceable attack at ``site``: the largest ‖ΔF‖ found per example."""
    info = struct.site(site)
    out, values = struct.apply_with_values(params, rest, x)
    batch = x.shape[0]
    k = math.prod(out.shape[1:])
    dtype = out.dtype
    weight = info.kind == "weight"
    w = param(params, info.path) if weight else None

    def one(x1, v1, key1):
        clean = struct.apply_one(params, rest, x1).reshape(-1)
        shape = info.shape

        def response(eta):
            return struct.apply_one(params, rest, x1, {site: eta.reshape(shape)}).reshape(-1)

        def gain(eta):
            d = response(eta) - clean
            return jnp.sum(d * d)

        r, project = _ball(law, info, w if weight else v1)
        r = jnp.asarray(r, dtype)
        starts = []
        if not weight:
            # The top right singular vector of J = ∂F/∂η: the maximizer for a linear F.
            jac = jax.jacrev(response)(jnp.zeros(shape, dtype)).reshape(k, -1)
            _, _, vt = jnp.linalg.svd(jac, full_matrices=False)
            top = vt[0].reshape(shape)
            starts += [r * top, -r * top]
        for i in range(restarts):
            g = jax.random.normal(jax.random.fold_in(key1, i), shape, dtype)
            starts.append(r * g / jnp.sqrt(jnp.sum(g * g)))
        # The starts one after the other: a spectral ball projects with a batched SVD
        # at every step (see ``after``).
        bests: list[jax.Array] = []
        for s in starts:
            bests.append(_ascend(gain, project, after(s, bests[-1] if bests else None), r,
                                 steps))
        best = jnp.max(jnp.stack(bests))
        return jnp.sqrt(best)

    v = x if site == INPUT else (values[site] if not weight else x)
    # Example i's restarts use fold_in(key, i), i its global number: a batch split over
    # devices gives the numbers of one device.
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_index(batch))
    lower = jax.vmap(one)(x, v, keys)
    # (``almost_sure`` describes ``upper``, which the attack does not give.)
    return deviation(batch, k, dtype, quantile_levels=qlevels, lower=lower)


_kernel = compiled_kernel(attack_body, static=("site", "steps", "restarts", "qlevels"))


def attack(
    model: nnx.Module | PureModel,
    x: Float[Array, "batch ..."],
    *,
    site: str,
    noise: noise_lib.NoiseLaw,
    key: jax.Array | None = None,
    steps: int = DEFAULT_STEPS,
    restarts: int = DEFAULT_RESTARTS,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> Deviation:
    """The largest output change an attack finds within the noise law's ball.

    Projected gradient ascent on ‖F(v + η) − F(v)‖ per example, from the top singular
    direction of the clean Jacobian (both signs) and ``restarts`` random points, over
    ``steps`` steps each. The result is a lower bound on the worst case — together with
    :func:`jaxsens.bound` (same radius) it brackets it: ``lower ≤ max ‖ΔF‖ ≤ upper``.

    Args:
      model: an NNX module or a ``PureModel``.
      x: inputs ``(batch, *input_shape)``.
      site: ``"input"``, an activation site or a weight path.
      noise: a law from :mod:`jaxsens.noise` (its level sets the ball's radius).
      key: PRNG key of the random restarts (default ``jax.random.key(0)``).
      steps: ascent steps per start.
      restarts: random starts besides the two singular directions.
      quantiles: levels of the (absent, NaN) quantiles, for stacking with sampled results.

    Returns:
      A :class:`Deviation` with ``lower``.

    Raises:
      ValueError: bad inputs, or a law without a norm ball (multiplicative noise).

    Examples:
      The attack and the bound bracket the worst case:

      >>> import jax, jax.numpy as jnp, jaxsens as js
      >>> from flax import nnx
      >>> model = js.models.MLP(4, [8], 2, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(1), (3, 4))
      >>> eta = js.noise.RelativeNorm(0.05)
      >>> lower = js.attack(model, x, site="h0", noise=eta, steps=10).lower
      >>> upper = js.bound(model, x, site="h0", noise=eta).upper
      >>> bool(jnp.all(lower <= upper))
      True
    """
    p = check_inputs(model, x, site, noise)
    reason = check_attack_law(noise, p.structure.site(site))
    if reason:
        raise ValueError(f"attack at site {site!r}: {reason}")
    key = jax.random.key(0) if key is None else key
    res = _kernel(p.adapter, p.arrays, p.x, noise, key, site=site, steps=int(steps),
                  restarts=int(restarts), qlevels=quantile_levels(quantiles))
    return res.labelled(estimator="attack", site=site, law=noise.describe())


def attack_table(struct: Structure, params, rest, x, laws, levels, key, *,
                 sites: tuple[str, ...], qlevels: tuple[float, ...]
                 ) -> tuple[Deviation, tuple[bool, ...]]:
    """Every site × level (the attack is nonlinear in the radius: one run per level);
    laws without a ball are absent."""
    rows: list[Deviation] = []
    present: list[bool] = []
    k = math.prod(struct.output_shape)
    for i, (site, law) in enumerate(zip(sites, laws, strict=True)):
        ok = attack_applies(law, struct.site(site))
        if ok:
            # Sites one after the other: each runs batched SVDs (see ``after``).
            xi = after(x, rows[-1] if rows else None)

            def one(level, j, law=law, site=site, i=i, xi=xi):
                return attack_body(struct, params, rest, xi, law.with_level(level),
                                   jax.random.fold_in(jax.random.fold_in(key, i), j),
                                   site=site, qlevels=qlevels)

            row = jax.lax.map(lambda a: one(*a), (levels.astype(x.dtype),
                                                  jnp.arange(levels.shape[0])))
        else:
            dev = deviation(x.shape[0], k, x.dtype, quantile_levels=qlevels)
            row = jax.tree.map(lambda a, n=levels.shape[0]: jnp.broadcast_to(a, (n, *a.shape)),
                               dev)
        rows.append(row)
        present.append(ok)
    return jax.tree.map(lambda *a: jnp.stack(a), *rows), tuple(present)
