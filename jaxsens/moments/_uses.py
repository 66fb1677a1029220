"""Uses of the analytic Gaussian moments: sensitivity maps, noise attacks, expected losses.

Built on the exact Affine-ReLU-Affine moments and the two-stage linearization
(:mod:`jaxsens.moments`, DESIGN §3.4):

* :func:`sensitivity_map` — the output variance ``tr Cov F`` when only one input pixel (or
  one block of pixels) carries Gaussian noise, for every pixel at once. For a single pixel
  the pre-activation noise is rank one, and the exact moments reduce to one-dimensional
  integrals of a piecewise-linear function, evaluated in closed form after one sort.
* :func:`gaussian_noise_attack` — optimize a Gaussian input distribution
  ``N(x1 + mean_shift, diag(std^2))`` under an energy budget, through the differentiable
  moments; :func:`check_attack` measures the result on the true network by Monte Carlo.
* :func:`expected_cross_entropy` and :func:`noisy_cross_entropy` — the second-order
  expected cross-entropy of a Gaussian output, the per-example training loss behind
  :class:`jaxsens.losses.ExpectedGaussianLoss`.
* :func:`diagonal_output_moments` — :func:`~jaxsens.moments.output_moments` for a
  diagonal input covariance without forming the ``d x d`` matrix.

Inputs are per example (no batch axis) unless stated; covariances are over the flattened
input.

References:
  Bibi, Alfadly, Ghanem. "Analytic Expressions for Probabilistic Moments of PL-DNN with
    Gaussian Input." CVPR 2018.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int

from ..sites import PureModel, Structure, split
from ._gaussian import GaussianMoments, relu_moments
from ._network import METHODS, propagate_chain, split_sites, two_stage_linearization

__all__ = [
    "AttackCheck",
    "AttackResult",
    "OBJECTIVES",
    "check_attack",
    "diagonal_output_moments",
    "expected_cross_entropy",
    "gaussian_noise_attack",
    "noisy_cross_entropy",
    "sensitivity_map",
    "sensitivity_map_figure",
]

OBJECTIVES = ("margin", "ce")

# Standardized kink positions are clipped here: phi(100) and Q(100) are exactly 0 in
# float32 and float64, so every term of the rank-one formulas takes its exact limit, and
# tau^2 = 1e4 cannot overflow.
_TAU_MAX = 100.0
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Pairs of hidden units (times vmapped items) per chunk of relu_moments calls; about 12
# float64 intermediates per pair keeps a chunk near 100 MB.
_PAIRS_PER_CHUNK = 2**20
# Floats of (outputs x hidden units) per chunk of pixels in the rank-one map.
_RANK1_FLOATS_PER_CHUNK = 2**21


# --------------------------------------------------------------------------- helpers
def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a moments method; choose one of "
                         f"{list(METHODS)}")


def _concrete_float(name: str, value, *, positive: bool = True) -> None:
    """One-line ValueError for a concrete non-finite (or non-positive) scalar; traced values
    pass unchecked (the functions stay jit-able)."""
    try:
        v = float(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return
    except TypeError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")


def _float_input(pm: PureModel, x1) -> Array:
    x1 = jnp.asarray(x1)
    want = pm.input_shape
    if math.prod(x1.shape) != math.prod(want):
        raise ValueError(f"x1 must be one example of shape {want} (no batch axis), got shape "
                         f"{tuple(x1.shape)}")
    leaves = [a for a in jax.tree.leaves(pm.params) if jnp.issubdtype(a.dtype, jnp.floating)]
    dtype = jnp.result_type(*(a.dtype for a in leaves)) if leaves else jnp.float32
    if jnp.issubdtype(x1.dtype, jnp.floating):
        dtype = jnp.result_type(dtype, x1.dtype)
    return x1.reshape(want).astype(dtype)


def _num_outputs(struct: Structure) -> int:
    return math.prod(struct.output_shape)


def _hidden_width(struct: Structure, method: str, split_at: str | None) -> int:
    """Width of the widest hidden layer the moments are taken over (for chunk sizes)."""
    if method == "two_stage":
        sites = split_sites(PureModel(struct, None, None))
        if not sites:
            return 1
        name = sites[-1] if split_at is None or split_at not in sites else split_at
        return struct.site(name).size
    widths = [s.size for _, s in struct.sites if s.kind == "activation"]
    return max(widths + [1])


def _chunk(n: int, per_item: int, budget: int) -> int:
    return int(max(1, min(n, budget // max(per_item, 1))))


def _diag_sandwich(w: Array, var: Array, full: bool) -> Array:
    """Covariance of ``x @ w`` for ``Cov x = diag(var)``; ``w`` is ``(d, p)``.

    Full: ``w^T diag(var) w = (w * var)^T w`` in ``O(p^2 d)``, not the ``O(p d^2)`` of a
    dense ``d x d`` sandwich; diagonal: ``(w^2)^T var``.
    """
    if full:
        s = (w * var[:, None]).T @ w
        return 0.5 * (s + s.T)
    return jnp.square(w).T @ var


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
      model: an NNX module or ``PureModel`` with a layer chain.
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
        hidden = relu_moments(ts.A @ mu + ts.c1, _diag_sandwich(ts.A.T, var, True))
        return GaussianMoments(ts.B @ hidden.mean + ts.c2, ts.B @ hidden.cov @ ts.B.T)
    return propagate_chain(pm, mu, lambda w: _diag_sandwich(w, var, full), full=full)


# --------------------------------------------------------------------------- rank one
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
        out = (view[0] // region,)
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
            mom = propagate_chain(pm, x1, lambda w: _rows_sandwich(sigma * w[i], full),
                                        full=full)
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
      model: an NNX module or ``PureModel`` with a layer chain (MLP, LeNet).
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
      ValueError: bad ``sigma``, ``region``, ``image_shape`` or ``method``.

    References:
      Bibi, Alfadly, Ghanem, CVPR 2018 (moments and pixel-level noise sensitivity).
    """
    _check_method(method)
    _concrete_float("sigma", sigma)
    if isinstance(region, bool) or not isinstance(region, int | np.integer) or region < 1:
        raise ValueError(f"region must be an integer >= 1, got {region!r}")
    pm = split(model)
    x1 = _float_input(pm, x1)
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


def _as_picture(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim == 1:
        side = math.isqrt(a.size)
        a = a.reshape(side, side) if side * side == a.size else a[None, :]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return a


def sensitivity_map_figure(
    smap: Float[ArrayLike, "*map_shape"],
    path_or_ax: str | os.PathLike | Any,
    image: Float[ArrayLike, "*input_shape"] | None = None,
    *,
    title: str | None = None,
    cmap: str = "inferno",
    alpha: float = 0.65,
):
    """Draw a :func:`sensitivity_map`, optionally over the image it was computed for.

    Channels of an ``(H, W, C)`` map are summed; a flat map whose size is a square is
    shown square. Block maps (``region > 1``) are stretched over the image. Uses
    matplotlib's object API (no pyplot, no global backend switch).

    Args:
      smap: the map.
      path_or_ax: a file path (a new figure is saved there as PNG and closed) or a
        matplotlib ``Axes`` to draw on.
      image: the clean input, shown in gray underneath (same layout rules as the map).
      title: axes title.
      cmap: colormap of the map.
      alpha: opacity of the map when drawn over an image.

    Returns:
      The matplotlib ``Figure`` drawn on.
    """
    from matplotlib.figure import Figure

    arr = _as_picture(smap)
    if arr.ndim == 3:
        arr = arr.sum(-1)
    to_file = isinstance(path_or_ax, str | os.PathLike)
    if to_file:
        fig = Figure(figsize=(4.2, 3.6))
        ax = fig.add_subplot()
    else:
        ax = path_or_ax
        fig = ax.figure
    if image is not None:
        img = _as_picture(image)
        h, w = img.shape[:2]
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)
        ax.imshow(img, cmap="gray", extent=extent, interpolation="nearest")
        shown = ax.imshow(arr, cmap=cmap, alpha=alpha, extent=extent, interpolation="nearest")
    else:
        shown = ax.imshow(arr, cmap=cmap, interpolation="nearest")
    fig.colorbar(shown, ax=ax, label="tr Cov F (noise on this pixel only)")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    if to_file:
        fig.savefig(os.fspath(path_or_ax), format="png", dpi=110, bbox_inches="tight")
    return fig


# --------------------------------------------------------------------------- expected losses
def expected_cross_entropy(moments: GaussianMoments, label: Int[ArrayLike, ""]
                           ) -> Float[Array, ""]:
    r"""Second-order (delta-method) ``E CE(F, label)`` for ``F`` with mean ``m``, cov ``C``.

    .. math::
        E\,\mathrm{CE}(F, y) \approx \mathrm{lse}(m) - m_y
            + \tfrac12\,\mathrm{tr}(H C),\qquad H = \mathrm{diag}(p) - p p^\top,\
            p = \mathrm{softmax}(m),

    i.e. ``CE(m, y) + (sum_i p_i C_ii - p^T C p) / 2``. ``E F_y = m_y`` is exact; only
    log-sum-exp is expanded. The first-order term vanishes in expectation, so if ``m`` and
    ``C`` are the exact moments the error is the expected Taylor remainder: the third
    directional derivative of lse is the third cumulant of ``delta`` under a softmax
    distribution, bounded by ``range^3 / 4`` (Popoviciu) with ``range <= sqrt(2) ||delta||``,
    so ``|error| <= (sqrt(2) / 12) E||F - m||^3``, which is ``O(sigma^3)`` for input noise
    of scale ``sigma``.

    Args:
      moments: ``GaussianMoments(mean: (k,), cov: (k, k))`` of the logits.
      label: integer class.

    Returns:
      The approximate expected cross-entropy (scalar).

    References:
      Bibi, Alfadly, Ghanem, CVPR 2018 (the moments).
    """
    m, c = moments.mean, moments.cov
    logp = jax.nn.log_softmax(m)
    p = jnp.exp(logp)
    curvature = 0.5 * (jnp.sum(p * jnp.diagonal(c)) - p @ c @ p)
    return -logp[label] + curvature


def noisy_cross_entropy(
    model,
    x: Float[ArrayLike, "batch ..."],
    y: Int[ArrayLike, " batch"],
    *,
    sigma: float | Float[ArrayLike, ""],
    method: str = "two_stage",
    split_at: str | None = None,
) -> Float[Array, " batch"]:
    r"""Per-example ``E CE(F(x + eta), y)``, ``eta ~ N(0, sigma^2 I)``, through the moments.

    The output moments of each example come from :func:`diagonal_output_moments` with the
    isotropic ``sigma^2 I`` (two-stage: ``Sigma~ = sigma^2 A A^T``; no ``d x d`` matrix), the
    expectation from the second-order :func:`expected_cross_entropy`. Examples are mapped in
    chunks (``lax.map`` with a ``batch_size`` sized to ~``2^20`` hidden pairs), so memory
    stays bounded for wide layers and large batches. Jit-able and differentiable with
    respect to the parameters (``model`` may be a ``PureModel`` with traced parameters).
    Cost per example: one two-stage linearization (``p`` VJPs) and ``p^2 / 2`` bivariate
    normal CDFs.

    Args:
      model: an NNX module or ``PureModel`` with a layer chain.
      x: inputs ``(batch, *input_shape)`` (or any layout with the same size per example).
      y: integer labels ``(batch,)``.
      sigma: input noise standard deviation.
      method: one of :data:`jaxsens.moments.METHODS`.
      split_at: the two-stage ReLU site (default: the last one).

    Returns:
      ``(batch,)`` expected cross-entropies (second order).

    References:
      Bibi, Alfadly, Ghanem, CVPR 2018.
    """
    _check_method(method)
    _concrete_float("sigma", sigma)
    pm = split(model)
    x = jnp.asarray(x)
    x = x.reshape(x.shape[0], *pm.input_shape)
    return _noisy_ce_core(pm.structure, pm.params, pm.rest, x, jnp.asarray(y),
                          jnp.asarray(sigma, x.dtype), method=method, split_at=split_at)


@functools.partial(jax.jit, static_argnames=("struct", "method", "split_at"))
def _noisy_ce_core(struct, params, rest, x, y, sigma, *, method, split_at):
    pm = PureModel(struct, params, rest)
    var = jnp.square(sigma)

    def per_example(xy):
        x1, y1 = xy
        mom = diagonal_output_moments(pm, x1, 0.0, var, method=method, split_at=split_at)
        return expected_cross_entropy(mom, y1)

    p = _hidden_width(struct, method, split_at)
    size = _chunk(x.shape[0], p * p // 2 + p * x[0].size, _PAIRS_PER_CHUNK)
    return jax.lax.map(per_example, (x, y), batch_size=size)


# --------------------------------------------------------------------------- attacks
class AttackResult(NamedTuple):
    """A Gaussian input distribution ``N(x1 + mean_shift, diag(std^2))`` found by
    :func:`gaussian_noise_attack`.

    Attributes:
      mean_shift: ``(*input_shape)`` shift of the input mean.
      std: ``(*input_shape)`` per-coordinate standard deviation (``>= 0``).
      history: ``(steps,)`` predicted objective before each step.
      predicted_objective: predicted objective at the returned distribution (scalar).
      predicted_margin: ``E[F_a - F_b] = m_a - m_b`` predicted for ``margin_classes``.
      margin_classes: ``(a, b)``: untargeted ``(strongest wrong class, y)``; targeted
        ``(target, strongest other class)`` at the returned distribution.
      predicted_ce: second-order expected cross-entropy of ``y`` (untargeted) or of
        ``target`` (targeted).
      output: the predicted output moments.
      target: the target class, ``None`` for an untargeted attack.
      budget: the bound on ``(||mean_shift||^2 + ||std||^2)^(1/2)``.
    """

    mean_shift: Float[Array, "*input_shape"]
    std: Float[Array, "*input_shape"]
    history: Float[Array, " steps"]
    predicted_objective: Float[Array, ""]
    predicted_margin: Float[Array, ""]
    margin_classes: Int[Array, " 2"]
    predicted_ce: Float[Array, ""]
    output: GaussianMoments
    target: Int[Array, ""] | None
    budget: Float[ArrayLike, ""]


class AttackCheck(NamedTuple):
    """Monte Carlo measurement of an :class:`AttackResult` on the true network.

    Attributes:
      success_rate: fraction of draws misclassified (untargeted: ``argmax F != y``) or
        classified as the target (targeted).
      success_stderr: ``sqrt(rate (1 - rate) / n)``.
      margin: sample mean of ``F_a - F_b`` for ``result.margin_classes``.
      margin_stderr: its standard error.
      cross_entropy: sample mean of ``CE(F, label)`` (label ``y`` or the target).
      cross_entropy_stderr: its standard error.
      predicted_margin: ``result.predicted_margin``.
      predicted_ce: ``result.predicted_ce``.
      num_samples: number of draws.
    """

    success_rate: Float[Array, ""]
    success_stderr: Float[Array, ""]
    margin: Float[Array, ""]
    margin_stderr: Float[Array, ""]
    cross_entropy: Float[Array, ""]
    cross_entropy_stderr: Float[Array, ""]
    predicted_margin: Float[Array, ""]
    predicted_ce: Float[Array, ""]
    num_samples: int


def _strongest_other(m: Array, exclude) -> Array:
    return jnp.argmax(jnp.where(jnp.arange(m.size) == exclude, -jnp.inf, m))


def _total_variation(z: Array, image_shape: tuple[int, ...]) -> Array:
    """Anisotropic TV ``sum |z[h+1, w] - z[h, w]| + |z[h, w+1] - z[h, w]|`` (per channel)."""
    z = z.reshape(image_shape)
    return jnp.sum(jnp.abs(jnp.diff(z, axis=0))) + jnp.sum(jnp.abs(jnp.diff(z, axis=1)))


def _inv_softplus(v: Array) -> Array:
    v = jnp.maximum(v, jnp.finfo(v.dtype).tiny)
    # log(expm1(v)) = v + log(-expm1(-v)): no overflow for large v.
    return v + jnp.log(-jnp.expm1(-v))


def _attack_summary(mom: GaussianMoments, y, target, targeted: bool):
    m = mom.mean
    if targeted:
        a, b = target, _strongest_other(m, target)
        ce = expected_cross_entropy(mom, target)
    else:
        a, b = _strongest_other(m, y), y
        ce = expected_cross_entropy(mom, y)
    return m[a] - m[b], jnp.stack([a, b]).astype(jnp.int32), ce


@functools.partial(jax.jit, static_argnames=(
    "struct", "steps", "objective", "targeted", "method", "split_at", "relinearize",
    "optimize_mean", "image_shape"))
def _attack_core(struct, params, rest, x1, y, target, delta0, std0, budget, learning_rate,
                 sparsity, smoothness, *, steps, objective, targeted, method, split_at,
                 relinearize, optimize_mean, image_shape):
    pm = PureModel(struct, params, rest)

    def moments_of(delta, std):
        var = jnp.square(std)
        if relinearize and method == "two_stage":
            return diagonal_output_moments(pm, x1 + delta, 0.0, var, method=method,
                                           split_at=split_at)
        return diagonal_output_moments(pm, x1, delta, var, method=method, split_at=split_at)

    def objective_of(mom):
        margin, _, ce = _attack_summary(mom, y, target, targeted)
        if objective == "margin":
            return margin
        return -ce if targeted else ce

    def unpack(raw):
        delta = raw[0] if optimize_mean else jnp.zeros_like(x1)
        return delta, jax.nn.softplus(raw[1])

    def loss(raw):
        delta, std = unpack(raw)
        value = objective_of(moments_of(delta, std))
        penalty = sparsity * jnp.sum(std)
        if image_shape is not None:
            penalty = penalty + smoothness * (_total_variation(std, image_shape)
                                              + _total_variation(delta, image_shape))
        return penalty - value, value

    def project(raw):
        delta, std = unpack(raw)
        norm = jnp.sqrt(jnp.sum(delta**2) + jnp.sum(std**2))
        scale = jnp.minimum(1.0, budget / jnp.where(norm > 0, norm, 1.0))
        return (delta * scale, _inv_softplus(std * scale))

    opt = optax.adam(learning_rate)
    raw = project((delta0, _inv_softplus(std0)))

    def step(carry, _):
        raw, state = carry
        (_, value), grads = jax.value_and_grad(loss, has_aux=True)(raw)
        updates, state = opt.update(grads, state, raw)
        raw = project(optax.apply_updates(raw, updates))
        return (raw, state), value

    (raw, _), history = jax.lax.scan(step, (raw, opt.init(raw)), None, length=steps)
    delta, std = unpack(raw)
    mom = moments_of(delta, std)
    margin, classes, ce = _attack_summary(mom, y, target, targeted)
    return delta, std, history, objective_of(mom), margin, classes, ce, mom


def gaussian_noise_attack(
    model,
    x1: Float[ArrayLike, "*input_shape"],
    y: int | Int[ArrayLike, ""],
    *,
    budget: float,
    target: int | None = None,
    objective: Literal["margin", "ce"] = "margin",
    steps: int = 200,
    learning_rate: float = 0.01,
    sparsity: float = 0.0,
    smoothness: float = 0.0,
    optimize_mean: bool = True,
    method: str = "two_stage",
    split_at: str | None = None,
    relinearize: bool = True,
    image_shape: tuple[int, ...] | None = None,
    key: jax.Array | None = None,
) -> AttackResult:
    r"""Find the worst Gaussian input distribution within an energy budget.

    The input is ``x ~ N(x1 + delta, diag(s^2))``. The budget bounds its mean-square
    distance from the clean input,

    .. math::
        E\,\|x - x_1\|^2 = \|\delta\|^2 + \|s\|^2 \le \mathrm{budget}^2,

    one constraint shared by the mean shift and the noise (``optimize_mean=False`` fixes
    ``delta = 0``: a pure noise attack). The output moments ``F ~ (m, C)`` come from the
    differentiable analytic moments (:func:`diagonal_output_moments`); the objective,
    maximized with Adam (Optax) on unconstrained parameters (``delta``, and ``s =
    softplus(rho)``) followed after every step by the Euclidean projection onto the budget
    ball (a radial rescaling of ``(delta, s)``), is

    * ``objective="margin"`` (exact expected logit margins, ``E[F_a - F_b] = m_a - m_b``):
      untargeted ``max_{j != y} (m_j - m_y)``; targeted ``m_t - max_{j != t} m_j``;
    * ``objective="ce"`` (second-order :func:`expected_cross_entropy`): untargeted
      ``E CE(F, y)``; targeted ``-E CE(F, t) = E log softmax(F)_t``, the expected
      log-probability of the target;

    minus the penalties ``sparsity * ||s||_1`` and ``smoothness * (TV(s) + TV(delta))``
    (anisotropic total variation over ``image_shape``; needs an image-shaped input or
    ``image_shape``). With ``relinearize`` the two-stage expansion is taken at the current
    mean ``x1 + delta`` at every step (more faithful for large shifts in deep nets; exact
    either way for one hidden layer); otherwise at ``x1``, as in ``output_moments``.

    Args:
      model: an NNX module or ``PureModel`` with a layer chain.
      x1: one clean input (no batch axis).
      y: its true label.
      budget: bound on ``(||delta||^2 + ||s||^2)^(1/2)``, ``> 0``.
      target: target class for a targeted attack (``!= y``), ``None`` for untargeted.
      objective: ``"margin"`` or ``"ce"``.
      steps: Adam steps.
      learning_rate: Adam learning rate (in input units).
      sparsity: weight of the ``l1`` penalty on ``s``.
      smoothness: weight of the total-variation penalty on ``s`` and ``delta``.
      optimize_mean: optimize the mean shift too (``False``: zero-mean noise only).
      method: one of :data:`jaxsens.moments.METHODS`.
      split_at: the two-stage ReLU site (default: the last one).
      relinearize: two-stage expansion at the current mean (see above).
      image_shape: ``(H, W)`` or ``(H, W, C)`` view of the input for the smoothness
        penalty (default: the model's input shape when it has 2 or 3 axes).
      key: PRNG key of the initial distribution: ``None`` starts from ``delta = 0`` and an
        isotropic ``s``; a key starts from a random ``delta`` direction (random restarts).
        Both start with half of the budget's energy in ``delta`` and half in ``s``.

    Returns:
      An :class:`AttackResult`.

    Raises:
      ValueError: bad budget, steps, target, objective, method, penalty weights or shapes.

    References:
      Bibi, Alfadly, Ghanem, CVPR 2018 (moments; attacks that shape the noise through them).
    """
    _check_method(method)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}; choose one of {list(OBJECTIVES)}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    _concrete_float("budget", budget)
    _concrete_float("learning_rate", learning_rate)
    _concrete_float("sparsity", sparsity, positive=False)
    _concrete_float("smoothness", smoothness, positive=False)
    pm = split(model)
    x1 = _float_input(pm, x1)
    k = _num_outputs(pm.structure)
    _check_label("y", y, k)
    targeted = target is not None
    if targeted:
        _check_label("target", target, k)
        try:
            same = int(target) == int(y)
        except (jax.errors.ConcretizationTypeError, TypeError):
            same = False
        if same:
            raise ValueError(f"target={target} equals the true label y; pick another class "
                             f"or target=None for an untargeted attack")
    if image_shape is None and len(pm.input_shape) in (2, 3):
        image_shape = pm.input_shape
    if image_shape is not None:
        image_shape = tuple(int(n) for n in image_shape)
        if math.prod(image_shape) != x1.size or len(image_shape) not in (2, 3):
            raise ValueError(f"image_shape must be (H, W) or (H, W, C) with {x1.size} "
                             f"elements, got {image_shape}")
    else:
        try:
            if float(smoothness) > 0:
                raise ValueError("smoothness > 0 needs an image: pass image_shape=(H, W) for "
                                 "flat inputs")
        except (jax.errors.ConcretizationTypeError, TypeError):
            pass
    dtype = x1.dtype
    d = x1.size
    half = jnp.asarray(budget, dtype) / math.sqrt(2.0)
    std0 = jnp.full(x1.shape, 1.0, dtype) * (half / math.sqrt(d))
    if key is None or not optimize_mean:
        delta0 = jnp.zeros_like(x1)
    else:
        u = jax.random.normal(key, x1.shape, dtype)
        delta0 = half * u / jnp.linalg.norm(u)
    if not optimize_mean:
        std0 = std0 * math.sqrt(2.0)
    tgt = jnp.asarray(0 if target is None else target, jnp.int32)
    delta, std, history, value, margin, classes, ce, mom = _attack_core(
        pm.structure, pm.params, pm.rest, x1, jnp.asarray(y, jnp.int32), tgt, delta0, std0,
        jnp.asarray(budget, dtype), jnp.asarray(learning_rate, dtype),
        jnp.asarray(sparsity, dtype), jnp.asarray(smoothness, dtype), steps=int(steps),
        objective=objective, targeted=targeted, method=method, split_at=split_at,
        relinearize=bool(relinearize), optimize_mean=bool(optimize_mean),
        image_shape=image_shape)
    return AttackResult(
        mean_shift=delta, std=std, history=history, predicted_objective=value,
        predicted_margin=margin, margin_classes=classes, predicted_ce=ce, output=mom,
        target=tgt if targeted else None, budget=budget)


def _check_label(name: str, value, k: int) -> None:
    try:
        v = int(value)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return
    if not 0 <= v < k:
        raise ValueError(f"{name}={value} is not a class index in [0, {k})")


@functools.partial(jax.jit, static_argnames=("struct", "num_samples", "chunk", "targeted"))
def _check_core(struct, params, rest, x1, delta, std, y, target, classes, key, *,
                num_samples, chunk, targeted):
    n_chunks = -(-num_samples // chunk)
    label = target if targeted else y

    def one(c):
        eps = jax.random.normal(jax.random.fold_in(key, c), (chunk, *x1.shape), x1.dtype)
        out = struct.apply(params, rest, x1 + delta + std * eps).reshape(chunk, -1)
        margin = out[:, classes[0]] - out[:, classes[1]]
        ce = -jnp.take(jax.nn.log_softmax(out, axis=-1), label, axis=-1)
        pred = jnp.argmax(out, axis=-1)
        hit = pred == target if targeted else pred != y
        return margin, ce, hit.astype(x1.dtype)

    outs = jax.lax.map(one, jnp.arange(n_chunks))
    margin, ce, hit = (o.reshape(-1)[:num_samples] for o in outs)
    n = num_samples

    def mean_se(v):
        return jnp.mean(v), jnp.std(v, ddof=1) / math.sqrt(n)

    rate = jnp.mean(hit)
    return (rate, jnp.sqrt(rate * (1.0 - rate) / n), *mean_se(margin), *mean_se(ce))


def check_attack(
    model,
    x1: Float[ArrayLike, "*input_shape"],
    y: int | Int[ArrayLike, ""],
    result: AttackResult,
    *,
    key: jax.Array,
    num_samples: int = 10_000,
    chunk_size: int = 1000,
) -> AttackCheck:
    """Measure an attack on the true network by Monte Carlo.

    Draws ``x = x1 + mean_shift + std * eps``, ``eps ~ N(0, I)`` (chunk ``c`` uses
    ``fold_in(key, c)``), runs the model's own forward pass, and returns the success rate,
    the mean of ``F_a - F_b`` for ``result.margin_classes`` (compare with
    ``result.predicted_margin``; equal in expectation when the moments are exact, e.g. one
    hidden layer) and the mean cross-entropy (compare with ``result.predicted_ce``), each
    with its standard error.

    Args:
      model: the model attacked (NNX module or ``PureModel``).
      x1: the clean input (no batch axis).
      y: its true label.
      result: from :func:`gaussian_noise_attack` (or a hand-made baseline with the same
        fields, e.g. ``result._replace(mean_shift=0 * ..., std=...)``).
      key: PRNG key of the draws.
      num_samples: number of draws (``>= 2``).
      chunk_size: draws per forward pass.

    Returns:
      An :class:`AttackCheck`.
    """
    if (isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer)
            or num_samples < 2):
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer)
            or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    pm = split(model)
    x1 = _float_input(pm, x1)
    targeted = result.target is not None
    delta = jnp.broadcast_to(jnp.asarray(result.mean_shift, x1.dtype), x1.shape)
    std = jnp.broadcast_to(jnp.asarray(result.std, x1.dtype), x1.shape)
    tgt = jnp.asarray(result.target if targeted else 0, jnp.int32)
    stats = _check_core(pm.structure, pm.params, pm.rest, x1, delta, std,
                        jnp.asarray(y, jnp.int32), tgt, jnp.asarray(result.margin_classes),
                        key, num_samples=int(num_samples),
                        chunk=int(min(chunk_size, num_samples)), targeted=targeted)
    return AttackCheck(*stats, predicted_margin=result.predicted_margin,
                       predicted_ce=result.predicted_ce, num_samples=int(num_samples))
