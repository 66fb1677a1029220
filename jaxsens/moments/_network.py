"""Moments of deep networks under Gaussian input (Bibi et al. 2018).

* Two-stage linearization: split F = f₂ ∘ relu ∘ f₁ at a ReLU site; expand f₁ and f₂ to
  first order at the clean input (A, c1 and B, c2) and apply the exact
  Affine-ReLU-Affine moments.
* Layerwise propagation: carry (mean, covariance) through every layer of the model's
  chain — exact through affine maps, exact first and second moments through each ReLU
  given a Gaussian pre-activation (full covariance), or with the covariance kept
  diagonal.

Both need the model's ``layer_chain()`` (the built-in models have one). Inputs are per
example (no batch axis); the covariance is over the flattened input.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..chain import ActivationStep, LinearStep, SiteStep, param
from ..precision import exact
from ..quadrature import NODES, STEP
from ..sites import INPUT, PureModel, split
from ._gaussian import GaussianMoments, affine_relu_affine, relu_mean, relu_moments
from ._gaussian import relu_second_moment as _relu_m2

__all__ = [
    "TwoStage",
    "two_stage_linearization",
    "split_sites",
    "two_stage_moments",
    "layerwise_moments",
    "output_moments",
    "METHODS",
]

METHODS = ("two_stage", "layerwise_full", "layerwise_diag")


class TwoStage(NamedTuple):
    """F(x) ≈ B relu(A x + c1) + c2 around a clean input (x flattened).

    Attributes:
      A: ``(p, d)`` Jacobian of the pre-activation at the split w.r.t. the input.
      c1: ``(p,)`` so that A x0 + c1 is the clean pre-activation.
      B: ``(k, p)`` Jacobian of the output w.r.t. the split's ReLU output.
      c2: ``(k,)`` so that B relu(z0) + c2 is the clean output.
    """

    A: Float[Array, "p d"]
    c1: Float[Array, " p"]
    B: Float[Array, "k p"]
    c2: Float[Array, " k"]


def split_sites(pm: PureModel) -> tuple[str, ...]:
    """Activation sites usable as a two-stage split: ``site = relu(dense(previous site))``.

    Args:
      pm: the split model (its layer chain is read).

    Returns:
      The site names, in chain order (empty without a chain or such a site).
    """
    chain = pm.structure.chain or ()
    out = []
    for i in range(3, len(chain)):
        prev, lin, act, site = chain[i - 3:i + 1]
        if (isinstance(prev, SiteStep) and isinstance(lin, LinearStep) and lin.kind == "dense"
                and isinstance(act, ActivationStep) and act.name == "relu"
                and isinstance(site, SiteStep)):
            out.append(site.name)
    return tuple(out)


def _split_step(pm: PureModel, split_at: str | None):
    chain = pm.structure.chain
    if chain is None:
        raise ValueError("two-stage moments need the model's layer_chain() (as jaxsens.models "
                         "MLP and LeNet provide)")
    allowed = split_sites(pm)
    if not allowed:
        raise ValueError("the model has no ReLU site of the form relu(dense(previous site)) to "
                         "split at")
    name = allowed[-1] if split_at is None else split_at
    if name not in allowed:
        raise ValueError(f"split={name!r} is not a ReLU site after a dense layer; allowed: "
                         f"{list(allowed)}")
    for i, step in enumerate(chain):
        if isinstance(step, SiteStep) and step.name == name:
            prev, lin = chain[i - 3], chain[i - 2]
            assert isinstance(prev, SiteStep) and isinstance(lin, LinearStep)  # split_sites
            return name, prev.name, lin
    raise AssertionError("unreachable")


def two_stage_linearization(model, x1: jax.Array, *, split_at: str | None = None) -> TwoStage:
    """First-order expansions of the two halves of the network around ``x1``.

    Args:
      model: an NNX module or ``PureModel`` with a layer chain.
      x1: one clean input (no batch axis).
      split_at: the ReLU site to split at (default: the last one).

    Returns:
      A :class:`TwoStage` ``(A, c1, B, c2)``.
    """
    pm = split(model)
    site, prev, lin = _split_step(pm, split_at)
    struct, params, rest = pm.structure, pm.params, pm.rest
    x_shape = x1.shape
    xf = x1.reshape(-1)

    def pre_activation(xv):
        _, vals = struct.apply_one_with_values(params, rest, xv.reshape(x_shape))
        h = xv.reshape(x_shape) if prev == INPUT else vals[prev]
        z = h.reshape(-1) @ param(params, lin.kernel)
        if lin.bias is not None:
            z = z + param(params, lin.bias)
        return z

    z0 = pre_activation(xf)
    jac = jax.jacfwd if xf.size <= z0.size else jax.jacrev
    A = jac(pre_activation)(xf)
    c1 = z0 - jnp.matmul(A, xf, precision="highest")

    out0, vals0 = struct.apply_one_with_values(params, rest, x1)
    h0 = vals0[site]

    def head(delta):
        return struct.apply_one(params, rest, x1, {site: delta.reshape(h0.shape)}).reshape(-1)

    zero = jnp.zeros(h0.size, h0.dtype)
    k = out0.size
    B = jax.jacrev(head)(zero) if k <= h0.size else jax.jacfwd(head)(zero)
    c2 = out0.reshape(-1) - jnp.matmul(B, h0.reshape(-1), precision="highest")
    return TwoStage(A, c1, B, c2)


def two_stage_moments(model, x1, mean_shift, cov, *, split_at: str | None = None
                      ) -> GaussianMoments:
    """Output mean and covariance for input ~ N(x1 + mean_shift, cov), two-stage linearized.

    Args:
      model: an NNX module or ``PureModel`` with a layer chain.
      x1: the clean input (no batch axis), the expansion point.
      mean_shift: shift of the input mean (input shape).
      cov: ``(d, d)`` input covariance over the flattened input.
      split_at: the ReLU site to split at (default: the last one).

    Returns:
      ``GaussianMoments(mean: (k,), cov: (k, k))`` of the flattened output.
    """
    ts = two_stage_linearization(model, x1, split_at=split_at)
    mu = x1.reshape(-1) + mean_shift.reshape(-1)
    return affine_relu_affine(ts.A, ts.c1, ts.B, ts.c2, mu, cov)


def _dense_relu_chain(pm: PureModel):
    """The model's layer chain, checked to hold only dense layers and ReLU/identity."""
    chain = pm.structure.chain
    if chain is None:
        raise ValueError("layerwise moments need the model's layer_chain()")
    for step in chain:
        if isinstance(step, LinearStep) and step.kind != "dense":
            raise ValueError("layerwise moments support dense layers only (the MLP); use "
                             "method='two_stage' for convolutional models")
        if isinstance(step, ActivationStep) and step.name not in ("relu", "identity"):
            raise ValueError(f"layerwise moments need relu activations, got {step.name!r}")
    return chain


@exact
def propagate_chain(pm: PureModel, mu, first_cov, *, full: bool) -> GaussianMoments:
    """Carry (mean, covariance) through a dense ReLU chain, layer by layer.

    ``first_cov(kernel)`` gives the covariance after the first dense layer: a matrix if
    ``full``, else its diagonal (so a structured input covariance never needs a d×d
    matrix). After that, affine steps are exact and each ReLU gets the exact moments of
    relu(u) for Gaussian u with the propagated mean and covariance (full) or variances
    (diagonal).
    """
    params = pm.params
    mu = mu.reshape(-1)
    c = None
    for step in _dense_relu_chain(pm):
        if isinstance(step, LinearStep):
            w = param(params, step.kernel)
            if c is None:
                c = first_cov(w)
            else:
                c = w.T @ c @ w if full else jnp.square(w).T @ c
            mu = mu @ w
            if step.bias is not None:
                mu = mu + param(params, step.bias)
        elif isinstance(step, ActivationStep) and step.name == "relu":
            if full:
                mu, c = relu_moments(mu, c)
            else:
                sd = jnp.sqrt(jnp.clip(c, 0.0, None))
                m1 = relu_mean(mu, sd)
                c = jnp.clip(_relu_m2(mu, sd) - m1**2, 0.0, None)
                mu = m1
    if c is None:
        raise ValueError("the layer chain has no dense layer to propagate moments through")
    return GaussianMoments(mu, c if full else jnp.diag(c))


@exact
def layerwise_moments(model, x1, mean_shift, cov, *,
                      covariance: Literal["full", "diag"] = "full") -> GaussianMoments:
    """Propagate (mean, covariance) through a dense ReLU chain layer by layer.

    Affine steps are exact; each ReLU gets the exact moments of relu(u) for a Gaussian u
    with the propagated mean and covariance (the Gaussian assumption is the
    approximation). ``covariance="diag"`` keeps only variances after the first layer
    (cheaper, ignores correlations between units; the input's own correlations still
    enter the first layer's variances).

    Args:
      model: an NNX module or ``PureModel`` whose chain has dense layers and ReLUs only.
      x1: the clean input (no batch axis).
      mean_shift: shift of the input mean (input shape).
      cov: ``(d, d)`` input covariance over the flattened input.
      covariance: ``"full"`` or ``"diag"``.

    Returns:
      ``GaussianMoments(mean: (k,), cov: (k, k))`` (diagonal ``cov`` for ``"diag"``).
    """
    pm = split(model)
    full = covariance == "full"

    def first_cov(w):
        c = w.T @ cov @ w
        return c if full else jnp.diagonal(c)

    return propagate_chain(pm, x1.reshape(-1) + mean_shift.reshape(-1), first_cov, full=full)


def output_moments(model, x1, mean_shift, cov, *, method: str = "two_stage",
                   split_at: str | None = None) -> GaussianMoments:
    """Output mean and covariance under input ~ N(x1 + mean_shift, cov) by ``method``.

    Args:
      model: an NNX module or ``PureModel`` with a layer chain.
      x1: the clean input (no batch axis).
      mean_shift: shift of the input mean (input shape).
      cov: ``(d, d)`` input covariance over the flattened input.
      method: ``"two_stage"``, ``"layerwise_full"`` or ``"layerwise_diag"``.
      split_at: the two-stage split site (default: the last ReLU site).

    Returns:
      ``GaussianMoments(mean: (k,), cov: (k, k))`` of the flattened output.

    Raises:
      ValueError: unknown method, or a model the method cannot handle.
    """
    if method == "two_stage":
        return two_stage_moments(model, x1, mean_shift, cov, split_at=split_at)
    if method == "layerwise_full":
        return layerwise_moments(model, x1, mean_shift, cov, covariance="full")
    if method == "layerwise_diag":
        return layerwise_moments(model, x1, mean_shift, cov, covariance="diag")
    raise ValueError(f"method={method!r} is not a moments method; choose one of {list(METHODS)}")


@exact
def noncentral_norm_mean(m: Float[Array, " k"], c: Float[Array, "k k"]) -> Float[Array, ""]:
    """E‖z‖ for z ~ N(m, C), by the same 1-D integral as the centred case.

    E‖z‖ = 1/(2√π) ∫ (1 − E e^{−t‖z‖²}) t^{−3/2} dt with
    E e^{−t‖z‖²} = det(I + 2tC)^{−½} exp(−t mᵀ(I + 2tC)^{−1} m). A Cholesky factor per node
    keeps it differentiable for singular C; where 2t‖C‖ < 1e-4 both terms use their
    power series instead, since the factor's rounding (~1e-16) would be amplified by the
    weight t^{-1/2} there.

    Args:
      m: ``(k,)`` the mean of z.
      c: ``(k, k)`` its covariance (symmetric PSD, possibly singular).

    Returns:
      E‖z‖ (a scalar), differentiable in ``m`` and ``c``.
    """
    k = m.shape[0]
    scale = jnp.trace(c) + jnp.sum(m**2)
    safe = jnp.where(scale > 0, scale, 1.0)
    cn, mn = c / safe, m / jnp.sqrt(safe)
    u = jnp.asarray(NODES, m.dtype)
    t = jnp.exp(u)
    eye = jnp.eye(k, dtype=m.dtype)
    powers = [eye]
    for _ in range(4):
        powers.append(powers[-1] @ cn)
    tr = [jnp.trace(p) for p in powers]  # tr C^j
    quad = [mn @ p @ mn for p in powers]  # mᵀ C^j m

    def node(tt):
        chol = jnp.linalg.cholesky(eye + 2.0 * tt * cn)
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
        y = jax.scipy.linalg.solve_triangular(chol, mn, lower=True)
        exact = -0.5 * logdet - tt * jnp.sum(y * y)
        x = 2.0 * tt
        # log det(I + xC) = Σ_j (−1)^{j+1} x^j tr C^j / j;  (I + xC)^{-1} = Σ_j (−xC)^j
        series_logdet = x * tr[1] - x**2 * tr[2] / 2 + x**3 * tr[3] / 3 - x**4 * tr[4] / 4
        series_q = quad[0] - x * quad[1] + x**2 * quad[2] - x**3 * quad[3]
        series = -0.5 * series_logdet - tt * series_q
        return jnp.where(x * jnp.maximum(tr[1], 1e-30) < 1e-4, series, exact)

    logp = jax.vmap(node)(t)
    w = STEP * jnp.exp(-0.5 * u) / (2.0 * math.sqrt(math.pi))
    val = jnp.sum(w * -jnp.expm1(logp))
    return jnp.where(scale > 0, jnp.sqrt(safe) * val, 0.0)
