"""Sensitivity maps and diagonal-covariance output moments, from the analytic moments.

Built on the exact Affine-ReLU-Affine moments and the two-stage linearization
(:mod:`jaxsens.moments`, Bibi et al. 2018):

* :func:`sensitivity_map` — the output variance ``tr Cov F`` when only one input pixel (or
  one block of pixels) carries Gaussian noise, for every pixel at once. For a single pixel
  the pre-activation noise is rank one, and the exact moments reduce to one-dimensional
  integrals of a piecewise-linear function, evaluated in closed form after one sort.
* :func:`diagonal_output_moments` — :func:`~jaxsens.moments.output_moments` for a
  diagonal input covariance without forming the ``d x d`` matrix.

Inputs are per example (no batch axis) unless stated; covariances are over the flattened
input. :func:`jaxsens.plotting.sensitivity_map_figure` draws a map.

References:
  Bibi, Alfadly, Ghanem. "Analytic Expressions for Probabilistic Moments of PL-DNN with
    Gaussian Input." CVPR 2018.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .. import graph as graph_lib
from ..precision import exact
from ..sites import PureModel, split
from ._common import (
    _PAIRS_PER_CHUNK,
    _check_method,
    _chunk,
    _concrete_float,
    _float_input,
    _hidden_width,
    _num_outputs,
)
from ._gaussian import GaussianMoments, relu_moments
from ._network import bypass_terms, propagate_graph, split_sites, two_stage_linearization

__all__ = [
    "diagonal_output_moments",
    "sensitivity_map",
]

# Standardized kink positions are clipped here: phi(100) and Q(100) are exactly 0 in
# float32 and float64, so every term of the rank-one formulas takes its exact limit, and
# tau^2 = 1e4 cannot overflow.
_TAU_MAX = 100.0
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Floats of (outputs x hidden units) per chunk of pixels in the rank-one map.
_RANK1_FLOATS_PER_CHUNK = 2**21


# --------------------------------------------------------------------------- helpers
@exact
def _diag_sandwich(w: Array, var: Array, full: bool) -> Array:
    """Covariance of ``x @ w`` for ``Cov x = diag(var)``; ``w`` is ``(d, p)``.

    Full: ``w^T diag(var) w = (w * var)^T w`` in ``O(p^2 d)``, not the ``O(p d^2)`` of a
    dense ``d x d`` sandwich; diagonal: ``(w^2)^T var``.
    """
    if full:
        s = (w * var[:, None]).T @ w
        return 0.5 * (s + s.T)
    return jnp.square(w).T @ var


@exact
def _rows_sandwich(g: Array, full: bool) -> Array:
    """Covariance ``g^T g`` (or its diagonal) of ``x @ w`` for ``Cov x = F F^T``,
    ``g = F^T w``."""
    return g.T @ g if full else jnp.sum(g * g, axis=0)


def diagonal_output_moments(
    model,
    x1: Float[ArrayLike, "*input_shape"],
    mean_shift: Float[ArrayLike, "*input_shape"],
    variance: Float[ArrayLike, "*input_shape"],
    *,
    method: str = "two_stage",
    split_at: str | None = None,
) -> GaussianMoments:
    r"""Output moments for input ``~ N(x1 + mean_shift, diag(variance))``.

    The same numbers as ``output_moments(model, x1, mean_shift, jnp.diag(variance.ravel()),
    method=method)`` (two-stage: linearized at ``x1``), but the first layer's covariance
    ``A diag(v) A^T = (A * v) A^T`` costs ``O(p^2 d)`` instead of the ``O(p d^2)`` of a dense
    ``d x d`` sandwich, and no ``d x d`` matrix is formed. A scalar ``variance`` is the
    isotropic ``sigma^2 I`` (``A Sigma A^T = sigma^2 A A^T``).

    Args:
      model: an NNX module or ``PureModel`` with a ReLU site (two-stage) or made of affine steps
        and ReLUs (layerwise).
      x1: one clean input (no batch axis); the two-stage expansion point.
      mean_shift: shift of the input mean, broadcast to the input shape.
      variance: per-coordinate input variance ``>= 0``, broadcast to the input shape.
      method: one of :data:`jaxsens.moments.METHODS`.
      split_at: the ReLU site of the two-stage split (default: the last one).

    Returns:
      ``GaussianMoments(mean: (k,), cov: (k, k))`` of the flattened output.

    References:
      Bibi, Alfadly, Ghanem, CVPR 2018.
    """
    _check_method(method)
    pm = split(model)
    x1 = jnp.asarray(x1)
    d = x1.size
    mu = x1.reshape(-1) + jnp.broadcast_to(jnp.asarray(mean_shift, x1.dtype),
                                           x1.shape).reshape(-1)
    var = jnp.broadcast_to(jnp.asarray(variance, x1.dtype), x1.shape).reshape(d)
    full = method != "layerwise_diag"
    if method == "two_stage":
        ts = two_stage_linearization(pm, x1, split_at=split_at)
        with jax.default_matmul_precision("highest"):  # closed-form algebra: exact
            pre_mean = ts.A @ mu + ts.c1
            pre_cov = _diag_sandwich(ts.A.T, var, True)
            hidden = relu_moments(pre_mean, pre_cov)
            dm, dc = bypass_terms(ts, mu, var[:, None] * ts.C.T, pre_mean,
                                  jnp.sqrt(jnp.clip(jnp.diagonal(pre_cov), 0.0, None)))
            return GaussianMoments(ts.B @ hidden.mean + ts.c2 + dm,
                                   ts.B @ hidden.cov @ ts.B.T + dc)
    return propagate_graph(pm, mu, full=full, var=var)


# --------------------------------------------------------------------------- rank one
@exact
def _rank1_variances(z0: Array, s: Array, B: Array) -> Array:
    r"""``Var F_l`` for ``F = B relu(z0 + s g) + c2``, ``g ~ N(0, 1)`` scalar; exact.

    Each unit is ``relu(z0_j + s_j g) = relu(z0_j) + s_j [z0_j > 0] g + |s_j| K_j(g)`` with
    ``K_j = relu(g - tau_j)`` if its kink ``-z0_j / s_j`` lies at ``+tau_j > 0`` and
    ``relu(-tau_j - g)`` if at ``-tau_j``, ``tau_j = |z0_j / s_j|`` (a unit with
    ``z0_j = 0`` kinks at 0, on the side where it switches on). So
    ``d_l = F_l - F_l(0) = beta_l g + sum_j w_lj K_j``, ``beta = B (s [z0 > 0])`` (the
    linearized response), ``w_lj = B_lj |s_j|``, and with ``Q = 1 - Phi``:

      E K_j = phi(tau_j) - tau_j Q(tau_j),   E[g K_j] = side_j Q(tau_j),
      E[K_j K_k] = (1 + tau_j tau_k) Q(tau_k) - tau_j phi(tau_k)   (same side, tau_j <= tau_k),
      E[K_j K_k] = 0                                              (opposite sides).

    After sorting by ``tau`` the pair sum is ``sum_k w_k [Q_k (S0_k + tau_k S1_k) - phi_k S1_k]``
    with exclusive same-side prefix sums ``S0 = sum w``, ``S1 = sum w tau``: ``O(p log p + kp)``
    per pixel instead of ``p^2`` bivariate normal CDFs. Writing ``d`` relative to ``F(0)``
    keeps the first-order part ``beta g`` exact, so no large means cancel.
    """
    active = z0 > 0
    abs_s = jnp.abs(s)
    moving = abs_s > 0
    tau = jnp.where(moving, jnp.abs(z0) / jnp.where(moving, abs_s, 1.0), _TAU_MAX)
    tau = jnp.minimum(tau, _TAU_MAX)
    side = jnp.where(active, -1.0, 1.0) * jnp.sign(s)
    beta = B @ jnp.where(active, s, 0.0)
    order = jnp.argsort(tau)
    tau = tau[order]
    side = side[order]
    w = B[:, order] * abs_s[order]
    q = jax.scipy.special.ndtr(-tau)
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * tau * tau)
    mean_k = pdf - tau * q
    second_k = (1.0 + tau * tau) * q - tau * pdf
    pos = side > 0
    wp = jnp.where(pos, w, 0.0)
    wn = w - wp

    def exclusive(v):
        return jnp.cumsum(v, axis=-1) - v

    s0 = jnp.where(pos, exclusive(wp), exclusive(wn))
    s1 = jnp.where(pos, exclusive(wp * tau), exclusive(wn * tau))
    mean_d = w @ mean_k
    second_d = (beta**2 + 2.0 * beta * (w @ (side * q)) + jnp.square(w) @ second_k
                + 2.0 * jnp.sum(w * (q * (s0 + tau * s1) - pdf * s1), axis=-1))
    return jnp.maximum(second_d - mean_d**2, 0.0)


def _region_index(view: tuple[int, ...], region: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Flat input indices of every region, ``(n_regions, region_size)``, and the map shape.

    Regions are ``region``-long blocks along the spatial axes: the one axis of a vector,
    both axes of an ``(H, W)`` image, ``H`` and ``W`` of an ``(H, W, C)`` image (one map
    entry per channel).
    """
    ndim = len(view)
    if ndim not in (1, 2, 3):
        raise ValueError(f"sensitivity maps need inputs of shape (d,), (H, W) or (H, W, C); "
                         f"got {view} (pass image_shape=...)")
    spatial = view[: min(ndim, 2)]
    if any(n % region for n in spatial):
        raise ValueError(f"region={region} must divide the spatial size {spatial} of the "
                         f"input viewed as {view}")
    flat = np.arange(math.prod(view)).reshape(view)
    if ndim == 1:
        blocks = flat.reshape(view[0] // region, region)
        out: tuple[int, ...] = (view[0] // region,)
    else:
        h, w = view[0] // region, view[1] // region
        c = view[2] if ndim == 3 else 1
        blocks = flat.reshape(h, region, w, region, c).transpose(0, 2, 4, 1, 3)
        blocks = blocks.reshape(h * w * c, region * region)
        out = (h, w, c) if ndim == 3 else (h, w)
    return blocks.astype(np.int32), out


@functools.partial(jax.jit, static_argnames=("struct", "method", "split_at", "rank_one"))
def _map_core(struct, params, rest, x1, sigma, index, *, method, split_at, rank_one):
    pm = PureModel(struct, params, rest)
    n, r = index.shape
    k = _num_outputs(struct)
    if method == "two_stage":
        ts = two_stage_linearization(pm, x1, split_at=split_at)
        z0 = ts.A @ x1.reshape(-1) + ts.c1
        p = z0.size
        if rank_one:
            def per_pixel(i):
                return jnp.sum(_rank1_variances(z0, sigma * ts.A[:, i[0]], ts.B))

            size = _chunk(n, k * p, _RANK1_FLOATS_PER_CHUNK)
        else:
            gram = ts.B.T @ ts.B

            def per_pixel(i):
                hidden = relu_moments(z0, _rows_sandwich(sigma * ts.A.T[i], True)).cov
                # tr(B C B^T) = sum(B^T B * C)
                return jnp.sum(gram * hidden)

            size = _chunk(n, p * p // 2, _PAIRS_PER_CHUNK)
    else:
        full = method == "layerwise_full"

        def per_pixel(i):
            # Noise sigma e_i on the region's coordinates: x @ w moves by sigma w[i]^T g.
            rows = sigma * jax.nn.one_hot(i, x1.size, dtype=x1.dtype)
            mom = propagate_graph(pm, x1, full=full, rows=rows)
            return jnp.trace(mom.cov)

        p = _hidden_width(struct, method, split_at)
        size = _chunk(n, p * p // 2 if full else p, _PAIRS_PER_CHUNK)
    return jax.lax.map(per_pixel, index, batch_size=size)


def sensitivity_map(
    model,
    x1: Float[ArrayLike, "*input_shape"],
    *,
    sigma: float | Float[ArrayLike, ""],
    region: int = 1,
    method: str = "two_stage",
    split_at: str | None = None,
    image_shape: tuple[int, ...] | None = None,
) -> Float[Array, "*map_shape"]:
    r"""Output variance attributable to each input pixel (or block of pixels).

    Entry ``R`` of the map is ``tr Cov F(x)`` for ``x ~ N(x1, sigma^2 P_R)``, ``P_R`` the
    projection onto the coordinates of region ``R``: only that pixel/block is noisy, the rest
    of the input stays clean. With the two-stage expansion ``F ~ B relu(A x + c1) + c2`` at
    ``x1`` (:func:`~jaxsens.moments.two_stage_linearization`, computed once),

    .. math::
        \mathrm{map}_R = \mathrm{tr}\!\left(B\,\mathrm{Cov}[\mathrm{relu}(z_0 + \sigma A_R g)]
            \,B^\top\right), \qquad g \sim N(0, I_{|R|}),\ z_0 = A x_1 + c_1,

    exactly (Bibi et al. 2018 moments; equal to ``output_moments`` with
    ``Sigma = sigma^2 P_R``). For one pixel (``region=1``) the pre-activation noise
    ``sigma a_i g`` is rank one: every pair of hidden units is perfectly (anti-)correlated and
    the moments are 1-D integrals of a piecewise-linear function, evaluated in closed form
    after sorting the kinks (``O(p log p + k p)`` per pixel; see ``_rank1_variances``). Blocks
    (``region > 1``) use the exact general-mean cross moments (:func:`relu_moments`,
    ``p^2 / 2`` pairs per block). For small ``sigma`` the map tends to
    ``sigma^2 ||J e_i||^2`` (the linearized sensitivity); ReLUs near their kink make it
    differ. The layerwise methods propagate each pixel's low-rank covariance through every
    layer (full: ``p^2 / 2`` bivariate CDFs per layer and pixel, much slower).

    Args:
      model: an NNX module or ``PureModel`` with a ReLU site (two-stage) or made of affine steps
        and ReLUs (layerwise).
      x1: one clean input (no batch axis).
      sigma: noise standard deviation per noisy coordinate, ``> 0``.
      region: block size along the spatial axes; 1 = per input coordinate.
      method: ``"two_stage"`` (default), ``"layerwise_full"`` or ``"layerwise_diag"``.
      split_at: the two-stage ReLU site (default: the last one).
      image_shape: view a flat input as this ``(H, W)`` or ``(H, W, C)`` image for the
        regions and the map's shape (default: the model's input shape).

    Returns:
      The map: the input shape (``region=1``), or the spatial axes divided by ``region``
      (``(H/r, W/r, C)`` for images, one entry per channel; ``(d/r,)`` for vectors).

    Raises:
      ValueError: bad ``sigma``, ``region``, ``image_shape`` or ``method``, or a two-stage
        split that a residual connection bypasses.

    References:
      Bibi, Alfadly, Ghanem, CVPR 2018 (moments and pixel-level noise sensitivity).
    """
    _check_method(method)
    _concrete_float("sigma", sigma)
    if isinstance(region, bool) or not isinstance(region, int | np.integer) or region < 1:
        raise ValueError(f"region must be an integer >= 1, got {region!r}")
    pm = split(model)
    x1 = _float_input(pm, x1)
    if method == "two_stage":
        sites = split_sites(pm)
        site = split_at if split_at is not None else (sites[-1] if sites else None)
        if site in sites and graph_lib.bypasses(graph_lib.read(pm.structure, x1.dtype), site):
            raise ValueError(
                f"sensitivity maps with method='two_stage' need every path from the input to "
                f"pass through the split site, but a residual connection bypasses {site!r}; "
                "use method='layerwise_full' or 'layerwise_diag', or split at another site")
    view = pm.input_shape if image_shape is None else tuple(int(n) for n in image_shape)
    if math.prod(view) != x1.size:
        raise ValueError(f"image_shape={image_shape} does not have the input's {x1.size} "
                         f"elements")
    if region == 1:
        index, out_shape = np.arange(x1.size, dtype=np.int32)[:, None], view
    else:
        index, out_shape = _region_index(view, int(region))
    vals = _map_core(pm.structure, pm.params, pm.rest, x1, jnp.asarray(sigma, x1.dtype),
                     jnp.asarray(index), method=method, split_at=split_at,
                     rank_one=index.shape[1] == 1)
    return vals.reshape(out_shape)
