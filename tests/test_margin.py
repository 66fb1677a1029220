"""Weight-perturbation margin bounds: sound against random and attacked perturbations,
tight where it must be, ordered (data ≤ product), zero at ε = 0, overflow-free, and
differentiable as a training loss. Float64 throughout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jaxsens as js
from jaxsens import bounds, losses


def _net(depth, seed, *, activation="relu", width=7, din=5, k=4, scale=1.0,
         dtype=jnp.float64):
    def make():
        return js.models.MLP(din, [width] * (depth - 1), k, activation=activation,
                             param_dtype=dtype, rngs=nnx.Rngs(0))

    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        s = 0.3 if leaf.ndim == 1 else scale / np.sqrt(leaf.shape[0])
        return jnp.asarray(rng.standard_normal(leaf.shape) * s, leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


def _data(n, din, k, seed):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((n, din))),
            jnp.asarray(rng.integers(0, k, n), jnp.int32))


def _margins(model, x, y, deltas=None):
    pm = js.split(model)
    out = pm.apply(x, deltas)
    return jnp.take_along_axis(out, y[:, None], axis=1) - out


CASES = [  # depth, activation, layers, eps, relative, input_eps
    (1, "relu", [0], 0.1, False, 0.0),
    (2, "relu", [0], 0.05, True, 0.0),
    (2, "tanh", [1], 0.2, False, 0.05),
    (3, "relu", [0, 2], (0.03, 0.1), True, 0.0),
    (3, "sigmoid", [1], 0.3, False, 0.1),
    (4, "relu", [0, 1, 2, 3], 0.02, True, 0.02),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_bound_is_never_violated(x64, case):
    depth, act, layers, eps, relative, input_eps = CASES[case]
    model = _net(depth, seed=case, activation=act)
    x, y = _data(6, 5, 4, seed=case)
    eps_arr = jnp.asarray(eps)
    data = bounds.weight_margin_bound(model, x, y, eps=eps_arr, layers=layers,
                                      relative=relative, input_eps=input_eps)
    prod = bounds.weight_margin_bound(model, x, y, eps=eps_arr, layers=layers,
                                      relative=relative, form="product", input_eps=input_eps)
    assert data.shape == (6, 4) and np.all(np.asarray(data)[np.arange(6), np.asarray(y)] == 0)
    assert np.all(np.asarray(data) <= np.asarray(prod) * (1 + 1e-12))  # data never looser
    clean = _margins(model, x, y)
    worst = np.zeros((6, 4))
    key = jax.random.key(case)
    for i in range(200):  # random perturbations on the budget's boundary, with the input
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        deltas = bounds.random_weight_perturbation(model, k1, eps=eps_arr, layers=layers,
                                                   relative=relative)
        deltas["input"] = input_eps * jax.random.rademacher(k2, x.shape, x.dtype)
        change = np.abs(np.asarray(_margins(model, x, y, deltas) - clean))
        worst = np.maximum(worst, change)
    assert np.all(worst <= np.asarray(data) * (1 + 1e-9)), (worst, data)
    assert worst.max() > 0
    if input_eps == 0.0:
        attack = np.asarray(bounds.weight_attack(model, x, y, eps=eps_arr, layers=layers,
                                                 relative=relative, steps=40))
        assert np.all(attack <= np.asarray(data) * (1 + 1e-9))
        assert np.all(attack >= worst * (1 - 1e-9) - 1e-12) or attack.max() >= worst.max()
        # The attack is stronger than random draws (margin drops only).
        assert attack.max() >= 0.5 * worst.max()


def test_last_layer_worst_case_attains_the_data_bound(x64):
    """Only the last layer moves: ±ε on rows y and j at argmax|h| gives exactly Γ_j, and
    the attack (its Frank–Wolfe start) finds it."""
    model = _net(3, seed=7)
    x, y = _data(5, 5, 4, seed=7)
    eps = 0.07
    gamma = np.asarray(bounds.weight_margin_bound(model, x, y, eps=eps, layers=[2]))
    pm = js.split(model)
    _, vals = pm.apply_with_values(x)
    h = np.asarray(vals["h1"])
    clean = np.asarray(_margins(model, x, y))
    for b in range(5):
        i = int(np.argmax(np.abs(h[b])))
        for j in range(4):
            if j == int(y[b]):
                continue
            delta = np.zeros((7, 4))
            delta[i, int(y[b])] -= eps * np.sign(h[b, i])
            delta[i, j] += eps * np.sign(h[b, i])
            m = np.asarray(_margins(model, x[b:b + 1], y[b:b + 1],
                                    {"layers/2/kernel": jnp.asarray(delta)}))
            np.testing.assert_allclose(clean[b, j] - m[0, j], gamma[b, j], rtol=1e-12)
    attack = np.asarray(bounds.weight_attack(model, x, y, eps=eps, layers=[2], steps=5))
    np.testing.assert_allclose(attack, gamma, rtol=1e-10, atol=1e-14)


def test_zero_budget_gives_zero_and_product_form_is_the_closed_form(x64):
    model = _net(3, seed=3)
    x, y = _data(4, 5, 4, seed=3)
    g = bounds.weight_margin_bound(model, x, y, eps=0.0, layers=[0, 1, 2])
    assert np.all(np.asarray(g) == 0)
    # Bias-free ReLU net: ‖x‖_∞ [(‖u‖_1 + 2ε_d) Π_{k<d}(a_k + ε_k) − ‖u‖_1 Π_{k<d} a_k].
    pm = js.split(model)
    params = jax.tree.map(lambda a: a * (a.ndim > 1), pm.params)  # zero the biases
    pm0 = pm.with_params(params)
    eps = (0.02, 0.05, 0.03)
    g = np.asarray(bounds.weight_margin_bound(pm0, x, y, eps=jnp.asarray(eps),
                                              layers=[0, 1, 2], form="product"))
    ks = [np.asarray(pm0.param(f"layers/{i}/kernel")) for i in range(3)]
    a = [np.abs(kk).sum(axis=0).max() for kk in ks]
    xn = np.abs(np.asarray(x)).max(axis=1)
    for b in range(4):
        for j in range(4):
            if j == int(y[b]):
                continue
            u = np.abs(ks[2][:, int(y[b])] - ks[2][:, j]).sum()
            want = xn[b] * ((u + 2 * eps[2]) * (a[0] + eps[0]) * (a[1] + eps[1])
                            - u * a[0] * a[1])
            np.testing.assert_allclose(g[b, j], want, rtol=1e-10)


def test_deep_networks_do_not_overflow(x64):
    """40 layers with ‖W‖_∞ ≈ 30 each: the product is 1e59 — fine in float64 but it
    overflows float32; the log-space recursion gives a finite float32 bound that equals
    the float64 one where both exist."""
    model = _net(40, seed=1, width=6, scale=12.0)
    x, y = _data(2, 5, 4, seed=1)
    g64 = np.asarray(bounds.weight_margin_bound(model, x, y, eps=0.01, layers=[0, 39],
                                                relative=True, form="product"))
    assert np.all(np.isfinite(g64)) and g64.max() > 1e30
    with jax.enable_x64(False):
        m32 = _net(40, seed=1, width=6, scale=12.0, dtype=jnp.float32)
        log = jnp.log(bounds.weight_margin_bound(m32, np.asarray(x, np.float32),
                                                 np.asarray(y), eps=0.01, layers=[0, 39],
                                                 relative=True, form="product"))
    off = np.arange(4)[None, :] != np.asarray(y)[:, None]
    big = g64 < 3e38
    np.testing.assert_allclose(np.asarray(log)[off & big], np.log(g64[off & big]), rtol=1e-4)
    assert not np.any(np.isnan(np.asarray(log)))


def test_certified_accuracy_and_loss_change_bound(x64):
    model = _net(2, seed=4)
    x, y = _data(30, 5, 4, seed=4)
    pm = js.split(model)
    pred = jnp.argmax(pm.apply(x), axis=1)
    clean_acc = float(jnp.mean((pred == y).astype(jnp.float32)))
    accs = [float(bounds.certified_accuracy(model, x, y, eps=e, layers=[0, 1], relative=True))
            for e in (0.0, 0.01, 0.1, 1.0)]
    assert accs[0] == pytest.approx(clean_acc) and accs == sorted(accs, reverse=True)
    assert accs[-1] < accs[0]
    # The CE rise bound holds for random joint perturbations.
    rise = np.asarray(bounds.loss_change_bound(model, x, y, eps=0.05, layers=[0, 1],
                                               relative=True, input_eps=0.02))

    def ce(deltas=None):
        out = pm.apply(x, deltas)
        return np.asarray(jax.nn.logsumexp(out, axis=1) - out[jnp.arange(30), y])

    base = ce()
    for i in range(50):
        k1, k2 = jax.random.split(jax.random.key(i))
        d = bounds.random_weight_perturbation(model, k1, eps=0.05, layers=[0, 1], relative=True)
        d["input"] = 0.02 * jax.random.rademacher(k2, x.shape, x.dtype)
        assert np.all(ce(d) - base <= rise + 1e-12)
    acc = bounds.accuracy_under_weight_noise(model, x, y, eps=0.2, layers=[0, 1],
                                             relative=True, key=jax.random.key(0), samples=5,
                                             attack_steps=20)
    assert acc["clean"] == pytest.approx(clean_acc)
    assert acc["attacked"] <= acc["random"] + 1e-9 and acc["attacked"] <= acc["clean"]


def test_l1_projection_is_exact(x64):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((6, 9)) * 2
    r = 1.5
    p = np.asarray(bounds.project_l1_ball(v, r, axis=0))
    for c in range(9):
        col = v[:, c]
        if np.abs(col).sum() <= r:
            np.testing.assert_array_equal(p[:, c], col)
            continue
        # The projection is soft-thresholding at the θ with ‖·‖_1 = r (bisection).
        lo, hi = 0.0, np.abs(col).max()
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.maximum(np.abs(col) - mid, 0).sum() > r else (lo, mid)
        want = np.sign(col) * np.maximum(np.abs(col) - lo, 0)
        np.testing.assert_allclose(p[:, c], want, atol=1e-12)
        assert np.abs(p[:, c]).sum() == pytest.approx(r)


def test_models_that_are_not_dense_chains_are_refused(x64, make_lenet):
    lenet = make_lenet(seed=0)
    x = jnp.zeros((2, 16, 16, 1))
    with pytest.raises(ValueError) as err:
        bounds.weight_margin_bound(lenet, x, jnp.zeros(2, jnp.int32), eps=0.1, layers=[0])
    msg = str(err.value)
    assert "\n" not in msg and "conv_general_dilated" in msg and "dense layers" in msg
    model = _net(2, seed=0)
    with pytest.raises(ValueError, match="layers must be distinct indices of the 2 dense"):
        bounds.weight_margin_bound(model, jnp.zeros((1, 5)), jnp.zeros(1, jnp.int32), eps=0.1,
                                   layers=[2])
    with pytest.raises(ValueError, match="form='tight'"):
        bounds.weight_margin_bound(model, jnp.zeros((1, 5)), jnp.zeros(1, jnp.int32), eps=0.1,
                                   layers=[0], form="tight")  # type: ignore[arg-type]


def test_theory_loss_is_differentiable_and_trains(x64):
    model = _net(3, seed=5)
    x, y = _data(8, 5, 4, seed=5)
    pm = js.split(model)
    term = losses.make_loss("weight_margin", eps=0.02, layers=[0, 2], relative=True)
    norm = losses.make_loss("linf_norm")
    term.check(pm.structure)

    def loss(params):
        return jnp.mean(term(pm.structure, params, pm.rest, x, y, jax.random.key(0))) + \
            0.1 * jnp.mean(norm(pm.structure, params, pm.rest, x, y, jax.random.key(0)))

    check_grads(loss, (pm.params,), order=1, modes=["rev"])
    # The hinge is the bound minus the margin where positive.
    gamma = bounds.weight_margin_bound(pm, x, y, eps=0.02, layers=[0, 2], relative=True)
    m = _margins(model, x, y)
    want = jnp.max(jnp.where(jax.nn.one_hot(y, 4, dtype=bool), 0.0,
                             jnp.maximum(gamma - m, 0.0)), axis=1)
    np.testing.assert_allclose(term(pm.structure, pm.params, pm.rest, x, y, jax.random.key(0)),
                               want, rtol=1e-12)
    raw = losses.make_loss("weight_margin", eps=0.02, layers=[0, 2], variant="raw")
    assert raw(pm.structure, pm.params, pm.rest, x, y, jax.random.key(0)).shape == (8,)
    with pytest.raises(ValueError, match="weight_margin: the weight-margin bound reads chains"):
        losses.make_loss("weight_margin").check(
            js.split(js.models.LeNet((8, 8, 1), 3, rngs=nnx.Rngs(0))).structure)
    with pytest.raises(ValueError, match="variant='soft'"):
        losses.make_loss("weight_margin", variant="soft")
    assert math.isfinite(float(loss(pm.params)))


def test_certified_radius_brackets_the_certificate(x64):
    model = _net(3, seed=6)
    x, y = _data(6, 5, 4, seed=6)
    pm = js.split(model)
    pred = jnp.argmax(pm.apply(x), axis=1)
    y = pred.at[0].set((pred[0] + 1) % 4)  # one misclassified example
    r = np.asarray(bounds.certified_radius(model, x, y, layers=[0, 2]))
    assert r[0] == 0 and np.all(r[1:] > 0)
    for i in range(1, 6):
        def cert(e, i=i):
            return float(bounds.certified_accuracy(model, x[i:i + 1], y[i:i + 1], eps=e,
                                                   layers=[0, 2], relative=True))
        assert cert(r[i] * (1 - 1e-6)) == 1.0 and cert(r[i] * (1 + 1e-6)) == 0.0


def test_generalization_term_matches_its_formula(x64):
    model = _net(3, seed=8)
    x, _ = _data(20, 5, 4, seed=8)
    pm = js.split(model)
    g0 = bounds.generalization_term(model, x)
    g1 = bounds.generalization_term(model, x, eps=0.05, layers=[1], relative=False)
    ks = [np.asarray(pm.param(f"layers/{i}/kernel")) for i in range(3)]
    bs = [np.asarray(pm.param(f"layers/{i}/bias")) for i in range(3)]
    radii = [np.sqrt((k**2).sum() + (b**2).sum() + (1.0 if i < 2 else 0.0))
             for i, (k, b) in enumerate(zip(ks, bs, strict=True))]
    bx = np.sqrt((np.asarray(x) ** 2).sum(axis=1).max() + 1)
    want = bx * (np.sqrt(2 * 3 * np.log(2)) + 1) * np.prod(radii) / np.sqrt(20)
    assert g0["complexity"] == pytest.approx(want, rel=1e-12)
    radii[1] += np.sqrt(ks[1].shape[1]) * 0.05
    assert g1["complexity"] == pytest.approx(
        bx * (np.sqrt(2 * 3 * np.log(2)) + 1) * np.prod(radii) / np.sqrt(20), rel=1e-12)
    with pytest.raises(ValueError, match="positive-homogeneous"):
        bounds.generalization_term(_net(2, seed=0, activation="tanh"), x)


def test_bound_estimator_uses_the_margin_recursion_for_linf_weight_noise(x64):
    """ℓ∞-operator weight noise on a dense chain: the protocol's bound is at most
    √k × the recursion's ‖ΔF‖_∞ bound, and still above every sampled draw."""
    model = _net(3, seed=9, width=12, k=6)
    x, _ = _data(5, 5, 6, seed=9)
    law = js.noise.WeightRelative(0.1, norm="linf")
    for layer in range(3):
        site = f"layers/{layer}/kernel"
        b = np.asarray(js.bound(model, x, site=site, noise=law).upper)
        linf = np.asarray(bounds.output_linf_bound(model, x, eps=0.1, layers=[layer],
                                                   relative=True))
        assert np.all(b <= np.sqrt(6) * linf * (1 + 1e-12))
        s = js.sampled(model, x, site=site, noise=law, key=jax.random.key(layer),
                       num_samples=300, quantiles=(1.0,))
        assert np.all(np.asarray(s.quantiles[:, 0]) <= b * (1 + 1e-9))


def test_fused_theory_loss_equals_its_three_terms(x64):
    model = _net(3, seed=10)
    x, y = _data(8, 5, 4, seed=10)
    pm = js.split(model)
    key = jax.random.key(0)
    fused = losses.make_loss("theory", eps=0.02, layers=[0, 2], lam=0.3, mu=0.01)
    fused.check(pm.structure)
    parts = [(1.0, losses.make_loss("cross_entropy")),
             (0.3, losses.make_loss("weight_margin", eps=0.02, layers=[0, 2])),
             (0.01, losses.make_loss("linf_norm"))]
    want = sum(w * t(pm.structure, pm.params, pm.rest, x, y, key) for w, t in parts)
    got = fused(pm.structure, pm.params, pm.rest, x, y, key)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    check_grads(lambda p: jnp.mean(fused(pm.structure, p, pm.rest, x, y, key)), (pm.params,),
                order=1, modes=["rev"])
    with pytest.raises(ValueError, match="theory lam must be a finite number >= 0"):
        losses.make_loss("theory", lam=-1.0)
