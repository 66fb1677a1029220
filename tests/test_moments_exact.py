"""Exact ReLU moments under Gaussian input: Owen's T, Phi2, cross moments, Affine-ReLU-Affine.

Deterministic references come from scipy (``scipy.special.owens_t``; ``scipy.integrate.quad``
of independent one-dimensional integral representations). ``scipy.stats.multivariate_normal``
is not used as a reference: its CDF is a randomized quasi-Monte Carlo estimate with absolute
tolerance 1e-5 by default, far coarser than the 1e-12 checked here. Monte Carlo comparisons
use a tolerance set by the sample count: ``z`` standard errors of the sample mean.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import integrate, special

import jaxsens.moments as jm

# Absolute accuracy required of Owen's T and Phi2 in float64. scipy.special.owens_t
# (Patefield-Tandy) is accurate to a few ulps and the quad references report error
# estimates below 1e-14 on these grids, so 1e-12 measures this implementation.
TOL_F64 = 1e-12


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _assert_mc_close(samples, exact, z=3.0):
    """|mean(samples) - exact| < z standard errors, per column."""
    samples = np.asarray(samples, np.float64)
    est = samples.mean(axis=0)
    stderr = samples.std(axis=0, ddof=1) / math.sqrt(samples.shape[0])
    np.testing.assert_array_less(np.abs(est - np.asarray(exact)), z * stderr)


# ------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------


def _bvn_reference(h, k, rho):
    """Phi2 by the Drezner-Wesolowsky / Genz angle integral, integrated with scipy quad:
    Phi2 = Phi(h) Phi(k) + 1/(2 pi) int_0^asin(rho) exp(-(h^2 + k^2 - 2 h k sin t) /
    (2 cos^2 t)) dt. The exponent is rewritten as (h - k)^2 / (2 cos^2 t) + h k / (1 + sin t)
    for rho > 0 and (h + k)^2 / (2 cos^2 t) - h k / (1 - sin t) for rho < 0, so that it does
    not cancel as t -> +-pi/2."""
    if rho >= 1:
        return special.ndtr(min(h, k))
    if rho <= -1:
        return max(0.0, special.ndtr(h) - special.ndtr(-k))

    def f(t):
        s, c2 = math.sin(t), math.cos(t) ** 2
        if rho > 0:
            return math.exp(-((h - k) ** 2) / (2 * c2) - h * k / (1 + s))
        return math.exp(-((h + k) ** 2) / (2 * c2) + h * k / (1 - s))

    val, _ = integrate.quad(f, 0.0, math.asin(rho), epsabs=1e-15, epsrel=1e-13, limit=200)
    return special.ndtr(h) * special.ndtr(k) + val / (2 * math.pi)


def _bvn_owen_scipy(h, k, rho):
    """Owen's reduction evaluated with scipy.special.owens_t (for h, k != 0, |rho| < 1)."""
    rb = math.sqrt(1 - rho * rho)
    beta = 0.0 if h * k > 0 else 0.5
    return (
        0.5 * special.ndtr(h)
        + 0.5 * special.ndtr(k)
        - special.owens_t(h, (k - rho * h) / (h * rb))
        - special.owens_t(k, (h - rho * k) / (k * rb))
        - beta
    )


def _relu_mean_np(m, s):
    if s == 0:
        return max(m, 0.0)
    return m * special.ndtr(m / s) + s * math.exp(-0.5 * (m / s) ** 2) / math.sqrt(2 * math.pi)


def _cross_moment_quad(mu_i, mu_j, s_i, s_j, rho):
    """E[relu(u_i) relu(u_j)] = int_{z > -mu_j/s_j} (mu_j + s_j z) E[relu(u_i) | z] phi(z) dz,
    u_i | z ~ N(mu_i + rho s_i z, s_i^2 (1 - rho^2)); one quad per pair."""
    rb = math.sqrt(max(0.0, 1 - rho * rho))
    lo = -mu_j / s_j

    def f(z):
        return (
            (mu_j + s_j * z)
            * _relu_mean_np(mu_i + rho * s_i * z, s_i * rb)
            * math.exp(-0.5 * z * z)
            / math.sqrt(2 * math.pi)
        )

    # With rho_bar = 0, E[relu(u_i) | z] = relu(mu_i + rho s_i z) has a kink: split there.
    kinks = [-mu_i / (rho * s_i)] if (rb == 0 and rho * s_i != 0) else []
    edges = [lo, *sorted(z for z in kinks if z > lo), math.inf]
    return sum(
        integrate.quad(f, a, b, epsabs=1e-14, epsrel=1e-13, limit=200)[0]
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    )


# ------------------------------------------------------------------------------------------
# Univariate moments
# ------------------------------------------------------------------------------------------

UNIVARIATE_CASES = [(0.5, 1.0), (-1.0, 0.7), (2.0, 0.3), (-0.3, 2.0), (0.0, 1.0), (-2.5, 1.0)]


@pytest.mark.parametrize(("mu", "sigma"), UNIVARIATE_CASES)
def test_relu_mean_and_second_moment_match_monte_carlo(x64, mu, sigma):
    y = mu + sigma * jax.random.normal(jax.random.key(0), (400_000,), jnp.float64)
    r = jax.nn.relu(y)
    _assert_mc_close(r, jm.relu_mean(mu, sigma))
    _assert_mc_close(r * r, jm.relu_second_moment(mu, sigma))


@pytest.mark.parametrize("mu", [-1.5, 0.0, 2.0])
def test_relu_moments_sigma_zero_limits_exact_with_finite_grads(x64, mu):
    assert float(jm.relu_mean(mu, 0.0)) == max(mu, 0.0)
    assert float(jm.relu_second_moment(mu, 0.0)) == (mu * mu if mu > 0 else 0.0)
    for fn in (jm.relu_mean, jm.relu_second_moment):
        g_mu, g_sigma = jax.grad(fn, argnums=(0, 1))(mu, 0.0)
        assert np.isfinite(g_mu) and np.isfinite(g_sigma)


def test_relu_moments_continuous_as_sigma_vanishes(x64):
    # |mu| / sigma >= 700: Phi and phi saturate in float64, so E relu = relu(mu) exactly and
    # E relu^2 = (mu^2 + sigma^2) [mu > 0]; the gradient must stay finite down to 1e-300.
    sigmas = jnp.array([1e-3, 1e-8, 1e-30, 1e-300])
    for mu in (-0.7, 0.7):
        second = (mu * mu + sigmas * sigmas) * (mu > 0)
        np.testing.assert_array_equal(jm.relu_mean(mu, sigmas), max(mu, 0.0))
        np.testing.assert_allclose(jm.relu_second_moment(mu, sigmas), second, rtol=1e-15)
        grad_sigma = jax.vmap(jax.grad(jm.relu_mean, argnums=1), (None, 0))(mu, sigmas)
        assert np.all(np.isfinite(grad_sigma))


# ------------------------------------------------------------------------------------------
# Owen's T and Phi2
# ------------------------------------------------------------------------------------------


def test_owens_t_matches_scipy_on_edge_grid(x64):
    hs = [0.0, 0.3, -0.3, 1.0, -1.0, 2.5, -2.5, 8.0, -8.0, 15.0, 40.0]
    a_s = [0.0, 1e-8, -1e-8, 0.3, -0.3, 1.0, -1.0, 1.5, -1.5, 10.0, -10.0, 1e6, -1e6, np.inf]
    h, a = (g.ravel() for g in np.meshgrid(hs, a_s, indexing="ij"))
    got = np.asarray(jm.owens_t(h, a))
    np.testing.assert_allclose(got, special.owens_t(h, a), rtol=0, atol=TOL_F64)


def test_owens_t_matches_scipy_random(x64):
    rng = np.random.default_rng(1)
    h = rng.uniform(-10, 10, 20_000)
    a = np.tan(rng.uniform(-np.pi / 2, np.pi / 2, 20_000))
    got = np.asarray(jax.jit(jm.owens_t)(h, a))
    np.testing.assert_allclose(got, special.owens_t(h, a), rtol=0, atol=TOL_F64)


def test_owens_t_float32_close_to_scipy():
    rng = np.random.default_rng(2)
    h = rng.uniform(-6, 6, 5_000).astype(np.float32)
    a = np.tan(rng.uniform(-1.5, 1.5, 5_000)).astype(np.float32)
    got = jm.owens_t(h, a)
    assert got.dtype == jnp.float32
    # |T| <= 1/4 and float32 eps = 1.2e-7: allow a few ulps of 1/4 plus argument rounding.
    np.testing.assert_allclose(
        np.asarray(got), special.owens_t(h.astype(np.float64), a.astype(np.float64)), atol=1e-6
    )


BVN_VALUES = [-8.0, -2.5, -1.0, -0.3, 0.0, 0.3, 1.0, 2.5, 8.0]
BVN_RHOS = [-1.0, -0.999999, -0.9, -0.5, 0.0, 0.5, 0.9, 0.999999, 1.0]


@pytest.mark.parametrize("rho", BVN_RHOS)
def test_bivariate_normal_cdf_matches_scipy_quadrature(x64, rho):
    h, k = (g.ravel() for g in np.meshgrid(BVN_VALUES, BVN_VALUES, indexing="ij"))
    ref = np.array([_bvn_reference(a, b, rho) for a, b in zip(h, k, strict=True)])
    got = np.asarray(jm.bivariate_normal_cdf(h, k, rho))
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL_F64)


def test_bivariate_normal_cdf_matches_scipy_owens_t_random(x64):
    rng = np.random.default_rng(3)
    h, k = rng.normal(size=(2, 5_000)) * 3
    rho = rng.uniform(-1, 1, 5_000)
    ref = np.array([_bvn_owen_scipy(*t) for t in zip(h, k, rho, strict=True)])
    got = np.asarray(jax.jit(jm.bivariate_normal_cdf)(h, k, rho))
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL_F64)


def test_bivariate_normal_cdf_closed_forms(x64):
    rho = jnp.array([-1.0, -0.9999999, -0.4, 0.0, 0.6, 0.9999999, 1.0])
    np.testing.assert_allclose(
        jm.bivariate_normal_cdf(0.0, 0.0, rho), 0.25 + np.arcsin(rho) / (2 * np.pi), atol=1e-15
    )
    h, k = 0.7, -0.4
    np.testing.assert_allclose(
        jm.bivariate_normal_cdf(h, k, 0.0), special.ndtr(h) * special.ndtr(k), atol=1e-15
    )
    assert float(jm.bivariate_normal_cdf(h, k, 1.0)) == special.ndtr(k)
    # A few ulps: the two sides round Phi(h) + Phi(k) - 1 differently.
    assert float(jm.bivariate_normal_cdf(h, k, -1.0)) == pytest.approx(
        special.ndtr(h) + special.ndtr(k) - 1, abs=1e-15
    )
    assert float(jm.bivariate_normal_cdf(-h, k, -1.0)) == 0.0
    assert float(jm.bivariate_normal_cdf(np.inf, k, 0.3)) == pytest.approx(
        special.ndtr(k), abs=1e-16
    )
    assert float(jm.bivariate_normal_cdf(-np.inf, k, 0.3)) == 0.0


@pytest.mark.parametrize(
    ("h", "k", "rho"),
    [(0.3, -0.7, 0.4), (-1.2, 0.5, -0.8), (1.5, 1.1, 0.95), (0.0, 0.6, 0.2), (-2.0, -1.0, 0.0)],
)
def test_bivariate_normal_cdf_grads(x64, h, k, rho):
    check_grads(jm.bivariate_normal_cdf, (h, k, rho), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize(("h", "a"), [(0.4, 0.7), (-1.3, 2.5), (2.0, -0.3), (0.0, 1.7)])
def test_owens_t_grads(x64, h, a):
    check_grads(jm.owens_t, (h, a), order=1, modes=("fwd", "rev"))


def test_bivariate_normal_cdf_grads_finite_at_unit_correlation(x64):
    for rho in (-1.0, 1.0):
        grads = jax.grad(jm.bivariate_normal_cdf, argnums=(0, 1, 2))(0.3, 0.3, rho)
        assert all(np.isfinite(g) for g in grads)


# ------------------------------------------------------------------------------------------
# Cross moments
# ------------------------------------------------------------------------------------------

CROSS_CASES = [
    (0.3, -0.5, 1.0, 0.7, 0.6),
    (-1.0, -0.8, 0.5, 1.2, -0.4),
    (1.5, 2.0, 0.4, 0.9, 0.95),
    (0.0, 0.0, 1.0, 2.0, 0.3),
    (0.5, -0.2, 1.0, 1.0, 1.0),
    (0.5, 0.4, 1.0, 1.3, -1.0),
    (0.7, -0.3, 0.0, 1.0, 0.0),
]


def _correlated_pair(key, mu_i, mu_j, s_i, s_j, rho, n):
    z1, z2 = jax.random.normal(key, (2, n), jnp.float64)
    w = rho * z1 + math.sqrt(max(0.0, 1 - rho * rho)) * z2
    return mu_i + s_i * z1, mu_j + s_j * w


@pytest.mark.parametrize("case", CROSS_CASES)
def test_relu_cross_moment_matches_monte_carlo(x64, case):
    u_i, u_j = _correlated_pair(jax.random.key(4), *case, 400_000)
    _assert_mc_close(jax.nn.relu(u_i) * jax.nn.relu(u_j), jm.relu_cross_moment(*case))


@pytest.mark.parametrize("case", CROSS_CASES)
def test_relu_cross_moment_matches_scipy_quadrature(x64, case):
    # The quad reference is asked for epsrel = 1e-13; 1e-12 leaves it a factor of 10.
    np.testing.assert_allclose(
        float(jm.relu_cross_moment(*case)), _cross_moment_quad(*case), rtol=1e-12, atol=1e-15
    )


def test_zero_mean_formula_is_the_general_one_at_zero_mean(x64):
    s_i, s_j, rho = (
        g.ravel()
        for g in np.meshgrid([0.1, 1.0, 3.0], [0.5, 2.0], np.linspace(-1, 1, 21), indexing="ij")
    )
    general = jm.relu_cross_moment(0.0, 0.0, s_i, s_j, rho)
    np.testing.assert_allclose(jm.relu_cross_moment_zero_mean(s_i, s_j, rho), general, atol=1e-10)


def test_zero_mean_formula_is_wrong_away_from_zero_mean(x64):
    case = (-1.0, -1.0, 1.0, 1.0, 0.5)
    exact = float(jm.relu_cross_moment(*case))
    u_i, u_j = _correlated_pair(jax.random.key(5), *case, 400_000)
    _assert_mc_close(jax.nn.relu(u_i) * jax.nn.relu(u_j), exact)
    zero_mean = float(jm.relu_cross_moment_zero_mean(1.0, 1.0, 0.5))
    assert abs(zero_mean - exact) / exact > 0.10


@pytest.mark.parametrize(
    "case", [(0.3, -0.5, 1.0, 0.7, 0.6), (-1.0, 0.4, 0.5, 1.2, -0.4), (1.5, 2.0, 0.4, 0.9, 0.95)]
)
def test_relu_cross_moment_grads(x64, case):
    check_grads(jm.relu_cross_moment, case, order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize(
    "case",
    [
        (0.3, -0.5, 1.0, 0.7, 1.0),
        (0.3, -0.5, 1.0, 0.7, -1.0),
        (0.3, -0.5, 0.0, 0.7, 0.5),
        (0.0, 0.5, 0.0, 0.0, 0.0),
    ],
)
def test_relu_cross_moment_grads_finite_at_degenerate_points(x64, case):
    grads = jax.grad(jm.relu_cross_moment, argnums=(0, 1, 2, 3, 4))(*case)
    assert all(np.isfinite(g) for g in grads)


# ------------------------------------------------------------------------------------------
# Affine-ReLU-Affine
# ------------------------------------------------------------------------------------------


def _network(key, n, p, d, dtype=jnp.float64):
    ks = jax.random.split(key, 6)
    A = jax.random.normal(ks[0], (p, n), dtype)
    c1 = 0.5 * jax.random.normal(ks[1], (p,), dtype)
    # Positive second layer: output means are well away from zero, so MC/analytic ratios
    # are informative, not noise over a near-zero denominator.
    B = jnp.abs(jax.random.normal(ks[2], (d, p), dtype)) + 0.5
    c2 = jnp.zeros((d,), dtype)
    mu = jax.random.normal(ks[3], (n,), dtype)
    L = jax.random.normal(ks[4], (n, n), dtype) / math.sqrt(n)
    return A, c1, B, c2, mu, L @ L.T + 0.1 * jnp.eye(n, dtype=dtype)


def _sample_outputs(key, A, c1, B, c2, mu, Sigma, n_samples):
    L = jnp.linalg.cholesky(Sigma)
    z = jax.random.normal(key, (n_samples, mu.shape[0]), mu.dtype)
    x = mu + z @ L.T
    return jax.nn.relu(x @ A.T + c1) @ B.T + c2


def test_affine_relu_affine_matches_monte_carlo_1e6(x64):
    net = _network(jax.random.key(6), 3, 3, 3)
    g = np.asarray(_sample_outputs(jax.random.key(7), *net, 1_000_000))
    exact = jm.affine_relu_affine(*net)
    mean, cov = np.asarray(exact.mean), np.asarray(exact.cov)

    # Ratios as in the authors' notebook (they report +-0.3%).
    np.testing.assert_allclose(g.mean(0) / mean, 1.0, atol=5e-3)
    np.testing.assert_allclose(g.var(0, ddof=1) / np.diag(cov), 1.0, atol=5e-3)

    # And within 4 standard errors, for the mean and every covariance entry.
    _assert_mc_close(g, mean, z=4.0)
    centred = g - mean
    products = (centred[:, :, None] * centred[:, None, :]).reshape(g.shape[0], -1)
    _assert_mc_close(products, cov.ravel(), z=4.0)


def test_affine_relu_affine_singular_input_covariance(x64):
    # Rank-1 input covariance makes the hidden pair (0, 1) perfectly correlated, and the zero
    # row of A gives a hidden unit with sigma = 0. Same shapes as the 1e6-sample test (one
    # compilation).
    A = jnp.array([[1.0, 0.5, -0.3], [-0.7, 0.2, 0.4], [0.0, 0.0, 0.0]])
    c1 = jnp.array([0.2, 0.4, 0.6])
    B = jnp.array([[1.0, 0.5, 0.7], [0.3, 1.2, 0.4], [0.6, 0.2, 0.9]])
    c2 = jnp.zeros(3)
    mu = jnp.array([0.3, -0.2, 0.5])
    v = jnp.array([1.0, -0.6, 0.3])
    Sigma = jnp.outer(v, v)
    exact = jm.affine_relu_affine(A, c1, B, c2, mu, Sigma)
    assert np.all(np.isfinite(exact.cov))
    z = jax.random.normal(jax.random.key(8), (400_000, 1), jnp.float64)
    x = mu + z * v
    g = np.asarray(jax.nn.relu(x @ A.T + c1) @ B.T + c2)
    _assert_mc_close(g, exact.mean, z=4.0)
    centred = g - np.asarray(exact.mean)
    products = (centred[:, :, None] * centred[:, None, :]).reshape(g.shape[0], -1)
    _assert_mc_close(products, np.asarray(exact.cov).ravel(), z=4.0)
    grads = jax.grad(lambda S: jm.affine_relu_affine(A, c1, B, c2, mu, S).cov.sum())(Sigma)
    assert np.all(np.isfinite(grads))


def test_zero_mean_cov_is_exact_only_at_zero_pre_activation_mean(x64):
    A, _, B, c2, mu, Sigma = _network(jax.random.key(9), 3, 3, 3)
    centred = jm.affine_relu_affine(A, -A @ mu, B, c2, mu, Sigma)
    centred_cvpr = jm.affine_relu_affine_zero_mean_cov(A, -A @ mu, B, c2, mu, Sigma)
    np.testing.assert_allclose(centred_cvpr.cov, centred.cov, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(centred_cvpr.mean, centred.mean, rtol=1e-12)

    c1 = jnp.full((3,), -1.5)  # mostly inactive units: the zero-mean formula overshoots
    exact = jm.affine_relu_affine(A, c1, B, c2, mu, Sigma)
    cvpr = jm.affine_relu_affine_zero_mean_cov(A, c1, B, c2, mu, Sigma)
    rel = np.abs(np.diag(cvpr.cov) - np.diag(exact.cov)) / np.diag(exact.cov)
    assert np.all(rel > 0.10)


def test_affine_relu_affine_grads(x64):
    A, c1, B, c2, mu, Sigma = _network(jax.random.key(10), 3, 3, 3)
    L = jnp.linalg.cholesky(Sigma)

    def flat(A, c1, B, c2, mu, L):
        out = jm.affine_relu_affine(A, c1, B, c2, mu, L @ L.T)
        return jnp.concatenate([out.mean, out.cov.ravel()])

    check_grads(flat, (A, c1, B, c2, mu, L), order=1, modes=("fwd", "rev"))


def test_relu_moments_vmap_matches_loop_and_jit_traces_once(x64):
    p, batch = 6, 4
    keys = jax.random.split(jax.random.key(11), 2)
    mus = jax.random.normal(keys[0], (batch, p), jnp.float64)
    M = jax.random.normal(keys[1], (p, p), jnp.float64)
    Sigma = M @ M.T / p

    traces = 0

    def counted(mu, S):
        nonlocal traces
        traces += 1
        return jm.relu_moments(mu, S)

    jitted = jax.jit(counted)
    looped = [jitted(mus[b], Sigma) for b in range(batch)]
    assert traces == 1
    batched = jax.jit(jax.vmap(jm.relu_moments, in_axes=(0, None)))(mus, Sigma)
    for b in range(batch):
        np.testing.assert_allclose(batched.mean[b], looped[b].mean, rtol=1e-13)
        np.testing.assert_allclose(batched.cov[b], looped[b].cov, rtol=1e-12, atol=1e-14)


def test_relu_moments_blocked_pairs_match_direct_cross_moments(x64):
    # p = 260 gives 33670 pairs, more than one block of relu_moments' pair loop.
    p = 260
    keys = jax.random.split(jax.random.key(13), 3)
    mu = jax.random.normal(keys[0], (p,), jnp.float64)
    M = jax.random.normal(keys[1], (p, 8), jnp.float64)
    Sigma = M @ M.T / 8 + 0.01 * jnp.eye(p)
    out = jm.relu_moments(mu, Sigma)
    sigma = jnp.sqrt(jnp.diag(Sigma))
    rho = Sigma / jnp.outer(sigma, sigma)
    direct = jm.relu_cross_moment(mu[:, None], mu[None, :], sigma[:, None], sigma[None, :], rho)
    expected = direct - jnp.outer(out.mean, out.mean)
    off = ~np.eye(p, dtype=bool)
    np.testing.assert_allclose(np.asarray(out.cov)[off], np.asarray(expected)[off], atol=1e-14)
    np.testing.assert_allclose(np.asarray(out.cov), np.asarray(out.cov).T, atol=0)


def test_float32_moderate_width_finite_and_close_to_float64():
    n, p, d = 16, 128, 10
    with jax.enable_x64(True):
        net64 = _network(jax.random.key(12), n, p, d)
        ref = jm.affine_relu_affine(*net64)
        ref_mean, ref_cov = np.asarray(ref.mean), np.asarray(ref.cov)
        net32 = [np.asarray(v, np.float32) for v in net64]
    out = jax.jit(jm.affine_relu_affine)(*net32)
    assert out.mean.dtype == jnp.float32 and out.cov.dtype == jnp.float32
    assert np.all(np.isfinite(out.mean)) and np.all(np.isfinite(out.cov))
    # Relative to the output scale. B C B^T sums p = 128 terms per entry, each carrying a
    # few float32 roundings (eps = 1.2e-7); random-walk growth gives ~sqrt(p) eps = 1.4e-6.
    # 1e-5 is that with a safety factor of 7 (measured: 6e-7).
    scale = np.abs(ref_cov).max()
    np.testing.assert_allclose(out.cov, ref_cov, atol=1e-5 * scale)
    np.testing.assert_allclose(out.mean, ref_mean, atol=1e-5 * np.abs(ref_mean).max())


@pytest.mark.parametrize("scale", [1e-3, 1e-6])
def test_relu_moments_no_cancellation_when_sigma_is_small(x64, scale):
    """Units far from the kink: Cov relu(u) equals Σ on always-active pairs, 0 elsewhere.

    With |μ|/σ ≥ 3e5 the ReLU is linear (active) or zero with probability 1 − e^{-4.5e10},
    so those are the exact values to float64 precision; the plain E[rr] − E r E r form
    loses ~eps·(μ/σ)² (here up to 1e-4 relative).
    """
    rng = np.random.default_rng(7)
    mu = jnp.asarray([1.0, 2.0, -0.5, 0.3, -1.5, 0.8])
    root = rng.standard_normal((6, 6))
    cov = jnp.asarray(root @ root.T / 6) * scale**2
    m = jm.relu_moments(mu, cov)
    act = np.asarray(mu) > 0
    expected = np.where(np.outer(act, act), np.asarray(cov), 0.0)
    np.testing.assert_allclose(np.asarray(m.cov), expected, rtol=0, atol=1e-12 * scale**2)
