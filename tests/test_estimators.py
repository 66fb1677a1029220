"""Sampled and linearized estimators: exactness, agreement, Jacobians, gradients, keys.

Statistical checks compare a Monte Carlo estimate with its exact value within Z standard
errors computed from the number of draws (Z = 4: a two-sided false-alarm chance of 6e-5
per comparison; keys are fixed, so the outcome is deterministic).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads
from scipy.special import gammaln

import jaxsens as js
from jaxsens import noise
from jaxsens.estimators import _sampled, gaussian_norm_mean, sandwiches

Z = 4.0


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _numpy(dev):
    """A Deviation with NumPy arrays (post-processing without compiling JAX ops)."""
    return jax.tree.map(np.asarray, dev)


# --------------------------------------------------------------------------- linear network
LINEAR_CASES = [
    ("input", lambda: noise.RelativeNorm(1.0), False),
    ("h0", lambda: noise.RelativeNorm(1.0, reading="gaussian"), False),
    ("h1", lambda: noise.Multiplicative(1.0), True),
    ("layers/1/kernel", lambda: noise.WeightRelative(1.0), False),
]


@pytest.mark.parametrize(("site", "make_law", "crn"), LINEAR_CASES,
                         ids=[f"{c[0]}-{c[1]().describe().split()[0]}{'-crn' * c[2]}"
                              for c in LINEAR_CASES])
def test_linear_network_sampled_equals_linearized_at_every_level(x64, make_mlp, site,
                                                                 make_law, crn):
    """For a linear network ΔF = Jη exactly, so the prediction is exact at any ε."""
    model = make_mlp(6, [16, 12], 4, activation="identity")
    x = _x((3, 6))
    n = 4000
    for eps in (0.05, 0.5, 2.0):
        law = make_law().with_level(eps)
        s = js.sampled(model, x, site=site, noise=law, key=jax.random.key(11), num_samples=n,
                       common_random_numbers=crn)
        lin = js.linearized(model, x, site=site, noise=law)
        assert lin.mean_exact
        s, lin = _numpy(s), _numpy(lin)
        np.testing.assert_array_less(np.abs(s.mean - lin.mean), Z * s.stderr)
        # ‖Jη‖² for η ~ N(0, C) has variance 2 tr(M²), M = J C Jᵀ; for the sphere laws the
        # variance is smaller (by n/(n+2) at most), so this standard error is conservative.
        m = lin.delta_cov
        se_ms = np.sqrt(2.0 * np.sum(m * m, axis=(1, 2)) / n)
        np.testing.assert_array_less(np.abs(s.rms**2 - lin.rms**2), Z * se_ms)
        if isinstance(law, noise.RelativeNorm):
            # DESIGN §3.2: under relative-norm noise rms = ε · ‖v‖‖J‖_F/√n.
            np.testing.assert_allclose(lin.rms, eps * lin.factor, rtol=1e-12)


# --------------------------------------------------------------------------- ReLU, ε → 0
def test_relu_mean_square_ratio_tends_to_one_linearly_in_eps(x64, make_mlp):
    """sampled/linearized mean square = 1 + c·ε + o(ε) for a ReLU network.

    All levels use the same key, hence the same unit draws: the Monte Carlo error of the
    ratio is (to first order) common to all levels. Subtracting the ratio at ε = 1e-4
    (where kinks are crossed with probability ~1e-4) leaves the O(ε) nonlinearity itself.
    """
    model = make_mlp(8, [64, 64], 6)
    x = _x((16, 8))
    n = 2000
    law = noise.RelativeNorm(1.0, reading="gaussian")
    lin = _numpy(js.linearized(model, x, site="h0", noise=law))
    pred = np.sum(lin.rms**2)

    def ratio(eps):
        s = js.sampled(model, x, site="h0", noise=law.with_level(eps), key=jax.random.key(3),
                       num_samples=n)
        return np.sum(np.asarray(s.rms) ** 2) / eps**2 / pred

    r0 = ratio(1e-4)
    # Each example's mean square has variance 2 tr(M²)/n (Gaussian η): the batch sum too.
    se = np.sqrt(np.sum(2.0 * np.sum(lin.delta_cov**2, axis=(1, 2))) / n) / pred
    assert abs(r0 - 1.0) <= Z * se

    levels = [0.2, 0.1, 0.05, 0.025]
    err = np.array([abs(ratio(e) - r0) for e in levels])
    halving = err[:-1] / err[1:]
    assert np.all((halving > 1.4) & (halving < 2.8)), f"errors {err}, halving ratios {halving}"
    # The nonlinearity is visible well above the Monte Carlo noise at the largest level.
    assert err[0] > 10 * se


# --------------------------------------------------------------------------- E‖Jη‖ exactly
def test_gaussian_norm_mean_against_monte_carlo(x64):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((5, 8)) * np.array([3.0, 1.0, 0.5, 0.2, 0.05])[:, None]
    n = 400_000
    z = rng.standard_normal((n, 8)) @ a.T
    norms = np.linalg.norm(z, axis=1)
    exact = float(jax.jit(gaussian_norm_mean)(jnp.asarray(a @ a.T)))
    assert abs(norms.mean() - exact) <= Z * norms.std(ddof=1) / math.sqrt(n)


@pytest.mark.parametrize("rank", [1, 2, 3, 5, 8])
def test_gaussian_norm_mean_isotropic_rank_closed_form(x64, rank):
    k, s = 8, 0.7
    q, _ = np.linalg.qr(np.random.default_rng(rank).standard_normal((k, k)))
    d = np.where(np.arange(k) < rank, s**2, 0.0)
    m = (q * d) @ q.T
    closed = s * math.sqrt(2.0) * math.exp(gammaln((rank + 1) / 2) - gammaln(rank / 2))
    got = float(jax.jit(gaussian_norm_mean)(jnp.asarray(m)))
    assert got == pytest.approx(closed, rel=1e-10)


@pytest.mark.parametrize("rank", [1, 2, 5, 8])
def test_single_precision_rule_accurate_to_1e8(x64, rank):
    """The shorter float32 rule, evaluated in float64 (no float32 rounding), against the
    closed form and the double-precision rule: its own error stays under 1e-8 relative
    for spectra from rank 1 to full rank and with a 1e6 spread."""
    from jaxsens import quadrature

    k, s = 8, 0.7
    d = np.where(np.arange(k) < rank, s**2, 0.0)
    closed = s * math.sqrt(2.0) * math.exp(gammaln((rank + 1) / 2) - gammaln(rank / 2))
    spread = np.logspace(0, -6, k)
    for lam, want in ((d, closed),
                      (spread, quadrature.gaussian_norm_mean_from_eigs(jnp.asarray(spread)))):
        fine, _ = quadrature._integrals(jnp.asarray(lam / lam.sum()))  # float64: fine rule
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(quadrature, "rule", lambda dtype: (quadrature.NODES_SINGLE,
                                                          quadrature.STEP_SINGLE))
            coarse, _ = quadrature._integrals(jnp.asarray(lam / lam.sum()))
        assert float(coarse) * math.sqrt(lam.sum()) == pytest.approx(float(want), rel=1e-8)
        assert float(coarse) == pytest.approx(float(fine), rel=1e-8)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_noncentral_norm_mean_singular_covariance_finite_and_in_float32(x64, rank):
    """E‖z‖ of the moments for a singular covariance (rounding makes I + xC look
    indefinite at the largest nodes): finite, equal to the closed form of a centred
    isotropic rank-r Gaussian, and the float32 rule agrees with float64 to rounding."""
    from jaxsens import quadrature
    from jaxsens.moments import _network
    from jaxsens.moments._network import noncentral_norm_mean

    k, s = 8, 0.7
    q, _ = np.linalg.qr(np.random.default_rng(rank).standard_normal((k, k)))
    cov = (q * np.where(np.arange(k) < rank, s**2, 0.0)) @ q.T
    closed = s * math.sqrt(2.0) * math.exp(gammaln((rank + 1) / 2) - gammaln(rank / 2))
    got = float(jax.jit(noncentral_norm_mean)(jnp.zeros(k), jnp.asarray(cov)))
    assert got == pytest.approx(closed, rel=1e-12)
    mean = q[:, -1]  # outside the covariance's range when rank < k
    f64 = float(jax.jit(noncentral_norm_mean)(jnp.asarray(mean), jnp.asarray(cov)))
    with pytest.MonkeyPatch.context() as mp:  # the float32 rule, evaluated in float64
        mp.setattr(_network, "quadrature_rule", lambda dtype: (quadrature.NODES_SINGLE,
                                                               quadrature.STEP_SINGLE))
        coarse = float(noncentral_norm_mean(jnp.asarray(mean), jnp.asarray(cov)))
    assert math.isfinite(f64) and coarse == pytest.approx(f64, rel=5e-8)
    # In float32 the Cholesky factors themselves round (~1e-5 with the fine rule too).
    f32 = float(jax.jit(noncentral_norm_mean)(jnp.asarray(mean, jnp.float32),
                                              jnp.asarray(cov, jnp.float32)))
    assert f32 == pytest.approx(f64, rel=5e-5)


def test_gaussian_norm_mean_gradient_and_zero(x64):
    a = np.random.default_rng(2).standard_normal((4, 4))
    m = jnp.asarray(a @ a.T + 0.1 * np.eye(4))
    check_grads(jax.jit(gaussian_norm_mean), (m,), order=1, modes=("fwd", "rev"))
    assert float(jax.jit(gaussian_norm_mean)(jnp.zeros((3, 3)))) == 0.0


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_tridiagonalize_keeps_the_spectrum(x64, batch):
    """The batched Householder form has the eigenvalues of the symmetric part of m, for
    every size up to the tridiagonal limit and for indefinite matrices too."""
    from jaxsens.quadrature import TRIDIAGONAL_MAX_K, tridiagonalize

    rng = np.random.default_rng(len(batch))
    for k in (1, 2, 3, 7, TRIDIAGONAL_MAX_K):
        m = rng.standard_normal((*batch, k, k))
        d, e = jax.jit(tridiagonalize)(jnp.asarray(m))
        assert d.shape == (*batch, k) and e.shape == (*batch, k - 1)
        n = math.prod(batch)
        d, e = np.asarray(d).reshape(n, k), np.asarray(e).reshape(n, k - 1)
        t = np.stack([np.diag(di) + np.diag(ei, -1) + np.diag(ei, 1)
                      for di, ei in zip(d, e, strict=True)])
        want = np.linalg.eigvalsh(0.5 * (m + np.swapaxes(m, -1, -2))).reshape(-1, k)
        np.testing.assert_allclose(np.linalg.eigvalsh(t), want, atol=1e-12 * k)


@pytest.mark.parametrize("k", [1, 2, 5, 10, 16, 20])
def test_batched_gaussian_norm_mean_equals_the_eigenvalue_rule(x64, k):
    """Batched E‖z‖ (pivots of det(I + 2tT) up to 16 dimensions, eigenvalues above)
    against the eigenvalue rule matrix by matrix, for ranks 1 to k and spreads up to 1e6;
    in float32 within float32 rounding of the float64 value."""
    from jaxsens.quadrature import gaussian_norm_mean_from_eigs

    rng = np.random.default_rng(k)
    ms = []
    for i in range(12):
        rank = 1 + i % k
        a = rng.standard_normal((k, rank)) * np.logspace(0, -3 * (i % 3), rank)
        ms.append(a @ a.T)
    m = np.stack(ms)
    got = np.asarray(jax.jit(gaussian_norm_mean)(jnp.asarray(m)))
    want = np.array([float(gaussian_norm_mean_from_eigs(jnp.asarray(np.linalg.eigvalsh(mi))))
                     for mi in m])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    f32 = np.asarray(jax.jit(gaussian_norm_mean)(jnp.asarray(m, jnp.float32)))
    assert np.all(np.isfinite(f32))
    np.testing.assert_allclose(f32, want, rtol=3e-5)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(gaussian_norm_mean)(jnp.asarray(m.reshape(3, 4, k, k)))),
        got.reshape(3, 4))


@pytest.mark.parametrize("k", [3, 10, 20])
def test_gaussian_norm_mean_scales_and_edge_inputs(k):
    """E‖z‖ is homogeneous of degree ½: float32 matrices scaled by 1e±19 (whose squares
    over/underflow) give the scaled value; NaN gives NaN, not 0; k = 0 gives 0; integer
    matrices are promoted."""
    a = np.random.default_rng(k).standard_normal((k, k))
    m = jnp.asarray(a @ a.T / k, jnp.float32)
    base = float(gaussian_norm_mean(m))
    for c in (1e-19, 1e19):
        got = float(jax.jit(gaussian_norm_mean)(m * jnp.float32(c)))
        assert got == pytest.approx(base * math.sqrt(c), rel=1e-5)
    bad = m.at[0, 1].set(jnp.nan)
    assert bool(jnp.isnan(jax.jit(gaussian_norm_mean)(bad)))
    assert gaussian_norm_mean(jnp.zeros((2, 0, 0))).shape == (2,)
    np.testing.assert_allclose(gaussian_norm_mean(jnp.eye(k, dtype=jnp.int32)),
                               gaussian_norm_mean(jnp.eye(k)), rtol=1e-6)


def test_batched_gaussian_norm_mean_gradient(x64):
    a = np.random.default_rng(3).standard_normal((2, 3, 4))
    m = jnp.asarray(a @ np.swapaxes(a, -1, -2) + 0.1 * np.eye(3))
    check_grads(jax.jit(gaussian_norm_mean), (m,), order=1, modes=("fwd", "rev"))


# --------------------------------------------------------------------------- one reverse sweep
def _reference_covariances(pm, x, sites, eps):
    """Reference J diag(ε² v²) Jᵀ (multiplicative law) from a separate ``jax.jacrev`` of a
    per-site function for every site; v is the clean value at the site."""
    struct, rest = pm.structure, pm.rest

    def per_site(params, x):
        values = struct.apply_with_values(params, rest, x)[1]
        out = {}
        for site in sites:
            info = pm.site(site)
            if info.kind == "weight":
                w = dict(nnx.to_flat_state(params))[info.path].get_value()
                zero, var = jnp.zeros_like(w), jnp.broadcast_to(w**2, (x.shape[0], *w.shape))
            else:
                zero = jnp.zeros(info.shape, x.dtype)
                var = (x if info.kind == "input" else values[site]) ** 2

            def jac(x1, site=site, zero=zero):
                return jax.jacrev(
                    lambda d: struct.apply_one(params, rest, x1, {site: d}).reshape(-1))(zero)

            j = jax.vmap(jac)(x)
            j = j.reshape(j.shape[0], j.shape[1], -1)
            out[site] = jnp.einsum("bki,bi,bli->bkl", j, eps**2 * var.reshape(x.shape[0], -1), j)
        return out

    return {k: np.asarray(v) for k, v in jax.jit(per_site)(pm.params, x).items()}


PROFILE_SITES = ("h0", "h1", "layers/0/kernel", "layers/1/bias")


@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_one_sweep_all_site_jacobian_equals_per_site_jacrev(x64, make_mlp, make_lenet, arch):
    if arch == "mlp":
        model, x = make_mlp(6, [16, 12], 4, activation="tanh"), _x((3, 6))
        per_site_checks = ("input", *PROFILE_SITES)
    else:
        model, x = make_lenet(activation="tanh"), _x((2, 16, 16, 1))
        per_site_checks = ("convs/1/kernel",)
    pm = js.split(model)
    sites = ("input", *pm.activation_sites, *pm.weight_sites)
    eps = 0.3
    law = noise.Multiplicative(eps)
    ref = _reference_covariances(pm, x, sites, eps)

    # All sites from one reverse sweep (what profile uses).
    outs = jax.jit(lambda params, x: sandwiches(
        pm.structure, params, pm.rest, x, (law,) * len(sites), sites=sites,
        chunk=x.shape[0]))(pm.params, x)
    for s, (m, _, _) in zip(sites, outs, strict=True):
        assert np.max(ref[s]) > 0, s
        np.testing.assert_allclose(m, ref[s], rtol=1e-9, atol=1e-12 * np.max(ref[s]), err_msg=s)
    # The public single-site estimator.
    for s in per_site_checks:
        lin = js.linearized(pm, x, site=s, noise=law)
        np.testing.assert_allclose(lin.delta_cov, ref[s], rtol=1e-9,
                                   atol=1e-12 * np.max(ref[s]), err_msg=s)
        np.testing.assert_allclose(lin.rms**2, np.trace(ref[s], axis1=1, axis2=2), rtol=1e-9)


def test_profile_linearized_rows_equal_individual_calls(x64, make_mlp):
    model, x = make_mlp(6, [16, 12], 4, activation="tanh"), _x((3, 6))
    levels = [0.01, 0.3]
    law0 = noise.Multiplicative(0.5)
    rows = js.profile(model, x, noise=law0, levels=levels, key=jax.random.key(0),
                      weight_noise=law0, weight_sites=PROFILE_SITES[2:],
                      estimators=("linearized",)).to_records()
    assert [r["site"] for r in rows[::len(levels)]] == list(PROFILE_SITES)
    assert len(rows) == 4 * len(levels) and all(r["estimator"] == "linearized" for r in rows)
    for r in rows:
        law = law0.with_level(r["level"])
        lin = js.linearized(model, x, site=r["site"], noise=law)
        assert r["law"] == law.describe()
        lin = _numpy(lin)
        assert r["mean"] == pytest.approx(np.mean(lin.mean), rel=1e-10)
        assert r["rms"] == pytest.approx(np.sqrt(np.mean(lin.rms**2)), rel=1e-10)
        assert r["factor"] == pytest.approx(np.mean(lin.factor), rel=1e-10)


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("site", ["h0", "layers/0/kernel"])
def test_check_grads_through_linearized(x64, make_mlp, site):
    law = noise.Multiplicative(0.2)  # C = ε² diag(v²) depends on the parameters too
    pm = js.split(make_mlp(6, [16, 12], 4, activation="tanh"))
    x = _x((3, 6))

    def f(params):
        lin = js.linearized(pm.with_params(params), x, site=site, noise=law)
        return jnp.stack([lin.rms.sum(), lin.mean.sum()])

    check_grads(f, (pm.params,), order=1, modes=("rev",))


def test_nnx_grad_through_linearized_matches_pure_grad(x64, make_mlp):
    model = make_mlp(6, [16, 12], 4, activation="tanh")
    x = _x((3, 6))
    law = noise.Multiplicative(0.2)

    def loss_module(m):
        return js.linearized(m, x, site="h1", noise=law).mean.sum()

    pm = js.split(model)
    g_nnx = nnx.grad(loss_module)(model)
    g_pure = jax.grad(lambda p: loss_module(pm.with_params(p)))(pm.params)
    flat_nnx = dict(nnx.to_flat_state(g_nnx))
    flat_pure = dict(nnx.to_flat_state(g_pure))
    assert flat_nnx.keys() == flat_pure.keys()
    for path, v in flat_pure.items():
        np.testing.assert_allclose(flat_nnx[path].get_value(), v.get_value(), rtol=1e-12,
                                   err_msg=str(path))
    assert any(np.max(np.abs(v.get_value())) > 0 for v in flat_pure.values())


# --------------------------------------------------------------------------- keys and chunks
FIELDS = ("mean", "rms", "stderr", "quantiles", "delta_mean", "delta_cov", "flip_rate",
          "loss_change")


@pytest.mark.parametrize(("site", "law"), [("input", noise.RelativeNorm(0.5)),
                                           ("layers/1/kernel", noise.WeightRelative(0.5))])
def test_sampled_same_key_same_numbers_different_key_different(x64, make_mlp, site, law):
    # Same configuration as the linear-network test above: reuses its compilation.
    model, x = make_mlp(6, [16, 12], 4, activation="identity"), _x((3, 6))

    def run(key):
        return js.sampled(model, x, site=site, noise=law, key=jax.random.key(key),
                          num_samples=4000)

    a, b, c = run(0), run(0), run(1)
    for f in FIELDS:
        assert np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f))), f
    assert np.all(np.asarray(a.mean) != np.asarray(c.mean))


def _sampled_tanh(model, x, level, key, **kw):
    return js.sampled(model, x, site="h0", noise=noise.RelativeNorm(level),
                      key=jax.random.key(key), num_samples=50, **kw)


def test_sampled_independent_of_chunk_size(x64, make_mlp):
    """chunk_size only regroups the same per-draw keys: equal up to summation order."""
    model, x = make_mlp(6, [16, 12], 4, activation="tanh"), _x((3, 6))
    a, d = _sampled_tanh(model, x, 0.3, 0), _sampled_tanh(model, x, 0.3, 0, chunk_size=7)
    for f in FIELDS:
        np.testing.assert_allclose(getattr(d, f), getattr(a, f), rtol=1e-12, atol=1e-14,
                                   err_msg=f)


def test_check_grads_through_reparameterized_sampled(x64, make_mlp):
    """With a fixed key, sampled is a deterministic, differentiable function of params."""
    pm = js.split(make_mlp(6, [16, 12], 4, activation="tanh"))
    x = _x((3, 6))

    def f(params):
        s = _sampled_tanh(pm.with_params(params), x, 0.2, 4)
        return jnp.stack([s.rms.sum(), s.mean.sum()])

    check_grads(f, (pm.params,), order=1, modes=("rev",))


def test_sampled_compiles_once_per_structure(x64, make_mlp):
    """New parameters, levels and keys reuse the compiled estimator."""
    x = _x((3, 6))
    _sampled_tanh(make_mlp(6, [16, 12], 4, activation="tanh"), x, 0.3, 0)
    before = _sampled._kernel._cache_size()
    for seed, level in [(1, 0.05), (2, 0.9)]:
        _sampled_tanh(make_mlp(6, [16, 12], 4, activation="tanh", seed=seed), x, level, seed)
    assert _sampled._kernel._cache_size() == before


def test_quantiles_come_from_a_bounded_prefix_of_the_draws():
    """Beyond 10,000 draws the quantiles use the first 10,000 (memory stays bounded)."""
    model = js.models.MLP(6, [8], 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6))
    law = js.noise.RelativeNorm(0.1)
    n = _sampled.QUANTILE_DRAWS
    head = js.sampled(model, x, site="h0", noise=law, key=jax.random.key(3), num_samples=n,
                      chunk_size=1000)
    more = js.sampled(model, x, site="h0", noise=law, key=jax.random.key(3),
                      num_samples=n + 2000, chunk_size=1000)
    np.testing.assert_array_equal(head.quantiles, more.quantiles)
    assert not np.array_equal(head.mean, more.mean)
