"""Moments of deep networks under Gaussian input: two-stage and layerwise propagation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jaxsens as js
from jaxsens.moments import (
    affine_relu_affine,
    affine_relu_affine_zero_mean_cov,
    output_moments,
    split_sites,
    two_stage_linearization,
)


def _mlp(din, widths, dout, seed, *, gain=2.0, bias=0.1):
    """An MLP with He-scaled NumPy parameters (fast, float64 inside the x64 context)."""
    model = nnx.eval_shape(lambda: js.models.MLP(din, widths, dout, param_dtype=jnp.float64,
                                                 rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "kernel":
            val = rng.standard_normal(var.shape) * np.sqrt(gain / var.shape[0])
        else:
            val = rng.standard_normal(var.shape) * bias
        flat.append((path, var.replace(jnp.asarray(val))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _random_cov(rng, d, scale):
    root = rng.standard_normal((d, d)) * scale / np.sqrt(d)
    return jnp.asarray(root @ root.T), jnp.asarray(root)


def test_one_hidden_layer_is_exact_and_methods_agree(x64):
    model = _mlp(5, [7], 3, seed=1)
    pm = js.split(model)
    rng = np.random.default_rng(2)
    x1 = jnp.asarray(rng.standard_normal(5))
    cov, root = _random_cov(rng, 5, 0.8)
    w1, b1 = pm.param("layers/0/kernel"), pm.param("layers/0/bias")
    w2, b2 = pm.param("layers/1/kernel"), pm.param("layers/1/bias")
    exact = affine_relu_affine(w1.T, b1, w2.T, b2, x1, cov)
    ts = two_stage_linearization(pm, x1)
    np.testing.assert_allclose(ts.A, w1.T, atol=1e-12)
    np.testing.assert_allclose(ts.c2, b2, atol=1e-12)
    for method in ("two_stage", "layerwise_full"):
        m = output_moments(pm, x1, jnp.zeros(5), cov, method=method)
        np.testing.assert_allclose(m.mean, exact.mean, atol=1e-12)
        np.testing.assert_allclose(m.cov, exact.cov, atol=1e-12)
    diag = output_moments(pm, x1, jnp.zeros(5), cov, method="layerwise_diag")
    np.testing.assert_allclose(diag.mean, exact.mean, atol=1e-12)  # means need only variances
    # Against Monte Carlo on the true network.
    n = 200_000
    g = jnp.asarray(rng.standard_normal((n, 5))) @ root.T
    out = pm.apply(x1[None] + g)
    se = out.std(0) / np.sqrt(n)
    assert np.all(np.abs(out.mean(0) - exact.mean) < 4 * se)
    # Var of the sample variance: ≈ (m4 − σ⁴)/n.
    c = out - out.mean(0)
    se_var = np.sqrt(((c**4).mean(0) - c.var(0) ** 2) / n)
    assert np.all(np.abs(c.var(0) - jnp.diagonal(exact.cov)) < 4 * se_var)


def test_estimator_rms_matches_monte_carlo_one_layer(x64):
    model = _mlp(6, [9], 4, seed=3)
    x = jax.random.normal(jax.random.key(1), (3, 6))
    law = js.noise.Absolute(0.6)
    m = js.propagate_moments(model, x, noise=law)
    r = js.sampled(model, x, site="input", noise=law, key=jax.random.key(0), num_samples=40_000)
    # delta_mean: each coordinate within 4 standard errors of the Monte Carlo mean.
    se = jnp.sqrt(jnp.diagonal(r.delta_cov, axis1=1, axis2=2) / r.num_samples)
    assert np.all(np.abs(m.delta_mean - r.delta_mean) < 4 * se)
    # Mean square: its standard error from the spread of ‖ΔF‖², bounded via rms and quantiles
    # is awkward; use the exact relation E‖ΔF‖² = ‖E ΔF‖² + tr Cov against the MC one.
    ms_an = m.rms**2
    ms_mc = r.rms**2
    assert np.all(np.abs(ms_an / ms_mc - 1) < 0.02), (ms_an, ms_mc)
    assert m.estimator == "moments" and not m.mean_exact


def test_deep_mlp_two_stage_tightness(x64):
    """784-500-500-300-100-10 under a random covariance (the authors' protocol, 1e4 draws)."""
    model = _mlp(784, [500, 500, 300, 100], 10, seed=0)
    pm = js.split(model)
    rng = np.random.default_rng(0)
    x1 = jnp.asarray(rng.uniform(0, 1, 784))
    cov, root = _random_cov(rng, 784, 0.03)
    ts = two_stage_linearization(pm, x1)
    exact = affine_relu_affine(ts.A, ts.c1, ts.B, ts.c2, x1, cov)
    old = affine_relu_affine_zero_mean_cov(ts.A, ts.c1, ts.B, ts.c2, x1, cov)
    n = 10_000
    out = pm.apply(x1[None] + jnp.asarray(rng.standard_normal((n, 784))) @ root.T)
    mc_mean, mc_var = out.mean(0), out.var(0)
    rel = float(jnp.linalg.norm(exact.mean - mc_mean) / jnp.linalg.norm(mc_mean))
    assert rel < 0.01, rel
    var = jnp.diagonal(exact.cov)
    var_old = jnp.diagonal(old.cov)
    # The general-mean variance is close; the zero-mean formula is far off on every logit.
    assert np.all(np.abs(var / mc_var - 1) < 0.25), var / mc_var
    assert np.all(np.abs(var - mc_var) < np.abs(var_old - mc_var))


def test_split_sites_and_errors(x64):
    model = _mlp(4, [5, 6], 2, seed=0)
    pm = js.split(model)
    assert split_sites(pm) == ("h0", "h1")
    x1 = jnp.ones(4)
    a = two_stage_linearization(pm, x1, split_at="h0")
    assert a.A.shape == (5, 4) and a.B.shape == (2, 5)
    with pytest.raises(ValueError, match="split='input' is not a ReLU site"):
        two_stage_linearization(pm, x1, split_at="input")
    tanh = js.models.MLP(4, [5], 2, activation="tanh", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no activation site whose value is relu"):
        two_stage_linearization(tanh, x1)
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="method='exact' is not a moments method"):
        js.propagate_moments(model, x, noise=js.noise.Absolute(0.1), method="exact")
    with pytest.raises(ValueError, match="Gaussian input noise"):
        js.propagate_moments(model, x, noise=js.noise.RelativeNorm(0.1))
    with pytest.raises(ValueError, match="site must be 'input'"):
        js.propagate_moments(model, x, noise=js.noise.Absolute(0.1), site="h0")


def test_lenet_two_stage_runs(x64):
    model = js.models.LeNet((8, 8, 1), 3, channels=(2, 3), hidden=(6, 5),
                            param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
    m = js.propagate_moments(model, x, noise=js.noise.Absolute(0.05))
    assert m.delta_mean.shape == (2, 3) and np.all(np.isfinite(m.rms))
    # Layerwise propagation reads convolutions and average pooling from the graph too.
    lw = js.propagate_moments(model, x, noise=js.noise.Absolute(0.05), method="layerwise_full")
    assert lw.delta_mean.shape == (2, 3) and np.all(np.isfinite(lw.rms))


def test_gradients_through_moments(x64):
    model = _mlp(4, [5, 5], 3, seed=4)
    pm = js.split(model)
    x1 = jnp.asarray([0.3, -0.2, 0.5, 0.1])
    cov = 0.2 * jnp.eye(4)

    for method in ("two_stage", "layerwise_full", "layerwise_diag"):
        def f(params, method=method):
            m = output_moments(pm.with_params(params), x1, jnp.zeros(4), cov, method=method)
            return jnp.sum(m.mean) + jnp.sum(m.cov)

        check_grads(f, (pm.params,), order=1, modes=("rev",))

    def g(shift):
        m = output_moments(pm, x1, shift, cov)
        return m.mean[0] - m.mean[1] + jnp.trace(m.cov)

    check_grads(g, (jnp.full(4, 0.1),), order=1, modes=("fwd", "rev"))


def test_noncentral_norm_mean(x64):
    from jaxsens.moments import noncentral_norm_mean

    rng = np.random.default_rng(0)
    root = jnp.asarray(rng.standard_normal((3, 3)))
    c = root @ root.T * 0.3
    m = jnp.asarray([0.5, -1.0, 2.0])
    n = 400_000
    z = m + jnp.asarray(rng.standard_normal((n, 3))) @ root.T * np.sqrt(0.3)
    norms = jnp.linalg.norm(z, axis=1)
    assert abs(noncentral_norm_mean(m, c) - norms.mean()) < 4 * norms.std() / np.sqrt(n)
    # Zero mean reduces to the centred formula.
    from jaxsens.estimators import gaussian_norm_mean

    np.testing.assert_allclose(noncentral_norm_mean(jnp.zeros(3), c), gaussian_norm_mean(c),
                               rtol=1e-10)
