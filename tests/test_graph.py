"""Bring your own model: bounds and moments read from the model's traced computation.

Four user-written architectures (built here, as a researcher would): a residual MLP with
LayerNorm and gelu, the same without LayerNorm, a CNN with BatchNorm, Dropout and
max-pooling, a small attention block, and an MLP with tanh and swish. The certified bound
must hold against sampling *and* a gradient attack wherever it is given, equal the
product of the layers' certified norms on the built-in MLP and LeNet, and be refused in
one line where no global Lipschitz constant exists. The moments must be exact where the
two-stage expansion is (a residual network that is affine around its ReLU site) and
match Monte Carlo on a residual CNN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsens as js
from jaxsens import graph, noise
from jaxsens.linalg import conv_operator_norm_bound, spectral_norm_bound


# --------------------------------------------------------------------------- models
class _Block(nnx.Module):
    def __init__(self, width, norm, rngs):
        self.norm = nnx.LayerNorm(width, param_dtype=jnp.float64, rngs=rngs) if norm else None
        self.lin1 = nnx.Linear(width, width, param_dtype=jnp.float64, rngs=rngs)
        self.lin2 = nnx.Linear(width, width, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, h):
        u = self.norm(h) if self.norm is not None else h
        u = self.perturb("act", jax.nn.gelu(self.lin1(u), approximate=False))
        return h + self.lin2(u)


class ResidualMLP(nnx.Module):
    """inp → [h + lin2(gelu(lin1(norm(h))))] × depth → out, sites inside each block."""

    def __init__(self, *, norm: bool, d=5, width=6, k=3, depth=2, rngs):
        self.inp = nnx.Linear(d, width, param_dtype=jnp.float64, rngs=rngs)
        self.blocks = nnx.List([_Block(width, norm, rngs) for _ in range(depth)])
        self.out = nnx.Linear(width, k, param_dtype=jnp.float64, rngs=rngs)
        self.input_shape = (d,)

    def __call__(self, x):
        h = self.perturb("embed", self.inp(x))
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class ConvNet(nnx.Module):
    """conv → BatchNorm → relu → max-pool → dropout → conv (stride 2) → relu → dense."""

    def __init__(self, rngs):
        f64 = jnp.float64
        self.conv1 = nnx.Conv(1, 3, (3, 3), padding="SAME", param_dtype=f64, rngs=rngs)
        self.bn = nnx.BatchNorm(3, param_dtype=f64, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.conv2 = nnx.Conv(3, 4, (3, 3), strides=(2, 2), padding="SAME", param_dtype=f64,
                              rngs=rngs)
        self.dense = nnx.Linear(2 * 2 * 4, 3, param_dtype=f64, rngs=rngs)
        self.input_shape = (8, 8, 1)

    def __call__(self, x):
        h = self.perturb("c1", jax.nn.relu(self.bn(self.conv1(x))))
        h = self.drop(nnx.max_pool(h, (2, 2), strides=(2, 2)))
        h = self.perturb("p", h)
        h = self.perturb("c2", jax.nn.relu(self.conv2(h)))
        return self.dense(h.reshape(h.shape[0], -1))


class Attention(nnx.Module):
    """One self-attention block over 4 tokens of width 6, then a linear read-out."""

    def __init__(self, rngs):
        f64 = jnp.float64
        self.q = nnx.Linear(6, 6, param_dtype=f64, rngs=rngs)
        self.k = nnx.Linear(6, 6, param_dtype=f64, rngs=rngs)
        self.v = nnx.Linear(6, 6, param_dtype=f64, rngs=rngs)
        self.out = nnx.Linear(24, 3, param_dtype=f64, rngs=rngs)
        self.input_shape = (4, 6)

    def __call__(self, x):
        x = self.perturb("tokens", x)
        scores = jnp.einsum("bqd,bkd->bqk", self.q(x), self.k(x)) / math.sqrt(6.0)
        h = self.perturb("mixed", jax.nn.softmax(scores, axis=-1) @ self.v(x))
        return self.out(h.reshape(h.shape[0], -1))


class SmoothMLP(nnx.Module):
    """tanh and swish activations."""

    def __init__(self, rngs):
        f64 = jnp.float64
        self.l1 = nnx.Linear(5, 7, param_dtype=f64, rngs=rngs)
        self.l2 = nnx.Linear(7, 7, param_dtype=f64, rngs=rngs)
        self.l3 = nnx.Linear(7, 3, param_dtype=f64, rngs=rngs)
        self.input_shape = (5,)

    def __call__(self, x):
        h = self.perturb("t", jnp.tanh(self.l1(x)))
        h = self.perturb("s", jax.nn.swish(self.l2(h)))
        return self.l3(h)


class ResidualCNN(nnx.Module):
    """relu(conv1(x)) marked as site "r"; out = dense(conv2(r) + x) (affine around r), or
    dense(relu(conv2(r) + x)) when ``head_relu``."""

    def __init__(self, rngs, head_relu=False):
        f64 = jnp.float64
        self.conv1 = nnx.Conv(1, 3, (3, 3), padding="SAME", param_dtype=f64, rngs=rngs)
        self.conv2 = nnx.Conv(3, 1, (3, 3), padding="SAME", param_dtype=f64, rngs=rngs)
        self.dense = nnx.Linear(36, 3, param_dtype=f64, rngs=rngs)
        self.head_relu = head_relu
        self.input_shape = (6, 6, 1)

    def __call__(self, x):
        r = self.perturb("r", jax.nn.relu(self.conv1(x)))
        y = self.conv2(r) + x
        if self.head_relu:
            y = jax.nn.relu(y)
        return self.dense(y.reshape(y.shape[0], -1))


def _randomize(model, seed, *, scale=1.0):
    """NumPy-drawn parameters (kernels N(0, scale²/fan_in), biases N(0, 0.1²)), BatchNorm
    statistics away from (0, 1), inference mode."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(seed)

    def draw(leaf):
        s = 0.1 if leaf.ndim == 1 else scale / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape) * s, leaf.dtype)

    model = nnx.merge(graphdef, jax.tree.map(draw, params), rest)
    for _, sub in nnx.iter_modules(model):
        if isinstance(sub, nnx.BatchNorm):
            n = sub.mean.shape[0]
            sub.mean.set_value(jnp.asarray(rng.standard_normal(n) * 0.3))
            sub.var.set_value(jnp.asarray(rng.uniform(0.2, 2.0, n)))
            sub.scale.set_value(jnp.asarray(rng.uniform(-2.0, 2.0, n)))
    model.eval()
    return model


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


# --------------------------------------------------------------------------- attacks
def _attack(pm, x, site, radius, *, steps=60, starts=4, seed=0):
    """Projected gradient ascent of ‖F(v + η) − F(v)‖ over ‖η‖ = radius, per example;
    the largest value found (a lower bound on the worst case)."""
    struct, params, rest = pm.structure, pm.params, pm.rest
    shape = pm.site(site).shape

    def one(x1, r, key):
        clean = struct.apply_one(params, rest, x1)

        def gain(eta):
            return jnp.sum((struct.apply_one(params, rest, x1, {site: eta}) - clean) ** 2)

        def project(eta):
            return r * eta / jnp.linalg.norm(eta)

        def ascend(eta, _):
            g = jax.grad(gain)(eta)
            return project(eta + 0.5 * r * g / (jnp.linalg.norm(g) + 1e-30)), None

        def run(k):
            eta0 = project(jax.random.normal(k, shape, x1.dtype))
            eta, _ = jax.lax.scan(ascend, eta0, None, length=steps)
            return jnp.sqrt(gain(eta))

        return jnp.max(jax.vmap(run)(jax.random.split(key, starts)))

    keys = jax.random.split(jax.random.key(seed), x.shape[0])
    return jax.jit(jax.vmap(one))(x, radius, keys)


def _site_norms(pm, x, site):
    v = x if site == "input" else pm.apply_with_values(x)[1][site]
    return jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1)


def _check_bound_holds(model, x, sites, eps=0.3):
    """The bound holds for every sampled draw and against the gradient attack."""
    pm = js.split(model)
    law = noise.RelativeNorm(eps)  # sphere: ‖η‖ = ε‖v‖ exactly, so the bound is for all draws
    ratios = []
    for site in sites:
        b = js.bound(model, x, site=site, noise=law)
        assert bool(b.almost_sure)
        s = js.sampled(model, x, site=site, noise=law, key=jax.random.key(3), num_samples=200,
                       quantiles=(1.0,))
        upper = np.asarray(b.upper)
        assert np.all(np.asarray(s.quantiles[:, 0]) <= upper * (1 + 1e-9)), site
        attack = np.asarray(_attack(pm, x, site, eps * _site_norms(pm, x, site)))
        assert np.all(attack <= upper * (1 + 1e-9)), (site, attack, upper)
        assert np.all(attack >= np.asarray(s.quantiles[:, 0]) * (1 - 1e-6)), site  # it attacks
        ratios.append(float(np.max(attack / upper)))
    return ratios


# --------------------------------------------------------------------------- bounds
def test_bound_holds_on_residual_gelu_mlp_and_composes_branches(x64):
    model = _randomize(ResidualMLP(norm=False, rngs=nnx.Rngs(0)), 1)
    x = _x((3, 5))
    ratios = _check_bound_holds(model, x, ["input", "embed", "blocks/0/act", "blocks/1/act"])
    assert max(ratios) > 0.05  # not vacuous
    # The residual block is (1 + ‖W2‖·1.129·‖W1‖)-Lipschitz: branch constants add.
    pm = js.split(model)
    g = graph.read(pm.structure)
    w, r = graph.state_arrays(pm.structure, pm.params, pm.rest)
    norms = graph.operator_norms(g, w, r)
    L = graph.site_lipschitz(g, "blocks/1/act", norms)
    want = float(spectral_norm_bound(pm.param("out/kernel"))) * float(
        spectral_norm_bound(pm.param("blocks/1/lin2/kernel")))
    np.testing.assert_allclose(float(L), want, rtol=1e-12)
    L0 = graph.site_lipschitz(g, "embed", norms)
    blocks = [1 + float(spectral_norm_bound(pm.param(f"blocks/{i}/lin2/kernel")))
              * 1.1290 * float(spectral_norm_bound(pm.param(f"blocks/{i}/lin1/kernel")))
              for i in range(2)]
    np.testing.assert_allclose(float(L0), float(spectral_norm_bound(pm.param("out/kernel")))
                               * blocks[0] * blocks[1], rtol=1e-12)


def test_layernorm_and_attention_are_refused_in_one_line(x64):
    model = _randomize(ResidualMLP(norm=True, rngs=nnx.Rngs(0)), 2)
    x = _x((2, 5))
    law = noise.RelativeNorm(0.1)
    with pytest.raises(ValueError) as err:
        js.bound(model, x, site="embed", noise=law)
    msg = str(err.value)
    assert "\n" not in msg and "no certified bound at site 'embed'" in msg
    assert "test_graph.py" in msg and "self.norm(h)" in msg  # the model line that made it
    assert "'blocks/0/act'" not in msg.split("blocks the bound at sites")[1]
    assert "'input'" in msg and "sampled or linearized" in msg
    # After the last LayerNorm the bound exists, and holds.
    _check_bound_holds(model, x, ["blocks/1/act"])
    with pytest.raises(ValueError, match="blocks/0/act"):
        js.bound(model, x, site="blocks/0/act", noise=law)
    # profile says why, per site, instead of dropping the rows.
    prof = js.profile(model, x, noise=law, levels=[0.1], sites=["embed", "blocks/1/act"],
                      estimators=("linearized", "bound"))
    assert prof.present == ((True, False), (True, True))
    assert "LayerNorm" in prof.reasons[0][1] or "norm" in prof.reasons[0][1]

    att = _randomize(Attention(nnx.Rngs(0)), 3)
    xa = _x((2, 4, 6))
    with pytest.raises(ValueError) as err:
        js.bound(att, xa, site="tokens", noise=law)
    msg = str(err.value)
    assert "\n" not in msg and "'dot_general'" in msg and "attention" in msg
    # The read-out after the attention is linear: the bound exists there.
    _check_bound_holds(att, xa, ["mixed"])


def test_bound_holds_on_cnn_with_batchnorm_dropout_maxpool(x64):
    model = _randomize(ConvNet(nnx.Rngs(0)), 4)
    x = _x((3, 8, 8, 1))
    ratios = _check_bound_holds(model, x, ["input", "c1", "p", "c2"])
    assert max(ratios) > 0.05
    # BatchNorm in inference mode contributes its largest |scale / √(var + ε)|.
    pm = js.split(model)
    g = graph.read(pm.structure)
    w, r = graph.state_arrays(pm.structure, pm.params, pm.rest)
    norms = np.asarray(graph.operator_norms(g, w, r))
    bn = model.bn
    scale = np.abs(np.asarray(bn.scale.get_value()) / np.sqrt(np.asarray(bn.var.get_value())
                                                              + bn.epsilon))
    assert np.any(np.isclose(norms, scale.max(), rtol=1e-12))
    # Weight sites: the bound holds for every draw of a spectral-norm perturbation.
    law = noise.WeightRelative(0.2, norm="spectral")
    for site in ("conv1/kernel", "conv2/kernel", "bn/scale", "dense/bias"):
        b = js.bound(model, x, site=site, noise=law)
        s = js.sampled(model, x, site=site, noise=law, key=jax.random.key(5), num_samples=200,
                       quantiles=(1.0,))
        # (A bias feeding the output directly makes the bound tight: allow rounding.)
        assert np.all(np.asarray(s.quantiles[:, 0]) <= np.asarray(b.upper) * (1 + 1e-9)), site


def test_bound_holds_on_tanh_swish_mlp(x64):
    model = _randomize(SmoothMLP(nnx.Rngs(0)), 5, scale=2.0)
    x = _x((3, 5))
    _check_bound_holds(model, x, ["input", "t", "s"])
    pm = js.split(model)
    g = graph.read(pm.structure)
    w, r = graph.state_arrays(pm.structure, pm.params, pm.rest)
    L = graph.site_lipschitz(g, "t", graph.operator_norms(g, w, r))
    want = (float(spectral_norm_bound(pm.param("l3/kernel"))) * 1.0999
            * float(spectral_norm_bound(pm.param("l2/kernel"))))
    np.testing.assert_allclose(float(L), want, rtol=1e-12)


def test_bound_equals_the_layer_product_on_builtin_mlp_and_lenet(x64, make_mlp, make_lenet):
    """What the hand-written layer chains gave: the product of certified layer norms."""
    mlp = make_mlp(6, [8, 7], 3, seed=1)
    pm = js.split(mlp)
    x = _x((4, 6))
    law = noise.RelativeNorm(0.1)
    ws = [float(spectral_norm_bound(pm.param(f"layers/{i}/kernel"))) for i in range(3)]
    for site, factors in (("input", ws), ("h0", ws[1:]), ("h1", ws[2:])):
        b = js.bound(mlp, x, site=site, noise=law)
        np.testing.assert_allclose(np.asarray(b.upper), math.prod(factors) * 0.1
                                   * np.asarray(_site_norms(pm, x, site)), rtol=1e-12)
    lenet = make_lenet(seed=2)
    pm = js.split(lenet)
    x = _x((2, 16, 16, 1))
    convs = [float(conv_operator_norm_bound(pm.param(f"convs/{i}/kernel"))) for i in range(2)]
    dense = [float(spectral_norm_bound(pm.param(f"dense/{i}/kernel"))) for i in range(3)]
    # Each 2×2 average pool halves the norm at most.
    chain = {"input": [convs[0], 0.5, convs[1], 0.5, *dense], "c0": [convs[1], 0.5, *dense],
             "c1": dense, "h0": dense[1:], "h1": dense[2:]}
    for site, factors in chain.items():
        b = js.bound(lenet, x, site=site, noise=law)
        np.testing.assert_allclose(np.asarray(b.upper), math.prod(factors) * 0.1
                                   * np.asarray(_site_norms(pm, x, site)), rtol=1e-12)


def test_activation_constants_are_certified(x64):
    """Every recognized activation's constant is ≥ sup|σ'|: the largest |σ'| on a grid of
    spacing 1e-4 over [−30, 30], refined on a 1e-8 grid around the maximum (|σ''| is
    bounded, so what remains is below the constants' rounding up); and not loose."""
    t = jnp.linspace(-30.0, 30.0, 600_001)
    for name, (f, lip) in graph.ACTIVATIONS.items():
        d1 = jnp.abs(jax.vmap(jax.grad(f))(t))
        t0 = t[jnp.argmax(d1)]
        local = jnp.linspace(t0 - 2e-4, t0 + 2e-4, 40_001)
        sup = max(float(jnp.max(d1)), float(jnp.max(jnp.abs(jax.vmap(jax.grad(f))(local)))))
        assert lip >= sup, (name, lip, sup)
        assert lip <= 1.001 * sup + 1e-3, (name, lip, sup)  # and not loose


def test_activations_written_as_primitives_are_recognized(x64):
    """gelu (erf), leaky relu (a select), silu (x·sigmoid) and x·(x > 0) are clusters of
    elementwise primitives; the reader recognizes each and uses its constant."""

    class Net(nnx.Module):
        def __init__(self, act, rngs):
            self.l1 = nnx.Linear(4, 5, param_dtype=jnp.float64, rngs=rngs)
            self.l2 = nnx.Linear(5, 2, param_dtype=jnp.float64, rngs=rngs)
            self.act = act
            self.input_shape = (4,)

        def __call__(self, x):
            return self.l2(self.act(self.l1(self.perturb("a", x))))

    cases = {
        "gelu": (lambda z: z * 0.5 * (1 + jax.lax.erf(z / math.sqrt(2))), 1.1290),
        "leaky": (lambda z: jnp.where(z > 0, z, 0.01 * z), 1.0),
        "silu": (lambda z: z * jax.nn.sigmoid(z), 1.0999),
        "relu": (lambda z: z * (z > 0), 1.0),
    }
    for name, (act, lip) in cases.items():
        model = _randomize(Net(act, nnx.Rngs(0)), 6)
        pm = js.split(model)
        g = graph.read(pm.structure)
        w, r = graph.state_arrays(pm.structure, pm.params, pm.rest)
        L = graph.site_lipschitz(g, "a", graph.operator_norms(g, w, r))
        want = lip * float(spectral_norm_bound(pm.param("l1/kernel"))) * float(
            spectral_norm_bound(pm.param("l2/kernel")))
        np.testing.assert_allclose(float(L), want, rtol=1e-12, err_msg=name)
    # An elementwise function that is not a known activation and not globally Lipschitz.
    model = _randomize(Net(lambda z: z * z, nnx.Rngs(0)), 6)
    with pytest.raises(ValueError, match="not globally Lipschitz|multiplies two values"):
        js.bound(model, _x((2, 4)), site="a", noise=noise.RelativeNorm(0.1))


# --------------------------------------------------------------------------- moments
def _mc_moments(pm, x1, sigma, n, key):
    eps = sigma * jax.random.normal(key, (n, *x1.shape), x1.dtype)
    out = pm.apply(x1[None] + eps).reshape(n, -1)
    return out.mean(0), jnp.cov(out.T)


def test_two_stage_is_exact_with_a_residual_bypass(x64):
    """out = dense(conv2(relu(conv1 x)) + x) is affine in (r, x): the two-stage moments
    with the bypass's cross-covariance (Stein's lemma) are exact; dropping it is not."""
    model = _randomize(ResidualCNN(nnx.Rngs(0)), 7)
    pm = js.split(model)
    x1 = _x((6, 6, 1), seed=1) * 0.5
    g = graph.read(pm.structure)
    assert graph.bypasses(g, "r") and js.moments.split_sites(pm) == ("r",)
    sigma = 0.4
    cov = sigma**2 * jnp.eye(36)
    mom = js.moments.two_stage_moments(pm, x1, jnp.zeros_like(x1), cov)
    n = 400_000
    mc_mean, mc_cov = _mc_moments(pm, x1, sigma, n, jax.random.key(0))
    sd = np.sqrt(np.diagonal(np.asarray(mc_cov)))
    np.testing.assert_array_less(np.abs(np.asarray(mom.mean - mc_mean)), 5 * sd / np.sqrt(n))
    # Var of a sample variance ≈ 2σ⁴/n for near-Gaussian outputs (heavier tails allowed ×2).
    tol = 5 * np.sqrt(2 * 2 / n) * np.outer(sd, sd)
    np.testing.assert_array_less(np.abs(np.asarray(mom.cov - mc_cov)), tol)
    ts = js.moments.two_stage_linearization(pm, x1)
    assert float(jnp.max(jnp.abs(ts.C))) > 0.1
    base = js.moments.affine_relu_affine(ts.A, ts.c1, ts.B, ts.c2, x1.reshape(-1), cov)
    assert float(jnp.max(jnp.abs(base.cov - mc_cov))) > 20 * float(np.max(tol))
    # The diagonal-input path (what the losses and attacks use) gives the same numbers.
    diag = js.moments.diagonal_output_moments(pm, x1, 0.0, sigma**2)
    np.testing.assert_allclose(diag.mean, mom.mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(diag.cov, mom.cov, rtol=1e-10, atol=1e-12)
    # Sensitivity maps need every path through the split: refused in one line.
    with pytest.raises(ValueError, match="residual connection bypasses 'r'"):
        js.moments.sensitivity_map(pm, x1, sigma=0.1)


def test_residual_cnn_moments_match_monte_carlo(x64):
    """The tightness protocol on a residual CNN with a ReLU after the skip."""
    model = _randomize(ResidualCNN(nnx.Rngs(0), head_relu=True), 8)
    x = _x((3, 6, 6, 1), seed=2) * 0.5
    recs = js.moments.tightness_study(model, x, sigmas=[0.02], key=jax.random.key(1),
                                      num_samples=20_000, layerwise=True)
    rec = recs[0]
    assert "sre_var_layerwise" not in rec  # layerwise refuses the residual addition
    assert rec["sre_mean"] < 0.02 and rec["sre_var"] < 0.1, rec
    prof = js.profile(model, x, noise=noise.Absolute(0.02), levels=[0.02], sites=["input"],
                      estimators=("moments", "linearized"))
    assert all(prof.present[0])


def test_layerwise_moments_read_conv_batchnorm_and_pooling(x64):
    """conv → BatchNorm → relu → avg-pool → dense: one ReLU after an affine map of a
    Gaussian input, so the layerwise moments are exact."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            f64 = jnp.float64
            self.conv = nnx.Conv(1, 2, (3, 3), padding="SAME", param_dtype=f64, rngs=rngs)
            self.bn = nnx.BatchNorm(2, param_dtype=f64, rngs=rngs)
            self.dense = nnx.Linear(2 * 3 * 3, 3, param_dtype=f64, rngs=rngs)
            self.input_shape = (6, 6, 1)

        def __call__(self, x):
            h = self.perturb("h", jax.nn.relu(self.bn(self.conv(x))))
            h = nnx.avg_pool(h, (2, 2), strides=(2, 2))
            return self.dense(h.reshape(h.shape[0], -1))

    model = _randomize(Net(nnx.Rngs(0)), 9)
    pm = js.split(model)
    x1 = _x((6, 6, 1), seed=3)
    sigma = 0.5
    n = 400_000
    mc_mean, mc_cov = _mc_moments(pm, x1, sigma, n, jax.random.key(2))
    sd = np.sqrt(np.diagonal(np.asarray(mc_cov)))
    lw = js.moments.layerwise_moments(pm, x1, jnp.zeros_like(x1), sigma**2 * jnp.eye(36))
    np.testing.assert_array_less(np.abs(np.asarray(lw.mean - mc_mean)), 5 * sd / np.sqrt(n))
    np.testing.assert_array_less(np.abs(np.asarray(lw.cov - mc_cov)),
                                 5 * np.sqrt(4 / n) * np.outer(sd, sd))
    # The same numbers from the diagonal input path and from the two-stage split.
    diag = js.moments.diagonal_output_moments(pm, x1, 0.0, sigma**2, method="layerwise_full")
    np.testing.assert_allclose(diag.cov, lw.cov, rtol=1e-10, atol=1e-13)
    ts = js.moments.two_stage_moments(pm, x1, jnp.zeros_like(x1), sigma**2 * jnp.eye(36))
    np.testing.assert_allclose(ts.cov, lw.cov, rtol=1e-9, atol=1e-12)
    # Diagonal mode: the same variances here (one ReLU layer, then an affine read-out
    # whose variances ignore the units' correlations).
    dg = js.moments.layerwise_moments(pm, x1, jnp.zeros_like(x1), sigma**2 * jnp.eye(36),
                                      covariance="diag")
    assert dg.cov.shape == (3, 3) and np.all(np.isfinite(np.asarray(dg.cov)))


def test_moments_errors_name_the_operation(x64):
    model = _randomize(ResidualCNN(nnx.Rngs(0)), 7)
    x1 = _x((6, 6, 1))
    cov = jnp.eye(36)
    with pytest.raises(ValueError) as err:
        js.moments.layerwise_moments(model, x1, jnp.zeros_like(x1), cov)
    msg = str(err.value)
    assert "\n" not in msg and "residual connection" in msg and "two_stage" in msg
    smooth = _randomize(SmoothMLP(nnx.Rngs(0)), 1)
    with pytest.raises(ValueError, match="no activation site whose value is relu"):
        js.moments.two_stage_moments(smooth, _x((5,)), jnp.zeros(5), jnp.eye(5))
    with pytest.raises(ValueError, match="neither affine nor a ReLU"):
        js.moments.layerwise_moments(smooth, _x((5,)), jnp.zeros(5), jnp.eye(5))
