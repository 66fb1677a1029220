"""Noise laws: every draw against its declared second moment E[ηηᵀ] and its stated norm.

Monte Carlo tolerances come from the sample count: an entry of the empirical second moment
(1/N) Σ η_i η_j is compared with the declared one within Z standard errors, the standard
error being std(η_i η_j)/√N estimated from the same draws. With at most a few hundred
entries per law, Z = 5 keeps the chance of a false alarm below 1e-4 (two-sided normal tail
5.7e-7 per entry); a bias too small for single entries is caught by the trace check, whose
standard error is far smaller.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsens import noise

Z = 5.0
N_DRAWS = 20_000


@jax.jit
def _draws(law, value, seed=0):
    keys = jax.random.split(jax.random.key(seed), N_DRAWS)
    return jax.vmap(lambda k: law.sample(k, value))(keys).reshape(N_DRAWS, -1)


def _declared(law, value):
    """The declared E[ηηᵀ] as a dense matrix: J C Jᵀ with J the identity."""
    eye = jnp.eye(value.size, dtype=value.dtype).reshape(value.size, *value.shape)
    return law.covariance(value).sandwich(eye)


@jax.jit
def _mc_and_declared(law, value):
    """Draws, empirical E[ηηᵀ] and E‖η‖² with standard errors, and the declared E[ηηᵀ]."""
    eta = _draws(law, value)
    prod = eta[:, :, None] * eta[:, None, :]
    sq = jnp.sum(eta**2, axis=1)
    root_n = math.sqrt(N_DRAWS)
    return dict(
        eta=eta,
        c_hat=jnp.mean(prod, axis=0),
        se=jnp.std(prod, axis=0, ddof=1) / root_n,
        sq_mean=jnp.mean(sq),
        sq_se=jnp.std(sq, ddof=1) / root_n,
        declared=_declared(law, value),
    )


def _normal(shape, seed):
    """Test values from NumPy (no JAX compilation), float64 inside the x64 context."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _spd(n, seed):
    a = np.random.default_rng(seed).standard_normal((n, n))
    return jnp.asarray(a @ a.T / n + 0.1 * np.eye(n))


def _np_norm(k, which):
    """Reference norms in NumPy; a weight is the matrix (fan_in, out), a vector one row."""
    k = np.asarray(k)
    m = k.reshape(1, -1) if k.ndim <= 1 else k.reshape(-1, k.shape[-1])
    if which == "frobenius":
        return np.linalg.norm(m)
    if which == "spectral":
        return np.linalg.norm(m, 2)
    # the layer computes x @ K, i.e. W = Kᵀ; ‖W‖_∞ is its max row ℓ1 sum
    return np.linalg.norm(m.T, np.inf)


# (id, law factory, value shape); values are standard normal (weight-like for weight laws).
LAW_CASES = [
    ("relative-sphere", lambda: noise.RelativeNorm(0.3), (12,)),
    ("relative-gaussian", lambda: noise.RelativeNorm(0.3, reading="gaussian"), (12,)),
    ("absolute", lambda: noise.Absolute(0.7), (10,)),
    ("multiplicative", lambda: noise.Multiplicative(0.4), (12,)),
    ("full-covariance", lambda: noise.FullCovariance(_spd(6, 1), level=0.8), (6,)),
    ("full-covariance-matrix", lambda: noise.FullCovariance(_spd(6, 2)), (2, 3)),
    ("weight-frobenius", lambda: noise.WeightRelative(0.2), (4, 3)),
    ("weight-spectral", lambda: noise.WeightRelative(0.2, norm="spectral"), (4, 3)),
    ("weight-linf", lambda: noise.WeightRelative(0.2, norm="linf"), (4, 3)),
    ("weight-frobenius-conv", lambda: noise.WeightRelative(0.2), (2, 2, 1, 3)),
    ("weight-spectral-conv", lambda: noise.WeightRelative(0.2, norm="spectral"), (2, 2, 1, 3)),
    ("weight-linf-conv", lambda: noise.WeightRelative(0.2, norm="linf"), (2, 2, 1, 3)),
    ("weight-spectral-bias", lambda: noise.WeightRelative(0.2, norm="spectral"), (5,)),
    ("weight-linf-bias", lambda: noise.WeightRelative(0.2, norm="linf"), (5,)),
]


@pytest.mark.parametrize(("make_law", "shape"), [c[1:] for c in LAW_CASES],
                         ids=[c[0] for c in LAW_CASES])
def test_sample_matches_declared_covariance_and_norm(x64, make_law, shape):
    law = make_law()
    value = _normal(shape, 7)
    res = _mc_and_declared(law, value)
    eta, declared = np.asarray(res["eta"]), np.asarray(res["declared"])
    assert eta.dtype == np.float64

    atol = 1e-12 * np.max(np.abs(declared))
    excess = np.abs(np.asarray(res["c_hat"]) - declared) - (Z * np.asarray(res["se"]) + atol)
    assert excess.max() <= 0.0, f"E[ηηᵀ]: max |Ĉ−C| − Z·se = {excess.max():.3g}"

    # The trace E‖η‖² has a much smaller standard error than single entries: this catches
    # a biased constant (e.g. the spectral / ℓ∞ normalisation) that entries cannot.
    tr, sq_mean, sq_se = np.trace(declared), float(res["sq_mean"]), float(res["sq_se"])
    assert abs(sq_mean - tr) <= Z * sq_se + 1e-12 * tr, (
        f"E‖η‖²: MC {sq_mean:.6g} ± {sq_se:.2g}, declared {tr:.6g}")

    # Stated norms, draw by draw, and the radii the bounds rely on.
    radius, almost_sure = law.radius(value)
    deltas = eta.reshape(N_DRAWS, *shape)
    if isinstance(law, noise.RelativeNorm) and law.reading == "sphere":
        r = law.level * np.linalg.norm(value)
        np.testing.assert_allclose(np.linalg.norm(eta, axis=1), r, rtol=1e-12)
        # E[ηηᵀ] = (ε‖h‖)²/n I: its trace is the (exact) squared norm.
        np.testing.assert_allclose(tr, r**2, rtol=1e-12)
        assert almost_sure and float(radius) == pytest.approx(r, rel=1e-12)
    elif isinstance(law, noise.RelativeNorm):
        # ‖η‖² = s² χ²_n, s² = r²/n: mean r², standard deviation r² √(2/n) per draw.
        r2 = (law.level * np.linalg.norm(value)) ** 2
        se = r2 * math.sqrt(2.0 / value.size / N_DRAWS)
        assert abs(sq_mean - r2) <= Z * se
        # ‖η‖/r spreads as χ_n/√n (std ≈ 1/√(2n) ≈ 0.2): not an exact-norm law.
        assert np.std(np.linalg.norm(eta, axis=1)) > 0.1 * math.sqrt(r2)
        assert not almost_sure
    elif isinstance(law, noise.WeightRelative):
        want = law.level * _np_norm(value, law.norm)
        got = np.array([_np_norm(d, law.norm) for d in deltas[:256]])
        np.testing.assert_allclose(got, want, rtol=1e-10)
        op_radius, a_s_op = law.operator_radius(value)
        assert almost_sure and a_s_op
        fro = np.linalg.norm(eta, axis=1)
        spec = np.array([_np_norm(d, "spectral") for d in deltas[:256]])
        assert fro.max() <= float(radius) * (1 + 1e-12)
        assert spec.max() <= float(op_radius) * (1 + 1e-12)
    else:
        # Gaussian laws: the radius is the root mean square, E‖η‖² = radius².
        assert not almost_sure
        np.testing.assert_allclose(float(radius) ** 2, tr, rtol=1e-10)


@pytest.mark.parametrize(
    "make_law",
    [lambda: noise.RelativeNorm(0.2), lambda: noise.Multiplicative(0.1),
     lambda: noise.WeightRelative(0.1, norm="spectral")],
    ids=["relative", "multiplicative", "weight-spectral"],
)
def test_covariance_and_radius_are_homogeneous_in_the_level(x64, make_law):
    law = make_law()
    w = _normal((5, 4), 5)
    c1 = _declared(law.with_level(1.0), w)
    c3 = _declared(law.with_level(3.0), w)
    np.testing.assert_allclose(c3, 9.0 * c1, rtol=1e-12, atol=1e-300)
    r1, _ = law.with_level(1.0).radius(w)
    r3, _ = law.with_level(3.0).radius(w)
    np.testing.assert_allclose(r3, 3.0 * r1, rtol=1e-12)


def test_same_key_same_draws_different_key_different_draws(x64):
    h = _normal((12,), 6)
    law = noise.RelativeNorm(0.1)
    a, b, c = (np.asarray(_draws(law, h, seed)) for seed in (0, 0, 1))
    assert np.array_equal(a, b)
    assert not np.any(np.all(a == c, axis=1))
