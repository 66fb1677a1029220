"""Gram-iteration bounds (``jaxsens.linalg``) against exact SVDs.

A bound must never fall below the exact value — the SVD in float64 of the values actually
stored, also for float32 inputs, with no tolerance — and must be within 1% of it at the
default number of iterations on random and trained-like matrices (except spectra that are
flat up to the top, where the excess is the known rank^(1/2^(T+1))). Everything runs under
``jax.jit``; batches of same-shaped matrices go through ``jax.vmap`` (one compile a shape).
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxsens import linalg

TIGHT = 0.01  # bound / σ_max − 1 allowed at DEFAULT_ITERATIONS
DTYPES = ("float64", "float32")


def _precision(dtype):
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


@functools.cache
def _bound_fn(iterations=linalg.DEFAULT_ITERATIONS, batched=False):
    f = functools.partial(linalg.spectral_norm_bound, iterations=iterations)
    return jax.jit(jax.vmap(f) if batched else f)


def _exact(w):
    """σ_max of the stored values, in float64, as the package views weights."""
    m = np.asarray(w, np.float64)
    m = m.reshape(1, -1) if m.ndim <= 1 else m.reshape(-1, m.shape[-1])
    return np.linalg.norm(m, 2)


def _low_rank(rng, shape, rank):
    return rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))


# (id, shape, maker(rng)); three draws of each go through one vmapped call.
RANDOM_CASES = [
    ("square", (48, 48), lambda r: r.standard_normal((48, 48))),
    ("tall", (120, 24), lambda r: r.standard_normal((120, 24))),
    ("wide", (24, 120), lambda r: r.standard_normal((24, 120))),
    ("one-row", (1, 40), lambda r: r.standard_normal((1, 40))),
    ("vector", (40,), lambda r: r.standard_normal(40)),
    ("conv-kernel", (3, 3, 4, 8), lambda r: r.standard_normal((3, 3, 4, 8))),
    ("rank-1", (30, 20), lambda r: _low_rank(r, (30, 20), 1)),
    ("rank-4", (50, 30), lambda r: _low_rank(r, (50, 30), 4)),
    ("spiked", (64, 32), lambda r: r.standard_normal((64, 32)) + 3 * _low_rank(r, (64, 32), 1)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "make"), [c[1:] for c in RANDOM_CASES],
                         ids=[c[0] for c in RANDOM_CASES])
def test_bound_is_above_and_within_one_percent(dtype, shape, make):
    rng = np.random.default_rng(7)
    with _precision(dtype):
        ws = jnp.asarray(np.stack([make(rng) for _ in range(3)]), dtype)
        assert ws.shape == (3, *shape)
        out = _bound_fn(batched=True)(ws)
    assert out.dtype == jnp.dtype(dtype) and out.shape == (3,)
    got = np.asarray(out, np.float64)
    exact = np.array([_exact(w) for w in ws])
    assert np.all(got >= exact), got / exact - 1
    assert np.all(got <= exact * (1 + TIGHT)), got / exact - 1


@pytest.mark.parametrize("shape", [(256, 256), (512, 512), (784, 512), (512, 10)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_gaussian_sizes_the_default_was_chosen_on(shape):
    """Measured bound/σ − 1 at 7 products: ≤ 0.50% in float32, ≤ 0.12% in float64 (whose
    rounding cover, ~10⁻¹³, cannot matter: the float64 runs are left to smaller shapes)."""
    w = jnp.asarray(np.random.default_rng(3).standard_normal(shape) / np.sqrt(shape[0]),
                    jnp.float32)
    got = float(_bound_fn()(w))
    exact = _exact(w)
    assert exact <= got <= exact * (1 + TIGHT)


@functools.cache
def _trained_mlp_kernels(steps=300, lr=0.2):
    """Kernels of a 16→64→64→4 tanh MLP after plain full-batch gradient descent.

    Teacher–student regression on synthetic data: the student's layers grow a few
    dominant directions on top of their random initialisation, like trained layers.
    """
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((512, 16)), jnp.float32)
    teacher = rng.standard_normal((16, 3)) @ rng.standard_normal((3, 4))
    y = jnp.tanh(x @ jnp.asarray(teacher, jnp.float32))
    sizes = (16, 64, 64, 4)
    params = [jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32)
              for a, b in zip(sizes[:-1], sizes[1:], strict=True)]

    def loss(ps):
        h = x
        for i, k in enumerate(ps):
            h = h @ k if i == len(ps) - 1 else jnp.tanh(h @ k)
        return jnp.mean((h - y) ** 2)

    @jax.jit
    def train(ps):
        def step(ps, _):
            g = jax.grad(loss)(ps)
            return [p - lr * d for p, d in zip(ps, g, strict=True)], None

        return jax.lax.scan(step, ps, length=steps)[0], loss(ps)

    trained, initial_loss = train(params)
    assert float(loss(trained)) < 0.2 * float(initial_loss)  # it did learn
    return tuple(np.asarray(k, np.float64) for k in trained)


def _decaying_with_spike(shape, seed=5):
    """Singular values i^(−1/2) (i = 1..k) plus a rank-2 spike of norm ~3: trained-like."""
    rng = np.random.default_rng(seed)
    k = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], k)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], k)))
    spike = _low_rank(rng, shape, 2) * 3 / np.sqrt(shape[0] * shape[1])
    return (u * np.arange(1, k + 1) ** -0.5) @ v.T + spike


@pytest.mark.parametrize("dtype", DTYPES)
def test_trained_like_layers(dtype):
    layers = [*_trained_mlp_kernels(), _decaying_with_spike((128, 96))]
    for w in layers:
        with _precision(dtype):
            w = jnp.asarray(w, dtype)
            got = float(_bound_fn()(w))
        exact = _exact(w)
        assert exact <= got <= exact * (1 + TIGHT), (w.shape, got / exact - 1)


@pytest.mark.parametrize("value", [1 / 3, 0.51])
def test_rounding_cover_holds_on_constant_float32_matrices(value):
    """Equal entries make the summation errors systematic (~k·u, not ~√k·u): with a cover
    built on the probabilistic 10·√k·u the result falls 2–5·10⁻⁵ below σ_max here, with no
    cover 6–8·10⁻⁵ below."""
    w = jnp.full((16384, 2), value, jnp.float32)
    exact = float(np.float32(value)) * np.sqrt(w.size)  # rank 1: σ = |c|·√(m·n)
    got = float(_bound_fn()(w))
    assert exact <= got <= exact * (1 + TIGHT)


def test_matches_the_spectrum_lp_norm_and_decreases_to_sigma_max(x64):
    """In exact arithmetic the bound is (Σσᵢ^p)^(1/p), p = 2^(T+1): weakly decreasing in T."""
    w = jnp.asarray(np.random.default_rng(2).standard_normal((40, 30)))
    s = np.linalg.svd(np.asarray(w), compute_uv=False)
    bounds = []
    for t in (0, 1, 2, 3, 4, 6, 10):
        got = float(_bound_fn(t)(w))
        p = 2.0 ** (t + 1)
        lp = s[0] * np.sum((s / s[0]) ** p) ** (1 / p)
        np.testing.assert_allclose(got, lp, rtol=1e-12)
        assert got >= s[0]
        bounds.append(got)
    assert bounds[0] == pytest.approx(np.linalg.norm(np.asarray(w)), rel=1e-13)  # T=0: ‖W‖_F
    steps = np.diff(bounds)
    assert np.all(steps[:4] < -1e-6 * s[0])  # visibly tighter with every early product
    assert np.all(steps <= 1e-13 * s[0])  # never looser (up to the rounding allowance)
    assert bounds[-1] / s[0] - 1 < 1e-11  # converged to σ_max


def test_flat_spectrum_excess_is_rank_root(x64):
    """All σᵢ equal: the excess is exactly rank^(1/2^(T+1)), the worst case of the method."""
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((20, 20)))
    t = linalg.DEFAULT_ITERATIONS
    got = float(_bound_fn()(jnp.asarray(3 * q)))
    assert got / 3 == pytest.approx(20 ** (1 / 2 ** (t + 1)), rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_matrix_gives_zero_and_finite_gradient(dtype):
    value_and_grad = jax.value_and_grad(linalg.spectral_norm_bound)
    with _precision(dtype):
        value, grad = jax.jit(value_and_grad)(jnp.zeros((2, 2, 3), dtype))
        # batched with a non-zero member, which the zero one must not spoil
        w = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 3)), dtype)
        values, grads = jax.jit(jax.vmap(value_and_grad))(jnp.stack([jnp.zeros_like(w), w]))
    assert float(value) == 0.0 and grad.shape == (2, 2, 3) and np.all(np.asarray(grad) == 0)
    assert float(values[0]) == 0.0 and float(values[1]) >= _exact(w)
    assert grads.shape == (2, 2, 2, 3) and np.all(np.isfinite(np.asarray(grads)))
    assert np.all(np.asarray(grads[0]) == 0) and np.any(np.asarray(grads[1]) != 0)


@pytest.mark.parametrize(("dtype", "log2_scales", "decimal_scales"), [
    ("float64", (100, -100, 900, -900), (1e30, 1e-30, 1e300, 1e-300)),
    ("float32", (60, -60, 100, -100), (1e18, 1e-18, 1e-30)),
])
def test_huge_and_tiny_scales_neither_overflow_nor_underflow(dtype, log2_scales,
                                                            decimal_scales):
    """Without rescaling, (1e30)^(2^T) overflows float64 at T = 4 (1e18 float32 at T = 2)."""
    g = np.random.default_rng(8).standard_normal((16, 12))
    g = np.where(np.abs(g) < 0.05, 0.05, g)  # no entry pushed to subnormals by 2^-100
    with _precision(dtype):
        f = _bound_fn()
        base = float(f(jnp.asarray(g, dtype)))
        exact_g = _exact(jnp.asarray(g, dtype))
        for k in log2_scales:  # power-of-two scales are exact: so must the bound scale
            got = float(f(jnp.asarray(g, dtype) * 2.0 ** k))
            assert got == base * 2.0 ** k
            assert got >= exact_g * 2.0 ** k
        for c in decimal_scales:
            w = jnp.asarray(g * c, dtype)
            got = float(f(w))
            k = int(np.round(np.log2(c)))  # exact σ of the stored values, computed at scale 1
            exact = _exact(np.asarray(w, np.float64) * 2.0 ** -k) * 2.0 ** k
            assert np.isfinite(got) and exact <= got <= exact * (1 + TIGHT), (c, got / exact)


def test_gradients(x64):
    """check_grads, and at convergence the gradient is u₁v₁ᵀ (simple top singular value)."""
    w = jnp.asarray(np.random.default_rng(9).standard_normal((6, 4)))
    s = np.linalg.svd(np.asarray(w), compute_uv=False)
    assert s[0] > 1.2 * s[1]  # simple top singular value: the bound is smooth there
    check_grads(_bound_fn(), (w,), order=1, modes=("rev",))
    u, _, vt = np.linalg.svd(np.asarray(w))
    grad = jax.jit(jax.grad(functools.partial(linalg.spectral_norm_bound, iterations=12)))(w)
    np.testing.assert_allclose(grad, np.outer(u[:, 0], vt[0]), atol=1e-9)


def test_vmap_matches_single_calls(x64):
    ws = jnp.asarray(np.random.default_rng(10).standard_normal((4, 9, 5)))
    batched = _bound_fn(batched=True)(ws)
    single = jnp.stack([_bound_fn()(w) for w in ws])
    np.testing.assert_allclose(batched, single, rtol=1e-14)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="iterations"):
        linalg.spectral_norm_bound(jnp.ones((2, 2)), iterations=-1)
    with pytest.raises(ValueError, match="iterations"):
        linalg.spectral_norm_bound(jnp.ones((2, 2)), iterations=2.0)
    with pytest.raises(ValueError, match="empty"):
        linalg.spectral_norm_bound(jnp.ones((0, 3)))
    with pytest.raises(ValueError, match="kernel"):
        linalg.conv_operator_norm_bound(jnp.ones((3, 3, 2)))


def test_half_precision_inputs_are_bounded_in_float32():
    w = jnp.asarray(np.random.default_rng(12).standard_normal((24, 16)), jnp.bfloat16)
    got = _bound_fn()(w)
    exact = _exact(w.astype(jnp.float32))  # bfloat16 → float32 is exact
    assert got.dtype == jnp.float32 and exact <= float(got) <= exact * (1 + TIGHT)


# ---------------------------------------------------------------- convolution ---------------

GRID = 6  # the dense conv matrix acts on a GRID×GRID×cin input


def _dense_conv_matrix(kernel):
    """The 'SAME' stride-1 convolution on a GRID×GRID input as a dense float64 matrix."""
    kh, kw, cin, cout = kernel.shape
    k = jnp.asarray(kernel, jnp.float64)

    def conv(h):
        return jax.lax.conv_general_dilated(h[None], k, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]

    jac = jax.jacfwd(conv)(jnp.zeros((GRID, GRID, cin), jnp.float64))
    return np.asarray(jac).reshape(GRID * GRID * cout, GRID * GRID * cin)


def _exact_conv_bounds(kernel):
    """min(Σ_o ‖K_o‖₂, √(kh·kw)‖K_r‖₂) with exact float64 SVDs."""
    k = np.asarray(kernel, np.float64)
    kh, kw, cin, cout = k.shape
    per_offset = sum(np.linalg.norm(m, 2) for m in k.reshape(kh * kw, cin, cout))
    return min(per_offset, np.sqrt(kh * kw) * np.linalg.norm(k.reshape(-1, cout), 2))


def _conv_kernels():
    rng = np.random.default_rng(13)
    random = [rng.standard_normal((3, 3, 2, 3)) for _ in range(4)]
    centre = np.zeros((3, 3, 2, 3))
    centre[1, 1] = rng.standard_normal((2, 3))  # conv = pointwise channel map: bound is exact
    same = np.broadcast_to(rng.standard_normal((2, 3)), (3, 3, 2, 3))  # both bounds equal
    return np.stack([*random, centre, same])


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_bound_is_above_the_exact_operator_norm(dtype):
    kernels = _conv_kernels()
    with _precision(dtype):
        ks = jnp.asarray(kernels, dtype)
        got = np.asarray(jax.jit(jax.vmap(linalg.conv_operator_norm_bound))(ks), np.float64)
    with jax.enable_x64(True):
        exact = np.array([np.linalg.norm(_dense_conv_matrix(np.asarray(k, np.float64)), 2)
                          for k in ks])
    two_bounds = np.array([_exact_conv_bounds(np.asarray(k, np.float64)) for k in ks])
    assert np.all(got >= exact), got / exact - 1
    assert np.all(got >= two_bounds), got / two_bounds - 1
    assert np.all(got <= two_bounds * (1 + TIGHT))
    # the pointwise kernel: the per-offset sum is exact, so bound ≈ exact norm
    assert got[4] / exact[4] - 1 < (1e-12 if dtype == "float64" else 1e-5)


def test_conv_bound_converges_to_the_exact_svd_bounds(x64):
    kernels = _conv_kernels()
    f = jax.jit(jax.vmap(functools.partial(linalg.conv_operator_norm_bound, iterations=12)))
    got = np.asarray(f(jnp.asarray(kernels)))
    want = np.array([_exact_conv_bounds(k) for k in kernels])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # each branch of the min is the smaller one for some kernel
    per_offset = np.array([sum(np.linalg.norm(m, 2) for m in k.reshape(9, 2, 3))
                           for k in kernels])
    reshaped = np.array([3 * np.linalg.norm(k.reshape(-1, 3), 2) for k in kernels])
    assert np.any(per_offset < reshaped) and np.any(per_offset > reshaped)
