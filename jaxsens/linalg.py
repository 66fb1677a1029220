"""Certified operator-norm bounds at the cost of a few matmuls (Gram iteration).

The exact spectral norm needs an SVD: slow on accelerators, awkward to differentiate when
the top singular value is repeated. Gram iteration (Delattre, Barthélemy, Araujo, Allauzen,
ICML 2023, "Efficient Bound of Lipschitz Constant for Convolutional Layers by Gram
Iteration") gives an *upper* bound that converges to σ_max from above, superlinearly:

* :func:`spectral_norm_bound` — ≥ σ_max of a weight seen as the matrix ``(fan_in, out)``;
* :func:`conv_operator_norm_bound` — ≥ the ℓ2 operator norm of a stride-1 'SAME' 2-D
  convolution with a Flax kernel ``(kh, kw, cin, cout)``.

Both are pure JAX: jit-able, vmap-able and differentiable. Floating-point rounding is
accounted for explicitly (see :func:`spectral_norm_bound`), so the results stay above the
exact values, not only above their rounded approximations.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["DEFAULT_ITERATIONS", "spectral_norm_bound", "conv_operator_norm_bound"]

DEFAULT_ITERATIONS = 7
"""Gram products by default (the ℓ_p norm of the spectrum with p = 256).

Measured bound/σ_max − 1, float64 (float32, where the rounding cover dominates): Gaussian
256×256 2·10⁻⁶ (0.07%), 512×512 0.12% (0.39%), 784×512 0.05% (0.50%), 512×10 10⁻⁵
(0.01%); MNIST MLP layers trained by gradient descent ≤ 10⁻⁶ (≤ 0.19%). Six products
leave 0.50% (0.77%) on 512×512 and 0.38% (0.83%) on 784×512: too close to 1%.
"""

# Relative rounding of the scalar tail, in units of u. A level of the backward recursion
# (two products and a sum, ≤ 3u, under a square root that halves them, then the root's own
# u) loses ≤ 2.5u and halves the loss of the level below: ≤ 5u in all; the product that
# starts it (S_T) and the final product with this factor add u each. 10 > 7 leaves room.
_SCALAR_SLACK = 10.0

_HIGHEST = lax.Precision.HIGHEST


def _unit_roundoff(dtype) -> float:
    return float(jnp.finfo(dtype).eps) / 2


def _gamma(k: int, dtype) -> float:
    """γ_k = k·u/(1 − k·u): |fl(Σᵢ aᵢbᵢ) − Σᵢ aᵢbᵢ| ≤ γ_k Σᵢ|aᵢbᵢ| for a length-k inner
    product in IEEE arithmetic, in *any* summation order, with or without fused multiply-adds
    (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1; §3.5 for the
    matrix product: |fl(AB) − AB| ≤ γ_k|A||B|).

    The worst case, deliberately: the probabilistic √k·u of Higham & Mary (2019) assumes
    independent mean-zero errors, and fails on structured data — a float32 16384×2 matrix
    of equal entries 1/3 has Gram entries off by ~10⁻⁴, which ~√k·u does not cover (see the
    tests). Infinite, hence a trivial bound, when k·u ≥ 1.
    """
    ku = k * _unit_roundoff(dtype)
    return ku / (1 - ku) if ku < 1 else math.inf


def _round_up(c: float, dtype) -> np.ndarray:
    """The constant c rounded up to dtype: conversion to float32 may round c down."""
    v = np.asarray(c, dtype)
    return v if v >= c else np.nextafter(v, np.asarray(np.inf, dtype))


def _as_matrix(w: jax.Array) -> jax.Array:
    """A weight seen as the matrix (fan_in, out); a vector as a (1, n) row.

    The view of ``jaxsens.noise``, repeated here so this low-level module imports nothing
    from the package.
    """
    if w.ndim <= 1:
        return w.reshape(1, -1)
    return w.reshape(-1, w.shape[-1])


def _pow2(a: jax.Array, dtype) -> jax.Array:
    """2**a exactly, built from its bits; a integer in the normal exponent range of dtype.

    (``jnp.exp2`` or ``2.0 ** a`` may be computed as exp(a·ln 2) and be off by an ulp; the
    scalings below must be exact.)
    """
    info = jnp.finfo(dtype)
    int_type = jnp.int32 if jnp.dtype(dtype).itemsize == 4 else jnp.int64
    biased = a.astype(int_type) + (info.maxexp - 1)
    return lax.bitcast_convert_type(biased << info.nmant, dtype)


def _exponent(x: jax.Array) -> jax.Array:
    """The integer a with x ∈ [2^(a−1), 2^a) for x > 0 (0 for x = 0); no gradient."""
    return lax.stop_gradient(jnp.frexp(x)[1])


def _scale_down(x: jax.Array, a: jax.Array) -> jax.Array:
    """x · 2^(−a), exact: two power-of-two factors, each within the normal range even
    where 2^(−a) is not (a₀ spans −149..128 in float32)."""
    half = a // 2
    return x * _pow2(-half, x.dtype) * _pow2(half - a, x.dtype)


def _pairwise_sum(v: jax.Array) -> jax.Array:
    """Σ v (1-D) by an explicit binary tree of adds: error ≤ γ_⌈log₂ n⌉ Σ|vᵢ|.

    XLA does not reassociate floating-point adds, so this is the order computed, while a
    reduction's order is XLA's choice (and consecutive reductions may be merged into one).
    """
    size = 1 << max(v.size - 1, 0).bit_length()
    v = jnp.pad(v, (0, size - v.size))
    while v.size > 1:
        v = v[: v.size // 2] + v[v.size // 2:]
    return v[0]


def _frobenius(x: jax.Array) -> jax.Array:
    """‖x‖_F of a 2-D x: row sums in XLA's order, then a pairwise sum over the rows."""
    return jnp.sqrt(_pairwise_sum(jnp.sum(x * x, axis=1)))


def _frobenius_cover(shape: tuple[int, int], dtype) -> float:
    """c with ‖x‖_F ≤ c·_frobenius(x) for every x of this shape.

    The computed sum of squares is ≥ (1 − γ_d)·Σx² with d = cols + ⌈log₂ rows⌉: each square
    rounds once, a row sum in any order ≤ cols − 1 times, the tree ⌈log₂ rows⌉ times, and
    the γ's of successive stages add up (γ_a + γ_b + γ_aγ_b ≤ γ_(a+b)); the root rounds by
    u. (One sum of all rows·cols squares would need γ_(rows·cols): useless for a 4096×4096
    iterate in float32.)
    """
    rows, cols = shape
    g = _gamma(cols + max(rows - 1, 0).bit_length(), dtype)
    return 1 / ((1 - _unit_roundoff(dtype)) * math.sqrt(1 - g)) if g < 1 else math.inf


def _gram(x: jax.Array) -> jax.Array:
    # HIGHEST: on GPUs float32 matmuls otherwise run in TF32 (10-bit mantissa), whose
    # rounding the safety terms below do not cover.
    return jnp.matmul(x.T, x, precision=_HIGHEST)


def _check_iterations(iterations) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int | np.integer) \
            or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")


def spectral_norm_bound(w: jax.Array, *, iterations: int = DEFAULT_ITERATIONS) -> jax.Array:
    r"""Upper bound on the largest singular value of ``w`` by Gram iteration.

    ``w`` of ndim ≥ 2 is seen as the matrix ``w.reshape(-1, w.shape[-1])`` (fan_in, out), a
    1-D ``w`` as a (1, n) row. With M₁ the smaller Gram matrix (WᵀW or WWᵀ) and
    M_{t+1} = M_tᵀM_t, the singular values of M_t are σᵢ(W)^(2^t), so

    .. math::

        σ_1(W) = σ_1(M_T)^{1/2^T} ≤ ‖M_T‖_F^{1/2^T}
               = \Big(\sum_i σ_i(W)^{2^{T+1}}\Big)^{1/2^{T+1}},

    the ℓ_p norm of the spectrum with p = 2^(T+1): it decreases with T to σ₁ (the excess
    is at most a factor rank^(1/p)). ``iterations = 0`` gives ‖W‖_F.

    Every iterate is rescaled by a power of two (exact in floating point) and the scales
    are carried as integer exponents, so nothing overflows or underflows whatever the scale
    of ``w``. Matmul rounding is covered with worst-case constants, valid in any
    summation order (see ``_gamma``): a computed Gram product Ŷ = XᵀX + E has
    |E| ≤ γ_k|X|ᵀ|X| entrywise, k the inner dimension, so ‖E‖₂ ≤ ‖E‖_F ≤ γ_k‖X‖_F² and
    σ₁(X)² ≤ σ₁(Ŷ) + γ_k‖X‖_F² (Weyl). Run backward from S_T = ‖X_T‖_F ≥ σ₁(X_T), the
    recursion S_t = (2^{a_{t+1}} S_{t+1} + γ_k‖X_t‖_F²)^{1/2} ≥ σ₁(X_t) turns this into a
    bound on the exact σ₁ of the stored ``w``. It adds ≈ Σ_t γ_k r_t / 2^(t+1) relative,
    r_t = ‖X_t‖_F²/σ₁(X_t)² the stable rank of the t-th iterate, mostly the first term
    k·u·r₀/2: in float32 0.45% for a 784×512 Gaussian matrix (r₀ ≈ 160), 0.19% for a
    trained MNIST layer of that shape (r₀ ≈ 74), 1% for a 1000×1000 Gaussian one; ~10⁻¹³
    in float64. For large unstructured float32 matrices, pass them as float64 for a tighter
    certificate. This assumes IEEE float32/float64 matmuls (CPU; GPU at HIGHEST precision;
    TPUs emulate float32 with bfloat16 passes). bfloat16 and float16 inputs are computed in
    float32.

    Args:
        w: the weight, of any shape (not empty).
        iterations: number T ≥ 0 of Gram products (static).

    Returns:
        A scalar ≥ σ_max(w) in ``w``'s floating dtype (at least float32); exactly 0 for a
        zero ``w``, with a finite (zero) gradient there. XLA flushes subnormal numbers to
        zero (CPU, GPU): subnormal entries count as 0, and so does a result below the
        smallest normal number.

    Examples:
      Never below the exact value, and close to it:

      >>> import jax.numpy as jnp
      >>> from jaxsens.linalg import spectral_norm_bound
      >>> s = float(spectral_norm_bound(jnp.diag(jnp.array([3.0, 1.0]))))
      >>> 3.0 <= s < 3.001
      True
    """
    _check_iterations(iterations)
    iterations = int(iterations)
    w = jnp.asarray(w)
    dtype = jnp.promote_types(w.dtype, jnp.float32)
    m = _as_matrix(w).astype(dtype)
    if m.size == 0:
        raise ValueError(f"spectral_norm_bound of an empty array of shape {w.shape}")
    if m.shape[0] < m.shape[1]:
        m = m.T  # same singular values; now WᵀW is the smaller Gram matrix
    rows, cols = m.shape
    u = _unit_roundoff(dtype)

    # A zero matrix would give 0 · (1/0) in the gradient of the square roots: run the
    # iteration on ones instead and select 0 at the end (the where also zeroes the
    # cotangent flowing back to w).
    nonzero = jnp.any(m != 0)
    m = jnp.where(nonzero, m, jnp.ones_like(m))

    # X₀ = W·2^(−a₀) has max |entry| ∈ [1/2, 1): ‖X₀‖_F ≤ √(rows·cols), no overflow. Entries
    # (and, below, products) under 2^−126 flush to 0 (float32; 2^−1022 in float64): with
    # ‖X_t‖_F ≥ 1/2, σ₁(X_t)² ≥ 1/(4k) while a Gram product loses ≤ k²·2^−126 in ‖·‖_F, a
    # relative 4k³·2^−126 ≪ u: inside the margin of _SCALAR_SLACK.
    a0 = _exponent(jnp.max(jnp.abs(m)))
    x = _scale_down(m, a0)
    fro_x = _frobenius(x)

    def step(carry, _):
        x, fro_x = carry
        y = _gram(x)
        fro_y = _frobenius(y)
        # ‖Ŷ‖_F ≈ ‖XᵀX‖_F ≥ ‖X‖_F²/√k > 0 (Cauchy–Schwarz on the eigenvalues of XᵀX),
        # so the exponent is a small negative integer and ‖X_{t+1}‖_F ∈ [1/2, 1).
        a = _exponent(fro_y)
        return (_scale_down(y, a), _scale_down(fro_y, a)), (a, fro_x)

    # (exponent a_{t+1}, computed ‖X_t‖_F, c_t) for t = 0..T−1, where
    # c_t·(computed ‖X_t‖_F)² ≥ γ_k‖X_t‖_F². The first product sums over the long side
    # (k = rows), the next ones over the Gram side (k = cols).
    def coefficient(k, shape):
        return _round_up(_gamma(k, dtype) * _frobenius_cover(shape, dtype) ** 2, dtype)

    records = []
    if iterations >= 1:
        first = coefficient(rows, (rows, cols))
        (x, fro_x), (a, fro_prev) = step((x, fro_x), None)
        records.append((a[None], fro_prev[None], np.full(1, first, dtype)))
    if iterations >= 2:
        later = coefficient(cols, (cols, cols))
        (x, fro_x), (a, fro_prev) = lax.scan(step, (x, fro_x), length=iterations - 1)
        records.append((a, fro_prev, np.full(iterations - 1, later, dtype)))

    s = fro_x * _round_up(_frobenius_cover((x.shape[0], x.shape[1]), dtype), dtype)  # S_T ≥ ‖X_T‖_F
    if records:
        exps, fros, coefficients = (jnp.concatenate(r) for r in zip(*records, strict=True))

        def back(s, rec):
            a, fro, c = rec
            return jnp.sqrt(_scale_down(s, -a) + c * (fro * fro)), None

        s, _ = lax.scan(back, s, (exps, fros, coefficients), reverse=True)
    bound = _scale_down(s * _round_up(1 + _SCALAR_SLACK * u, dtype), -a0)
    return jnp.where(nonzero, bound, jnp.zeros_like(bound))


def conv_operator_norm_bound(kernel: jax.Array, *,
                             iterations: int = DEFAULT_ITERATIONS) -> jax.Array:
    """Upper bound on the ℓ2 operator norm of a stride-1 'SAME' 2-D convolution.

    conv(h)(p) = Σ_o K_oᵀ h(p + o) is a sum of zero-padded shifts (contractions) times
    channel maps, so ‖conv‖ ≤ Σ_o ‖K_o‖₂; and conv(h)(p) = K_rᵀ patch(p) with every
    entry of h in at most kh·kw patches, so ‖conv‖ ≤ √(kh·kw) ‖K_r‖₂ (K_r the kernel as a
    (kh·kw·cin, cout) matrix). Both hold for any input size and padding that only adds
    zeros. Each ‖·‖₂ is replaced by :func:`spectral_norm_bound`, and the smaller of the
    two bounds is returned.

    Args:
        kernel: a Flax kernel of shape (kh, kw, cin, cout).
        iterations: Gram products of each :func:`spectral_norm_bound` (static).

    Returns:
        A scalar ≥ the operator norm, in the kernel's floating dtype (at least float32).
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 4:
        raise ValueError(f"expected a (kh, kw, cin, cout) kernel, got shape {kernel.shape}")
    kh, kw, cin, cout = kernel.shape
    taps = kh * kw
    norm = functools.partial(spectral_norm_bound, iterations=iterations)
    per_offset = jax.vmap(norm)(kernel.reshape(taps, cin, cout))
    dtype = per_offset.dtype
    u = _unit_roundoff(dtype)
    # A computed sum of `taps` non-negative terms is ≥ (1 − γ_(taps−1))·the exact sum, and
    # each product below rounds by u: the constants undo both.
    sum_bound = jnp.sum(per_offset) * _round_up(
        (1 + 2 * u) / (1 - _gamma(taps - 1, dtype)), dtype)
    reshaped = norm(kernel.reshape(-1, cout)) * _round_up(math.sqrt(taps) * (1 + 2 * u), dtype)
    return jnp.minimum(sum_bound, reshaped)
