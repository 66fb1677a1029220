"""Weight perturbations to hold the margin bound against: random ones on the budget's
boundary, and a projected-gradient attack over the product of row-ℓ1 balls.

A layer's budget ``‖Δ_k‖_∞ ≤ ε_k`` (max row ℓ1 sum of ``Δ_k`` seen as ``W = Kᵀ``) is a
product of ℓ1 balls, one per output unit (a column of the kernel K). The attack starts
from the Frank–Wolfe vertex of the gradient at Δ = 0 (per unit, ±ε on the input with the
largest |gradient|: the exact worst case when only the last layer moves) and from random
boundary points, and ascends with steps projected exactly onto the balls (Duchi et al.
2008).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from ..sites import PureModel, split
from ._margin import layer_budgets, margin_chain

__all__ = [
    "project_l1_ball",
    "random_weight_perturbation",
    "weight_attack",
    "accuracy_under_weight_noise",
]


def project_l1_ball(v: Float[ArrayLike, ...], radius: Float[ArrayLike, ""], *, axis: int = 0
                    ) -> Float[Array, ...]:
    """Euclidean projection of every slice along ``axis`` onto the ℓ1 ball of ``radius``.

    Exact (sort-based, Duchi, Shalev-Shwartz, Singer, Chandra 2008): slices inside the
    ball are returned unchanged.

    Args:
      v: the array.
      radius: the ball's radius (≥ 0).
      axis: the axis holding each slice's coordinates.

    Returns:
      The projection, same shape as ``v``.
    """
    v = jnp.moveaxis(jnp.asarray(v), axis, -1)
    r = jnp.asarray(radius, v.dtype)
    a = jnp.abs(v)
    u = -jnp.sort(-a, axis=-1)
    css = jnp.cumsum(u, axis=-1)
    j = jnp.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    cond = u - (css - r) / j > 0
    rho = jnp.sum(cond, axis=-1, keepdims=True)  # cond is a prefix of True values
    theta = (jnp.take_along_axis(css, jnp.maximum(rho - 1, 0), axis=-1) - r) / jnp.maximum(
        rho, 1).astype(v.dtype)
    w = jnp.sign(v) * jnp.maximum(a - theta, 0.0)
    inside = jnp.sum(a, axis=-1, keepdims=True) <= r
    return jnp.moveaxis(jnp.where(inside, v, w), -1, axis)


def _sites_and_budgets(pm: PureModel, eps, layers, relative):
    chain = margin_chain(pm)
    budgets = layer_budgets(chain, eps, layers, relative=relative)
    sites = []
    for k in layers:
        site = chain.sites[int(k)]
        if site is None:
            raise ValueError(f"dense layer {k}'s kernel is computed, not a parameter: it "
                             "cannot be perturbed")
        sites.append(site)
    return sites, [budgets[int(k)] for k in layers]


def random_weight_perturbation(model, key: jax.Array, *, eps, layers: Sequence[int],
                               relative: bool = False) -> dict[str, jax.Array]:
    """A random perturbation on the boundary of the budget: every row of every ``Δ_k`` has
    ℓ1 norm exactly ``ε_k`` (uniform on the simplex, random signs).

    Args:
      model: a dense-chain model.
      key: PRNG key.
      eps: the budget (scalar or per listed layer).
      layers: the perturbed dense layers.
      relative: budgets relative to ``‖W_k‖_∞``.

    Returns:
      ``{weight site: Δ}`` (kernel-shaped), for ``deltas=`` of the model's pure function.
    """
    pm = split(model)
    sites, budgets = _sites_and_budgets(pm, eps, layers, relative)
    out = {}
    for i, (site, e) in enumerate(zip(sites, budgets, strict=True)):
        shape = pm.site(site).shape
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        w = jax.random.exponential(k1, shape, e.dtype)
        s = jax.random.rademacher(k2, shape, e.dtype)
        out[site] = e * s * w / jnp.sum(w, axis=0, keepdims=True)
    return out


def _vertex(g: jax.Array, e: jax.Array) -> jax.Array:
    """Per kernel column, ±e on the row with the largest |g| (a vertex of the ℓ1 ball)."""
    i = jnp.argmax(jnp.abs(g), axis=0)
    onehot = jax.nn.one_hot(i, g.shape[0], axis=0, dtype=g.dtype)
    return e * onehot * jnp.sign(jnp.take_along_axis(g, i[None], axis=0))


def weight_attack(
    model,
    x: Float[ArrayLike, "batch ..."],
    y: Int[ArrayLike, " batch"],
    *,
    eps,
    layers: Sequence[int],
    relative: bool = False,
    objective: Literal["margins", "untargeted"] = "margins",
    steps: int = 50,
    restarts: int = 2,
    key: jax.Array | None = None,
) -> Float[Array, "batch ..."]:
    """The largest margin drop a projected-gradient weight attack finds.

    Args:
      model: a dense-chain model.
      x: inputs ``(batch, ...)``.
      y: integer labels.
      eps: the budget (scalar or per listed layer).
      layers: the perturbed dense layers.
      relative: budgets relative to ``‖W_k‖_∞``.
      objective: ``"margins"``: for every class j, maximize the drop of ``f_y − f_j``
        (to compare with Γ_j); ``"untargeted"``: maximize ``max_{j≠y} f_j − f_y`` (the
        attack succeeds where it ends > 0).
      steps: ascent steps per start.
      restarts: random boundary starts besides the Frank–Wolfe start.
      key: PRNG key of the random starts (default ``jax.random.key(0)``).

    Returns:
      ``"margins"``: ``(batch, k)`` drops (0 for the true class); ``"untargeted"``:
      ``(batch,)`` the attacked ``max_{j≠y} f_j − f_y``.
    """
    pm = split(model)
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    sites, budgets = _sites_and_budgets(pm, eps, layers, relative)
    key = jax.random.key(0) if key is None else key
    struct, params, rest = pm.structure, pm.params, pm.rest
    xs = x.reshape(x.shape[0], *pm.input_shape)
    k = struct.output_shape[-1] if struct.output_shape else 1

    def logits(x1, deltas):
        return struct.apply_one(params, rest, x1, deltas).reshape(-1)

    def attack_one(x1, y1, target, key1):
        clean = logits(x1, {})

        def value(deltas):
            out = logits(x1, deltas)
            if objective == "margins":
                return (out[target] - out[y1]) - (clean[target] - clean[y1])
            others = jnp.where(jax.nn.one_hot(y1, k, dtype=bool), -jnp.inf, out)
            return jnp.max(others) - out[y1]

        def project(deltas):
            return {s: project_l1_ball(deltas[s], e, axis=0) for s, e in zip(sites, budgets,
                                                                               strict=True)}

        def ascend(deltas, t):
            g = jax.grad(value)(deltas)
            lr = 1.0 / (1.0 + 0.2 * t)
            step = {s: deltas[s] + lr * e * g[s] / (jnp.max(jnp.abs(g[s])) + 1e-30)
                    for s, e in zip(sites, budgets, strict=True)}
            return project(step), None

        def run(start):
            final, _ = jax.lax.scan(ascend, start, jnp.arange(steps, dtype=clean.dtype))
            return jnp.maximum(value(final), value(start))

        zero = {s: jnp.zeros(pm.site(s).shape, clean.dtype) for s in sites}
        g0 = jax.grad(value)(zero)
        starts = [{s: _vertex(g0[s], e) for s, e in zip(sites, budgets, strict=True)}]
        for r in range(restarts):
            starts.append(random_weight_perturbation(pm, jax.random.fold_in(key1, r),
                                                     eps=eps, layers=layers,
                                                     relative=relative))
        return jnp.max(jnp.stack([run(s) for s in starts]))

    keys = jax.random.split(key, x.shape[0])
    if objective == "untargeted":
        return jax.jit(jax.vmap(lambda a, b, c: attack_one(a, b, 0, c)))(xs, y, keys)

    def per_example(x1, y1, key1):
        drops = jax.vmap(lambda j: attack_one(x1, y1, j, jax.random.fold_in(key1, j)))(
            jnp.arange(k))
        return jnp.where(jnp.arange(k) == y1, 0.0, jnp.maximum(drops, 0.0))

    return jax.jit(jax.vmap(per_example))(xs, y, keys)


def accuracy_under_weight_noise(model, x, y, *, eps, layers: Sequence[int],
                                relative: bool = False, key: jax.Array,
                                samples: int = 20, attack_steps: int = 50
                                ) -> dict[str, float]:
    """Clean accuracy, accuracy under random boundary perturbations, and under the attack.

    Args:
      model: a dense-chain model.
      x: inputs ``(batch, ...)``.
      y: integer labels.
      eps: the budget (scalar or per listed layer).
      layers: the perturbed dense layers.
      relative: budgets relative to ``‖W_k‖_∞``.
      key: PRNG key (random perturbations and attack starts).
      samples: random perturbations (each applied to the whole batch).
      attack_steps: ascent steps of the attack.

    Returns:
      ``{"clean", "random", "attacked"}`` accuracies; ``random`` averages the draws.
    """
    pm = split(model)
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    xs = x.reshape(x.shape[0], *pm.input_shape)

    def acc(deltas):
        out = pm.apply(xs, deltas).reshape(x.shape[0], -1)
        return jnp.mean((jnp.argmax(out, axis=1) == y).astype(jnp.float32))

    clean = acc({})
    rand = jnp.mean(jnp.stack([
        acc(random_weight_perturbation(pm, jax.random.fold_in(key, i), eps=eps,
                                       layers=layers, relative=relative))
        for i in range(samples)]))
    worst = weight_attack(pm, x, y, eps=eps, layers=layers, relative=relative,
                          objective="untargeted", steps=attack_steps,
                          key=jax.random.fold_in(key, samples))
    correct = (worst < 0) & (jnp.argmax(pm.apply(xs).reshape(x.shape[0], -1), 1) == y)
    return {"clean": float(clean), "random": float(rand),
            "attacked": float(jnp.mean(correct.astype(jnp.float32)))}
