"""E‖z‖ of a Gaussian vector by a 1-D quadrature, exactly to rounding.

Shared numerics: the linearized estimator's E‖Jη‖ and the moments' E‖ΔF‖ both use the
trapezoid rule in log t defined here (``STEP``, ``NODES``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .precision import exact

__all__ = ["gaussian_norm_mean", "gaussian_norm_mean_from_eigs", "tridiagonalize", "rule",
           "weights", "STEP", "NODES", "STEP_SINGLE", "NODES_SINGLE", "TRIDIAGONAL_MAX_K"]

# Trapezoid rule in u = log t. With λ normalised to sum 1 the integrand decays like
# e^{-|u|/2} on both sides and is analytic in the strip |Im u| < π (its branch points
# sit at 1 + 2λe^u = 0), so the rule's error is ~exp(-2π²/h): h = 0.5 gives ~1e-17 for
# spread spectra. A j-fold eigenvalue makes its branch point a pole-like singularity of
# order j/2 and the constant grows: measured 4e-13 for 20 equal eigenvalues, 1e-11 for 100.
STEP = 0.5
NODES = np.arange(-70.0, 75.0 + STEP, STEP)
# Single precision needs less: step 0.7 on |u| ≤ 44 (127 nodes instead of 291) is within
# 5e-10 relative of the exact value for every spectrum tried, rank 1 to full rank and
# spreads of 1e6, and within 3e-8 for the noncentral integrand of the moments
# (tests/test_estimators.py): under float32's rounding (6e-8).
STEP_SINGLE = 0.7
NODES_SINGLE = np.arange(-44.1, 44.1 + STEP_SINGLE / 2, STEP_SINGLE)


def rule(dtype) -> tuple[np.ndarray, float]:
    """The (nodes in u = log t, step) of the trapezoid rule for ``dtype``.

    Args:
      dtype: the floating dtype of the computation.

    Returns:
      :data:`NODES`, :data:`STEP` for double precision; the shorter
      :data:`NODES_SINGLE`, :data:`STEP_SINGLE` (accurate to ~5e-10) otherwise.
    """
    if jnp.finfo(dtype).bits >= 64:
        return NODES, STEP
    return NODES_SINGLE, STEP_SINGLE


def weights(u: jax.Array, step: float) -> jax.Array:
    """The trapezoid weights of E‖z‖ = 1/(2√π) ∫ [1 − E e^{−t‖z‖²}] t^{−1/2} du.

    Shared by every E‖z‖ rule here and by the moments' noncentral E‖z‖.

    Args:
      u: the nodes, u = log t (:func:`rule`).
      step: the rule's step.

    Returns:
      One weight per node.
    """
    return step * jnp.exp(-0.5 * u) / (2.0 * math.sqrt(math.pi))


def _integrals(lam: jax.Array):
    """(I0, I1_i): E‖z‖ = I0 and ∂E‖z‖/∂λ_i = I1_i for eigenvalues ``lam`` (sum 1)."""
    nodes, step = rule(lam.dtype)
    u = jnp.asarray(nodes, lam.dtype)
    t = jnp.exp(u)
    # log Π (1 + 2tλ_i)^{-1/2}
    logs = jnp.log1p(2.0 * t[:, None] * lam[None, :])
    logp = -0.5 * jnp.sum(logs, axis=1)
    one_minus_p = -jnp.expm1(logp)
    w = weights(u, step)
    i0 = jnp.sum(w * one_minus_p)
    # ∂/∂λ_i [1 − Π] = Π · t / (1 + 2tλ_i)
    d = jnp.exp(logp)[:, None] * (t[:, None] / (1.0 + 2.0 * t[:, None] * lam[None, :]))
    i1 = jnp.sum(w[:, None] * d, axis=0)
    return i0, i1


@jax.custom_jvp
def gaussian_norm_mean_from_eigs(lam: Float[Array, " k"]) -> Float[Array, ""]:
    """E‖z‖ for z ~ N(0, diag(lam)), ``lam >= 0``.

    E‖z‖ = 1/(2√π) ∫₀^∞ [1 − Π_i (1 + 2tλ_i)^{−1/2}] t^{−3/2} dt,
    from E‖z‖ = 1/(2√π) ∫ (1 − E e^{−t‖z‖²}) t^{−3/2} dt.

    Computed for ``lam / Σλ`` by the trapezoid rule in log t on :data:`NODES` and scaled
    back by E(λ) = √(Σλ) E(λ/Σλ); the derivative ∂E/∂λ_i is a second quadrature of the
    same integrand (a custom JVP), not autodiff through the rule.

    Args:
      lam: the variances (eigenvalues of the covariance) ``(k,)``; negative entries
        (rounding) are clipped to 0.

    Returns:
      The scalar E‖z‖ (0 when every ``lam`` is 0).
    """
    value, _ = _value_and_grad(lam)
    return value


def _value_and_grad(lam):
    lam = jnp.clip(lam, 0.0, None)
    tr = jnp.sum(lam)
    safe = jnp.where(tr > 0, tr, 1.0)
    i0, i1 = _integrals(lam / safe)
    # E‖z‖ is homogeneous of degree ½ in λ: E(λ) = √τ E(λ/τ); ∂E/∂λ_i = I1_i(λ/τ)/√τ.
    value = _finish(tr, jnp.sqrt(safe) * i0)
    grad = _finish(tr, i1 / jnp.sqrt(safe))
    return value, grad


@gaussian_norm_mean_from_eigs.defjvp
def _eigs_jvp(primals, tangents):
    (lam,), (dlam,) = primals, tangents
    value, grad = _value_and_grad(lam)
    return value, jnp.sum(grad * dlam)


# Up to this many dimensions E‖z‖ of a k × k covariance comes from a Householder
# tridiagonalization and the pivots of det(I + 2tT) (vectorized over the batch: a few
# elementwise passes); above it, from LAPACK's eigenvalues (the unrolled pivot loop would grow).
TRIDIAGONAL_MAX_K = 16


def tridiagonalize(m: Float[Array, "... k k"]) -> tuple[jax.Array, jax.Array]:
    """A symmetric matrix's Householder tridiagonal form, batched, without LAPACK.

    Uses the symmetric part of ``m``, as ``jnp.linalg.eigvalsh`` does. The batch is moved
    last, so that every step is a few elementwise passes over all the matrices at once: on
    a CPU, 4× faster than one LAPACK eigenvalue call per matrix for a thousand 10 × 10
    matrices, and backward stable like it. The k − 2 reflections run as a ``lax.scan`` on
    the full k × k block (the rows and columns already reduced are masked): an unrolled
    loop on shrinking blocks runs 40% faster but compiles 5× slower (2 s at k = 10).
    Multiplications are elementwise (no matmul), so the matmul precision (TF32 on GPUs)
    does not apply.

    Args:
      m: ``(..., k, k)`` symmetric.

    Returns:
      ``(d, e)``: the diagonal ``(..., k)`` and the off-diagonal ``(..., k-1)`` (up to
      sign) of a tridiagonal matrix orthogonally similar to ``m``: same eigenvalues.
    """
    k = m.shape[-1]
    batch = m.shape[:-2]
    a = m.reshape(-1, k, k)
    a = 0.5 * (a + jnp.swapaxes(a, -1, -2))
    a = jnp.moveaxis(a, 0, -1)  # (k, k, B)
    row = jnp.arange(k)[:, None]

    def reflect(a, j):
        # Zero column j below its subdiagonal: H = I − β v vᵀ acting on rows/columns > j.
        col = jax.lax.dynamic_index_in_dim(a, j, axis=1, keepdims=False)  # (k, B)
        below = row > j
        x = jnp.where(below, col, 0.0)
        x1 = jax.lax.dynamic_index_in_dim(col, j + 1, axis=0, keepdims=False)
        norm = jnp.sqrt(jnp.sum(x * x, axis=0))
        alpha = -jnp.where(x1 >= 0, norm, -norm)  # v = x + sign(x₁)‖x‖e₁: no cancellation
        v = x - jnp.where(row == j + 1, alpha, 0.0)
        vv = 2.0 * alpha * (alpha - x1)  # ‖v‖²
        beta = jnp.where(vv > 0, 2.0 / jnp.where(vv > 0, vv, 1.0), 0.0)
        p = jnp.where(below, beta * jnp.sum(a * v[None], axis=1), 0.0)
        w = p - (0.5 * beta * jnp.sum(p * v, axis=0)) * v
        return a - v[:, None] * w[None, :] - w[:, None] * v[None, :], alpha

    if k > 2:
        a, es = jax.lax.scan(reflect, a, jnp.arange(k - 2))
        e = jnp.concatenate([es, a[k - 1, k - 2][None]])
    else:
        e = a[1:, 0]  # k = 2: already tridiagonal; k = 1: empty
    d = jnp.stack([a[i, i] for i in range(k)])
    return (jnp.moveaxis(d, 0, -1).reshape(*batch, k),
            jnp.moveaxis(e, 0, -1).reshape(*batch, k - 1))


def _tridiagonal_norm_mean(m: jax.Array) -> jax.Array:
    """E‖z‖ for z ~ N(0, m), m ``(..., k, k)``: the rule of :func:`gaussian_norm_mean_from_eigs`
    with Π(1 + 2tλ_i) = det(I + 2tT), the product of the pivots of I + 2tT.

    For T positive semi-definite every pivot of I + 2tT is at least 1 (a pivot is at least
    the smallest eigenvalue); clamping at 1 changes nothing in exact arithmetic and keeps
    the largest nodes finite when rounding leaves T slightly indefinite (there 1 − Π ≈ 1).
    The pivots are carried as pivot − 1 and summed with ``log1p``, as the eigenvalue rule
    sums log1p(2tλ): at the small nodes 1 + 2tλ rounds to 1.
    """
    # Scale each matrix to max |m_ij| = 1 first: the reflections square its entries, which
    # over- or underflows beyond ~1e±19 in float32 (~1e±154 in float64).
    scale = jnp.max(jnp.abs(m), axis=(-2, -1))
    scale = jnp.where(scale > 0, scale, 1.0)  # NaN stays NaN
    d, e = tridiagonalize(m / scale[..., None, None])
    tr = jnp.sum(d, axis=-1)
    safe = jnp.where(tr > 0, tr, 1.0)
    d = d / safe[..., None]
    e = e / safe[..., None]
    nodes, step = rule(m.dtype)
    u = jnp.asarray(nodes, m.dtype)
    s = (2.0 * jnp.exp(u)).reshape((-1,) + (1,) * (d.ndim - 1))  # (nodes, 1, ..., 1)
    logdet = jnp.zeros((), m.dtype)
    excess = None  # pivot − 1, kept apart so that log1p keeps the small nodes exact
    for j in range(d.shape[-1]):
        r = s * d[..., j]
        if excess is not None:
            q = s * e[..., j - 1]
            r = r - q * (q / (1.0 + excess))  # (s e)² / p without overflowing (s e)²
        excess = jnp.maximum(r, 0.0)
        logdet = logdet + jnp.log1p(excess)
    one_minus_p = -jnp.expm1(-0.5 * logdet)
    w = weights(u, step).reshape((-1,) + (1,) * (d.ndim - 1))
    value = jnp.sum(w * one_minus_p, axis=0)
    return _finish(tr, jnp.sqrt(safe) * jnp.sqrt(scale) * value)


def _finish(tr: jax.Array, value: jax.Array) -> jax.Array:
    """``value`` where the trace is positive, 0 where it is not, NaN for a NaN input."""
    return jnp.where(tr > 0, value, jnp.where(tr <= 0, 0.0, tr))


@jax.custom_jvp
def gaussian_norm_mean(m: Float[Array, "... k k"]) -> Float[Array, " ..."]:
    """E‖z‖ for z ~ N(0, M), M symmetric PSD ``(k, k)`` or a batch of them; differentiable.

    Up to :data:`TRIDIAGONAL_MAX_K` dimensions the value comes from a batched Householder
    tridiagonalization T of M and the pivots of det(I + 2tT) at the quadrature nodes (the
    rule of :func:`gaussian_norm_mean_from_eigs`, without eigenvalues); above it from
    ``eigvalsh``. The derivative of this spectral function is V diag(∂E/∂λ) Vᵀ, from
    ``eigh``; it is well defined where eigenvalues repeat, unlike differentiating through
    eigenvalues. At a singular M the derivative along a direction that raises a zero
    eigenvalue is infinite (it grows like log 1/λ); the rule returns a finite value set
    by where its nodes stop. A NaN anywhere in M gives NaN.

    Args:
      m: the covariance ``(..., k, k)``, symmetric positive semi-definite (its symmetric
        part is used, and that of the tangent).

    Returns:
      E‖z‖ per matrix, shape ``(...)``: :func:`gaussian_norm_mean_from_eigs` of the
      eigenvalues of ``m``, to rounding.

    Examples:
      E‖z‖ for z ~ N(0, I₂) is √(π/2):

      >>> import jax.numpy as jnp
      >>> from jaxsens.quadrature import gaussian_norm_mean
      >>> round(float(gaussian_norm_mean(jnp.eye(2))), 4)
      1.2533
    """
    m = jnp.asarray(m)
    if not jnp.issubdtype(m.dtype, jnp.inexact):
        m = m.astype(jnp.result_type(m.dtype, jnp.float32))
    if m.shape[-1] == 0:
        return jnp.zeros(m.shape[:-2], m.dtype)
    if m.shape[-1] <= TRIDIAGONAL_MAX_K:
        return _tridiagonal_norm_mean(m)
    lam = jnp.linalg.eigvalsh(m)
    return jax.vmap(gaussian_norm_mean_from_eigs)(lam.reshape(-1, lam.shape[-1])).reshape(
        lam.shape[:-1])


@gaussian_norm_mean.defjvp
@exact
def _matrix_jvp(primals, tangents):
    (m,), (dm,) = primals, tangents
    lam, v = jnp.linalg.eigh(m)
    k = lam.shape[-1]
    value, grad = jax.vmap(_value_and_grad)(lam.reshape(-1, k))
    value, grad = value.reshape(lam.shape[:-1]), grad.reshape(lam.shape)
    dm = 0.5 * (dm + jnp.swapaxes(dm, -1, -2))
    proj = jnp.einsum("...ji,...jk,...ki->...i", v, dm, v)
    return value, jnp.sum(grad * proj, axis=-1)
