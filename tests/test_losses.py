"""Loss terms: shapes, differentiability, and each estimator against its exact value.

Statistical tolerances come from the number of draws: a Monte Carlo mean over P draws is
compared with its exact expectation within Z = 5 standard errors, the standard error being
derived analytically (random projections, Gaussian noise on a linear map) or estimated from
the same draws. Z = 5 keeps false alarms below 1e-6 per comparison.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

import jaxsens as js
from jaxsens import losses
from jaxsens import noise as nz

Z = 5.0

# The programs here are tiny, so XLA's backend optimizations cost far more time than they
# save: compile without them (numerics are unchanged; CPU fast-math stays off).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.partial(_jit, static_argnums=(0, 1))
def _call(term, struct, params, rest, x, y, key):
    """``term(...)`` compiled once per (term, structure, shapes): tests never run eagerly."""
    return term(struct, params, rest, x, y, key)


def _setup(model, batch=4, seed=1):
    pm = js.split(model)
    x = jax.random.normal(jax.random.key(seed), (batch, *pm.input_shape),
                          jax.tree.leaves(pm.params)[0].dtype)
    y = jnp.arange(batch) % math.prod(pm.structure.output_shape)
    return pm, x, y


def _mlp(dtype=jnp.float32, activation="relu", widths=(7, 6), seed=0):
    return js.models.MLP(5, widths, 3, activation=activation, param_dtype=dtype,
                         rngs=nnx.Rngs(seed))


def _lenet(dtype=jnp.float32, activation="relu"):
    return js.models.LeNet((8, 8, 1), 4, channels=(2, 3), hidden=(6,), kernel_size=3,
                           activation=activation, param_dtype=dtype, rngs=nnx.Rngs(0))


# The MLP cases of every term are checked in float64 by the finite-difference test below;
# here the CNN, whose sites differ (images, conv feature maps, conv kernels).
CNN_TERMS = {
    "noise_conv_site_ce": losses.NoiseLoss(site="c0", noise=nz.RelativeNorm(0.1),
                                           num_samples=2, target="ce"),
    "noise_conv_kernel": losses.NoiseLoss(site="convs/1/kernel", noise=nz.WeightRelative(0.1),
                                          num_samples=2),
    "jacobian_image": losses.JacobianPenalty(num_projections=2),
    "linearized_conv_site": losses.LinearizedPenalty(site="c1", noise=nz.Multiplicative(0.1)),
}


@pytest.mark.parametrize("name", list(CNN_TERMS))
def test_cnn_term_shape_finite_and_gradient_under_jit(name):
    pm, x, y = _setup(_lenet(), batch=5)
    term = CNN_TERMS[name]
    hash(term)  # frozen dataclass: usable as a static argument
    key = jax.random.key(3)

    @_jit
    def value_and_grad(p):
        def f(p):
            per = term(pm.structure, p, pm.rest, x, y, key)
            return jnp.mean(per), per

        return jax.value_and_grad(f, has_aux=True)(p)

    (_, val), grads = value_and_grad(pm.params)
    assert val.shape == (5,)
    assert bool(jnp.all(jnp.isfinite(val)))
    assert bool(jnp.all(val >= 0))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
    # Same key, same numbers. Not bitwise: GPUs may reduce in a different order from one
    # run of the same program to the next (atomics, cuDNN algorithms); a different key
    # moves a random term by far more than rounding.
    np.testing.assert_allclose(np.asarray(val), np.asarray(value_and_grad(pm.params)[0][1]),
                               rtol=1e-6)
    if not isinstance(term, losses.LinearizedPenalty):  # the other terms draw with the key
        other = _call(term, pm.structure, pm.params, pm.rest, x, y, jax.random.key(4))
        assert np.max(np.abs(np.asarray(other) - np.asarray(val))) > 1e-3 * np.max(
            np.abs(np.asarray(val)))


def test_flat_inputs_are_reshaped_to_the_model_input():
    pm, x, y = _setup(_lenet())
    term = losses.CrossEntropy()
    f = _jit(lambda x: term(pm.structure, pm.params, pm.rest, x, y, None))
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(f(x.reshape(x.shape[0], -1))),
                               rtol=1e-6)


@pytest.mark.parametrize(
    "term",
    [
        losses.NoiseLoss(site="h0", noise=nz.RelativeNorm(0.2), num_samples=2, target="ce"),
        losses.NoiseLoss(site="layers/1/kernel", noise=nz.WeightRelative(0.1), num_samples=2),
        losses.JacobianPenalty(site="input", num_projections=2),
        losses.JacobianPenalty(site="layers/0/kernel", num_projections=2),
        losses.LinearizedPenalty(site="h0", noise=nz.RelativeNorm(0.1)),
    ],
    ids=lambda t: f"{type(t).__name__}-{t.site}",
)
def test_gradients_match_finite_differences(x64, term):
    # tanh: smooth, so finite differences are exact to O(eps²) (no ReLU kinks).
    pm, x, y = _setup(_mlp(jnp.float64, activation="tanh"), batch=3)
    key = jax.random.key(7)  # fixed key: the sampled loss is a smooth function of params

    per = _call(term, pm.structure, pm.params, pm.rest, x, y, key)
    assert per.shape == (3,) and bool(jnp.all(jnp.isfinite(per))) and bool(jnp.all(per > 0))

    # One flat parameter vector: check_grads' eager perturbations then touch a single array.
    flat, unravel = ravel_pytree(pm.params)

    @jax.jit  # check_grads differentiates f: compiler options must stay off nested jits
    def f(v):
        return jnp.mean(term(pm.structure, unravel(v), pm.rest, x, y, key))

    check_grads(f, (flat,), order=1, modes=["rev"])


def _exact_jacobians(pm, x, site):
    """Per-example ∂F/∂(site) by jax.jacrev, flattened to ``(batch, k, site_size)``."""
    zero = jnp.zeros(pm.site(site).shape, x.dtype)

    @_jit
    def jac(x1):
        j = jax.jacrev(lambda d: pm.structure.apply_one(pm.params, pm.rest, x1, {site: d}))(zero)
        return j.reshape(j.shape[0], -1)

    return jax.vmap(jac)(x)


@pytest.mark.parametrize("site", ["input", "h0", "layers/1/kernel"])
def test_jacobian_penalty_is_unbiased(x64, site):
    pm, x, y = _setup(_mlp(jnp.float64, widths=(9, 8)), batch=3)
    p = 4000
    est = _call(losses.JacobianPenalty(site=site, num_projections=p), pm.structure,
                pm.params, pm.rest, x, y, jax.random.key(11))
    k = math.prod(pm.structure.output_shape)
    jacs = _exact_jacobians(pm, x, site)
    for b in range(x.shape[0]):
        a = jacs[b] @ jacs[b].T
        exact = float(jnp.trace(a))
        # v uniform on the sphere of R^k: Var(k vᵀAv) = 2k/(k+2) (tr A² − (tr A)²/k).
        var = 2 * k / (k + 2) * (float(jnp.trace(a @ a)) - exact**2 / k)
        tol = Z * math.sqrt(var / p)
        assert abs(float(est[b]) - exact) <= tol, (b, float(est[b]), exact, tol)
        assert tol < 0.1 * exact  # the check has teeth


def test_jacobian_penalty_one_projection_is_exact_for_scalar_output(x64):
    model = js.models.MLP(4, (5,), 1, param_dtype=jnp.float64, rngs=nnx.Rngs(2))
    pm, x, _ = _setup(model, batch=3)
    est = _call(losses.JacobianPenalty(), pm.structure, pm.params, pm.rest, x, None,
                jax.random.key(0))
    jacs = _exact_jacobians(pm, x, "input")
    np.testing.assert_allclose(np.asarray(est), np.asarray(jnp.sum(jacs**2, axis=(1, 2))),
                               rtol=1e-12)


@pytest.mark.parametrize(
    ("site", "law"),
    [("input", nz.Absolute(0.3)), ("h1", nz.RelativeNorm(0.5))],
    ids=["input-absolute", "h1-sphere"],
)
def test_noise_loss_matches_linearized_exactly_for_a_linear_model(x64, site, law):
    # A linear network: ΔF = Jη exactly, so E‖ΔF‖² = tr(J C Jᵀ) at every noise level.
    model = _mlp(jnp.float64, activation="identity", widths=(6, 5))
    pm, x, y = _setup(model, batch=3)
    n = 4000
    key = jax.random.key(5)
    # Per-draw values (num_samples=1 each) give both the mean and its standard error.
    one = losses.NoiseLoss(site=site, noise=law)
    draws = _jit(jax.vmap(lambda k: one(pm.structure, pm.params, pm.rest, x, y, k)))(
        jax.random.split(key, n))
    mean, se = jnp.mean(draws, 0), jnp.std(draws, 0, ddof=1) / math.sqrt(n)
    pred = _call(losses.LinearizedPenalty(site=site, noise=law), pm.structure, pm.params,
                 pm.rest, x, y, key)
    if site == "h1":  # the term is the estimator's rms², exactly
        np.testing.assert_allclose(
            np.asarray(pred), np.asarray(js.linearized(pm, x, site=site, noise=law).rms**2),
            rtol=1e-10)
    assert bool(jnp.all(jnp.abs(mean - pred) <= Z * se)), (mean, pred, se)
    assert bool(jnp.all(se < 0.1 * pred))
    # The batched term with num_samples draws is the mean of its draws.


def test_noise_loss_ratio_to_linearized_tends_to_one_for_small_noise(x64):
    # Smooth nonlinear net: E‖ΔF‖² = tr(JCJᵀ)(1 + O(ε)); at ε = 1e-3 the bias is far below
    # the Monte Carlo error bound Z·se, allowed an extra 50·ε for the O(ε) term.
    model = _mlp(jnp.float64, activation="tanh", widths=(8, 8))
    pm, x, y = _setup(model, batch=3)
    eps, n = 1e-3, 4000
    law = nz.RelativeNorm(eps)
    one = losses.NoiseLoss(site="h0", noise=law)
    draws = _jit(jax.vmap(lambda k: one(pm.structure, pm.params, pm.rest, x, y, k)))(
        jax.random.split(jax.random.key(9), n))
    ratio = jnp.mean(draws, 0) / _call(losses.LinearizedPenalty(site="h0", noise=law),
                                       pm.structure, pm.params, pm.rest, x, y, None)
    rel_se = jnp.std(draws, 0, ddof=1) / math.sqrt(n) / jnp.mean(draws, 0)
    assert bool(jnp.all(jnp.abs(ratio - 1) <= Z * rel_se + 50 * eps)), (ratio, rel_se)


def test_noise_loss_weight_site_shares_one_draw_across_the_batch(x64):
    pm, x, y = _setup(_mlp(jnp.float64), batch=4)
    site, law = "layers/1/kernel", nz.WeightRelative(0.3)
    key = jax.random.key(4)
    got = _call(losses.NoiseLoss(site=site, noise=law), pm.structure, pm.params, pm.rest, x, y,
                key)

    @_jit
    def manual(params):
        delta = law.sample(jax.random.split(key, 1)[0], pm.with_params(params).param(site))
        out = pm.structure.apply(params, pm.rest, x, {site: delta}) - pm.structure.apply(
            params, pm.rest, x)
        return jnp.sum(out**2, -1)

    np.testing.assert_allclose(np.asarray(got), np.asarray(manual(pm.params)), rtol=1e-10)


def test_noise_loss_ce_target_is_the_noisy_cross_entropy(x64):
    pm, x, y = _setup(_mlp(jnp.float64), batch=4)
    clean = _call(losses.CrossEntropy(), pm.structure, pm.params, pm.rest, x, y, None)
    zero = _call(losses.NoiseLoss(site="input", noise=nz.Absolute(0.0), target="ce"),
                 pm.structure, pm.params, pm.rest, x, y, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(zero), np.asarray(clean), rtol=1e-12)
    logits = _jit(pm.structure.apply)(pm.params, pm.rest, x)
    want = -jax.nn.log_softmax(logits)[jnp.arange(4), y]
    np.testing.assert_allclose(np.asarray(clean), np.asarray(want), rtol=1e-12)


def test_total_loss_weights_terms_and_names_repeats():
    pm, x, y = _setup(_mlp())
    key = jax.random.key(0)
    terms = [(1.0, losses.CrossEntropy()), (0.5, losses.JacobianPenalty()),
             (0.25, losses.JacobianPenalty(num_projections=2))]

    @_jit
    def both(p):
        total, parts = losses.total_loss(terms, pm.structure, p, pm.rest, x, y, key)
        per = losses.WeightedSum(tuple(terms))(pm.structure, p, pm.rest, x, y, key)
        return total, parts, per

    total, parts, per = both(pm.params)
    assert list(parts) == ["cross_entropy", "jacobian", "jacobian_1"]
    want = parts["cross_entropy"] + 0.5 * parts["jacobian"] + 0.25 * parts["jacobian_1"]
    np.testing.assert_allclose(float(total), float(want), rtol=1e-6)
    assert per.shape == (4,)
    np.testing.assert_allclose(float(jnp.mean(per)), float(total), rtol=1e-6)
    # A bare term counts with weight 1.
    assert losses.WeightedSum((losses.CrossEntropy(),)).terms == ((1.0, losses.CrossEntropy()),)


def test_total_loss_compiles_once():
    pm, x, y = _setup(_mlp())
    traces = []

    @_jit
    def f(params, x, key):
        traces.append(1)
        return losses.total_loss([losses.JacobianPenalty()], pm.structure, params, pm.rest,
                                 x, y, key)[0]

    for seed in range(3):
        f(pm.params, x + seed, jax.random.key(seed))
    assert len(traces) == 1


# --------------------------------------------------------------------------- registry
@pytest.mark.parametrize(
    ("name", "kwargs", "cls"),
    [
        ("cross_entropy", {}, losses.CrossEntropy),
        ("noise", {"site": "h0", "noise": {"law": "relative_norm", "level": 0.05}},
         losses.NoiseLoss),
        ("jacobian", {"num_projections": 2}, losses.JacobianPenalty),
        ("linearized", {"site": "input", "noise": nz.Absolute(0.1)}, losses.LinearizedPenalty),
        ("expected_gaussian", {"sigma": 0.1}, losses.ExpectedGaussianLoss),
        ("adversarial", {"eps": 0.1}, losses.AdversarialInputLoss),
        ("weight_margin", {"eps": 0.01, "layers": [0]}, losses.WeightMarginLoss),
        ("linf_norm", {}, losses.LinfNormPenalty),
        ("theory", {"lam": 0.3, "mu": 0.01}, losses.TheoryLoss),
    ],
)
def test_make_loss_builds_every_registered_term(name, kwargs, cls):
    assert set(losses.LOSSES) == {"cross_entropy", "noise", "jacobian", "linearized",
                                  "expected_gaussian", "adversarial", "weight_margin",
                                  "linf_norm", "theory"}
    term = losses.make_loss(name, **kwargs)
    assert isinstance(term, cls) and term.name == name


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: losses.make_loss("hinge"),
         "valid: cross_entropy, noise, jacobian, linearized, expected_gaussian, adversarial"),
        (lambda: losses.make_loss("jacobian", projections=2), r"unknown argument.*projections"),
        (lambda: losses.make_loss("noise", site="h0"), r"needs argument.*noise"),
        (lambda: losses.make_loss("noise", site="h0", noise={"law": "laplace"}),
         "unknown noise law 'laplace'"),
        (lambda: losses.NoiseLoss(site="h0", noise=nz.Absolute(0.1), target="kl"),
         "target must be"),
        (lambda: losses.NoiseLoss(site="h0", noise=0.1), "noise must be a law"),
        (lambda: losses.JacobianPenalty(num_projections=0), "num_projections must be"),
    ],
)
def test_bad_configuration_raises_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_law_that_does_not_apply_to_the_site_is_rejected():
    pm, x, y = _setup(_mlp())
    term = losses.NoiseLoss(site="h0", noise=nz.WeightRelative(0.1))
    with pytest.raises(ValueError, match="cannot be used at activation site 'h0'"):
        _call(term, pm.structure, pm.params, pm.rest, x, y, jax.random.key(0))
    with pytest.raises(ValueError, match="not a site of this model"):
        _call(losses.JacobianPenalty(site="h9"), pm.structure, pm.params, pm.rest, x, y,
              jax.random.key(0))


def test_adversarial_input_loss_ascends_and_holds_the_attack_fixed(x64):
    from jaxsens import losses as L

    model = js.models.MLP(6, [8], 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    pm = js.split(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 6)))
    y = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
    key = jax.random.key(1)
    ce = L.CrossEntropy()(pm.structure, pm.params, pm.rest, x, y, key)
    zero = L.make_loss("adversarial", eps=0.0)(pm.structure, pm.params, pm.rest, x, y, key)
    np.testing.assert_allclose(zero, ce, rtol=1e-12)
    term = L.make_loss("adversarial", eps=0.3, steps=10)
    adv = term(pm.structure, pm.params, pm.rest, x, y, key)
    assert np.all(np.asarray(adv) >= np.asarray(ce) - 1e-12) and float(jnp.mean(adv - ce)) > 0
    # Its gradient is CE's at the (fixed) adversarial inputs: no gradient through δ*.
    def ce_at(p, xx):
        return L.CrossEntropy()(pm.structure, p, pm.rest, xx, y, key)

    delta = 0.3 * jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    for _ in range(10):
        step = jnp.sign(jax.grad(lambda d: jnp.sum(ce_at(pm.params, x + d)))(delta))
        delta = jnp.clip(delta + 0.4 * 0.3 * step, -0.3, 0.3)
    np.testing.assert_allclose(adv, ce_at(pm.params, x + delta), rtol=1e-12)
    g = jax.grad(lambda p: jnp.mean(term(pm.structure, p, pm.rest, x, y, key)))(pm.params)
    want = jax.grad(lambda p: jnp.mean(ce_at(p, x + delta)))(pm.params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="adversarial eps must be a finite number >= 0"):
        L.make_loss("adversarial", eps=-1.0)
