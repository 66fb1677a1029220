"""Certified bounds are never exceeded: by sampling at large ε, and by gradient attacks.

For bounded laws (``almost_sure=True``) every draw must stay below the bound; the attack —
projected gradient ascent on the perturbation inside the norm ball the bound assumes,
several random starts — must stay below it too, and must beat random sampling (so it is a
real attack). For Gaussian laws the bound bounds the root mean square only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsens as js
from jaxsens import noise

LEVELS = (0.5, 1.0)
NUM_SAMPLES = 256
ROUNDING = 1e-9  # float64 rounding allowance in "≤ bound"


@pytest.fixture
def build(x64, make_mlp, make_lenet):
    """``build(model_id) -> (model, x)`` for the models the bounds are tested on."""

    def make(model_id):
        rng = np.random.default_rng(1)
        if model_id == "lenet":
            return make_lenet(), jnp.asarray(rng.uniform(0, 1, (2, 16, 16, 1)))
        act = model_id.split("-")[1]
        return make_mlp(6, [16, 12], 4, activation=act), jnp.asarray(
            rng.standard_normal((3, 6)))

    return make


def _sphere():
    return noise.RelativeNorm(1.0)


def _weight(norm):
    return lambda: noise.WeightRelative(1.0, norm=norm)


# (model, site, law at level 1); all laws here are bounded (almost-sure radius).
AS_CASES = [
    ("mlp-relu", "input", _sphere),
    ("mlp-relu", "h0", _sphere),
    ("mlp-relu", "h1", _sphere),
    ("mlp-relu", "layers/1/kernel", _weight("frobenius")),
    ("mlp-tanh", "input", _sphere),
    ("mlp-tanh", "layers/0/kernel", _weight("spectral")),
    ("mlp-sigmoid", "h0", _sphere),
    ("mlp-sigmoid", "layers/1/kernel", _weight("linf")),
    ("mlp-gelu", "input", _sphere),
    ("mlp-gelu", "h0", _sphere),
    ("lenet", "c0", _sphere),
    ("lenet", "convs/1/kernel", _weight("frobenius")),
    ("lenet", "convs/0/bias", _weight("spectral")),
    ("lenet", "dense/0/kernel", _weight("linf")),
]


def _ids(cases):
    return [f"{m}-{s}" for m, s, *_ in cases]


def _sampled_max(model, x, site, law):
    s = js.sampled(model, x, site=site, noise=law, key=jax.random.key(5),
                   num_samples=NUM_SAMPLES, quantiles=(1.0,))
    return np.asarray(s.quantiles[:, 0])


@pytest.mark.parametrize(("model_id", "site", "make_law"), AS_CASES, ids=_ids(AS_CASES))
def test_bound_holds_for_every_sampled_draw(build, model_id, site, make_law):
    model, x = build(model_id)
    for eps in LEVELS:
        law = make_law().with_level(eps)
        b = js.bound(model, x, site=site, noise=law)
        assert b.almost_sure and b.estimator == "bound"
        worst = _sampled_max(model, x, site, law)
        assert np.all(worst > 0)
        np.testing.assert_array_less(worst, np.asarray(b.upper) * (1 + ROUNDING))


GAUSSIAN_CASES = [
    ("mlp-relu", "input", lambda: noise.Absolute(1.0)),
    ("mlp-relu", "h0", lambda: noise.RelativeNorm(1.0, reading="gaussian")),
    ("mlp-relu", "layers/0/kernel", lambda: noise.Multiplicative(1.0)),
    ("lenet", "c1", lambda: noise.Multiplicative(1.0)),
]


@pytest.mark.parametrize(("model_id", "site", "make_law"), GAUSSIAN_CASES,
                         ids=_ids(GAUSSIAN_CASES))
def test_bound_holds_for_the_rms_of_gaussian_laws(build, model_id, site, make_law):
    model, x = build(model_id)
    for eps in LEVELS:
        law = make_law().with_level(eps)
        b = js.bound(model, x, site=site, noise=law)
        assert not b.almost_sure
        s = js.sampled(model, x, site=site, noise=law, key=jax.random.key(6),
                       num_samples=NUM_SAMPLES, quantiles=(1.0,))
        np.testing.assert_array_less(np.asarray(s.rms), np.asarray(b.upper))


@pytest.mark.parametrize("name", sorted(js.models.ACTIVATIONS))
def test_activation_lipschitz_constants_are_sound_and_tight(x64, name):
    """The bound's constants: max |σ'| over a fine grid is ≤ L and within 1e-3 of it."""
    fn, lipschitz = js.models.ACTIVATIONS[name]
    grid = jnp.linspace(-8.0, 8.0, 160_001)
    slope = float(jnp.max(jnp.abs(jax.jit(jax.vmap(jax.grad(fn)))(grid))))
    assert slope <= lipschitz
    assert slope >= lipschitz * (1 - 1e-3)


# --------------------------------------------------------------------------- attacks
def _pgd_attack(pm, x, site, radius, key, *, steps=200, starts=4):
    """max ‖F(x; site + d) − F(x)‖ over ‖d‖₂ ≤ radius, per example, by projected ascent.

    Normalised-gradient steps with a linearly decaying size (from 0.3·radius), projected
    back onto the ball; ``starts`` random starting points on the sphere, best one kept.
    """
    struct, params, rest = pm.structure, pm.params, pm.rest
    info = pm.site(site)
    shape = info.shape

    def gain(x1, d):
        clean = struct.apply_one(params, rest, x1)
        return jnp.sum(jnp.square(struct.apply_one(params, rest, x1, {site: d}) - clean))

    def ascend(x1, r, k):
        d = jax.random.normal(k, shape, x1.dtype)
        d = d * r / jnp.linalg.norm(d)

        def step(d, t):
            g = jax.grad(gain, argnums=1)(x1, d)
            size = r * (0.3 * (1.0 - t / steps) + 0.003)
            d = d + size * g / (jnp.linalg.norm(g) + 1e-300)
            return d * jnp.minimum(1.0, r / jnp.linalg.norm(d)), None

        d, _ = jax.lax.scan(step, d, jnp.arange(steps, dtype=x1.dtype))
        assert d.shape == shape
        return jnp.sqrt(gain(x1, d)), jnp.linalg.norm(d)

    keys = jax.random.split(key, x.shape[0] * starts).reshape(x.shape[0], starts)
    run = jax.jit(jax.vmap(lambda x1, r, ks: jax.vmap(lambda k: ascend(x1, r, k))(ks)))
    values, norms = (np.asarray(a) for a in run(x, radius, keys))
    assert np.max(norms / np.asarray(radius)[:, None]) <= 1 + 1e-9  # stayed inside the ball
    return np.max(values, axis=1)


def _values(pm, x):
    """``js.activations``, jitted (eager execution would compile every op separately)."""
    return jax.jit(lambda p, x: pm.with_params(p).apply_with_values(x)[1])(pm.params, x)


ATTACK_CASES = [
    ("mlp-relu", "input", _sphere),
    ("mlp-relu", "h0", _sphere),
    ("mlp-relu", "h1", _sphere),
    ("mlp-relu", "layers/1/kernel", _weight("frobenius")),
    ("mlp-gelu", "h0", _sphere),
    ("lenet", "c0", _sphere),
    ("lenet", "convs/1/kernel", _weight("frobenius")),
]


@pytest.mark.parametrize(("model_id", "site", "make_law"), ATTACK_CASES,
                         ids=_ids(ATTACK_CASES))
def test_gradient_attack_never_exceeds_bound(build, model_id, site, make_law):
    model, x = build(model_id)
    pm = js.split(model)
    eps = LEVELS[0]
    law = make_law().with_level(eps)
    info = pm.site(site)
    if info.kind == "weight":
        # The ball ‖Δ‖_F ≤ ε‖W‖_F of the Frobenius law (‖Δ‖₂ ≤ ‖Δ‖_F is what the bound uses).
        radius = np.full((x.shape[0],), eps * np.linalg.norm(pm.param(site)))
    else:
        v = np.asarray(x if site == "input" else _values(pm, x)[site])
        radius = eps * np.linalg.norm(v.reshape(v.shape[0], -1), axis=1)
    upper = np.asarray(js.bound(model, x, site=site, noise=law).upper)
    attack = _pgd_attack(pm, x, site, jnp.asarray(radius), jax.random.key(9))
    np.testing.assert_array_less(attack, upper * (1 + ROUNDING))
    # A real attack: it beats the worst of 256 random draws on the same sphere.
    np.testing.assert_array_less(_sampled_max(model, x, site, law), attack)
    if site == "h1":
        # After the last hidden layer the network is linear: the Lipschitz bound
        # ‖W‖₂‖η‖ is attained along the top singular vector, and the attack finds it.
        np.testing.assert_allclose(attack, upper, rtol=1e-3)
