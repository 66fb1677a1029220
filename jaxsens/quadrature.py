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

__all__ = ["gaussian_norm_mean", "gaussian_norm_mean_from_eigs", "rule", "STEP", "NODES",
           "STEP_SINGLE", "NODES_SINGLE"]

# Trapezoid rule in u = log t. With λ normalised to sum 1 the integrand decays like
# e^{-|u|/2} on both sides and is analytic in the strip |Im u| < π (its branch points
# sit at 1 + 2λe^u = 0), so the rule's error is ~exp(-2π²/h): h = 0.5 gives ~1e-17.
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


def _integrals(lam: jax.Array):
    """(I0, I1_i): E‖z‖ = I0 and ∂E‖z‖/∂λ_i = I1_i for eigenvalues ``lam`` (sum 1)."""
    nodes, step = rule(lam.dtype)
    u = jnp.asarray(nodes, lam.dtype)
    t = jnp.exp(u)
    # log Π (1 + 2tλ_i)^{-1/2}
    logs = jnp.log1p(2.0 * t[:, None] * lam[None, :])
    logp = -0.5 * jnp.sum(logs, axis=1)
    one_minus_p = -jnp.expm1(logp)
    w = step * jnp.exp(-0.5 * u) / (2.0 * math.sqrt(math.pi))
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
    value = jnp.where(tr > 0, jnp.sqrt(safe) * i0, 0.0)
    grad = jnp.where(tr > 0, i1 / jnp.sqrt(safe), 0.0)
    return value, grad


@gaussian_norm_mean_from_eigs.defjvp
def _eigs_jvp(primals, tangents):
    (lam,), (dlam,) = primals, tangents
    value, grad = _value_and_grad(lam)
    return value, jnp.sum(grad * dlam)


@jax.custom_jvp
def gaussian_norm_mean(m: Float[Array, "k k"]) -> Float[Array, ""]:
    """E‖z‖ for z ~ N(0, M), M symmetric PSD ``(k, k)``; differentiable in M.

    The derivative of this spectral function is V diag(∂E/∂λ) Vᵀ, well defined also where
    eigenvalues repeat (rank-deficient M), unlike differentiating through eigenvalues.

    Args:
      m: the covariance ``(k, k)``, symmetric positive semi-definite (its lower triangle
        is read by ``eigvalsh``; the JVP uses the symmetric part of the tangent).

    Returns:
      The scalar E‖z‖ = :func:`gaussian_norm_mean_from_eigs` of the eigenvalues of ``m``.

    Examples:
      E‖z‖ for z ~ N(0, I₂) is √(π/2):

      >>> import jax.numpy as jnp
      >>> from jaxsens.quadrature import gaussian_norm_mean
      >>> round(float(gaussian_norm_mean(jnp.eye(2))), 4)
      1.2533
    """
    return gaussian_norm_mean_from_eigs(jnp.linalg.eigvalsh(m))


@gaussian_norm_mean.defjvp
@exact
def _matrix_jvp(primals, tangents):
    (m,), (dm,) = primals, tangents
    lam, v = jnp.linalg.eigh(m)
    value, grad = _value_and_grad(lam)
    dm = 0.5 * (dm + dm.T)
    proj = jnp.einsum("ij,jk,ki->i", v.T, dm, v)
    return value, jnp.sum(grad * proj)
