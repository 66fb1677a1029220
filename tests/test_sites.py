"""Sites: discovery, clean values, deltas through ``apply``, and user-defined modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsens as js
from jaxsens import noise


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _kernels(model):
    """[(kernel, bias)] of an MLP as NumPy arrays."""
    return [(np.asarray(layer.kernel.get_value()), np.asarray(layer.bias.get_value()))
            for layer in model.layers]


def _np_mlp(layers, x, act, deltas=None):
    """Reference MLP forward in NumPy with additive activation deltas; returns (out, sites)."""
    deltas = deltas or {}
    h = np.asarray(x) + deltas.get("input", 0.0)
    values = {}
    for i, (k, b) in enumerate(layers[:-1]):
        values[f"h{i}"] = act(h @ k + b)
        h = values[f"h{i}"] + deltas.get(f"h{i}", 0.0)
    k, b = layers[-1]
    return h @ k + b, values


def _relu(z):
    return np.maximum(z, 0.0)


# --------------------------------------------------------------------------- discovery
def test_mlp_sites(make_mlp):
    model = make_mlp(784, [256, 256], 10, dtype=jnp.float32)
    assert js.activation_sites(model) == ("h0", "h1")
    assert js.weight_sites(model) == tuple(
        f"layers/{i}/{p}" for i in range(3) for p in ("bias", "kernel"))
    pm = js.split(model)
    assert pm.input_shape == (784,) and pm.structure.output_shape == (10,)
    assert pm.site("input").kind == "input" and pm.site("input").shape == (784,)
    assert pm.site("h1").kind == "activation" and pm.site("h1").shape == (256,)
    assert pm.site("layers/1/kernel").kind == "weight"
    assert pm.site("layers/1/kernel").shape == (256, 256)
    assert js.split(pm) is pm


@pytest.mark.parametrize(("input_shape", "shapes"), [
    ((28, 28, 1), {"c0": (14, 14, 6), "c1": (7, 7, 16), "h0": (120,), "h1": (84,)}),
    ((16, 16, 1), {"c0": (8, 8, 3), "c1": (4, 4, 4), "h0": (24,), "h1": (12,)}),
])
def test_lenet_sites(init_from_numpy, input_shape, shapes):
    kw = {} if input_shape == (28, 28, 1) else dict(channels=(3, 4), hidden=(24, 12))
    model = init_from_numpy(lambda: js.models.LeNet(input_shape, 5, rngs=nnx.Rngs(0), **kw), 0)
    assert js.activation_sites(model) == ("c0", "c1", "h0", "h1")
    pm = js.split(model)
    assert {s: pm.site(s).shape for s in shapes} == shapes
    assert {"convs/0/kernel", "convs/1/bias", "dense/2/kernel"} <= set(pm.weight_sites)
    assert pm.site("convs/0/kernel").shape == (5, 5, 1, shapes["c0"][-1])


# --------------------------------------------------------------------------- values, deltas
def test_activations_equal_a_manual_forward_pass(x64, make_mlp):
    model = make_mlp(6, [16, 12], 4)
    x = _x((5, 6))
    out_ref, values_ref = _np_mlp(_kernels(model), x, _relu)
    values = js.activations(model, x)
    assert set(values) == {"h0", "h1"}
    for s in values:
        np.testing.assert_allclose(values[s], values_ref[s], rtol=1e-12, atol=1e-12)
    # The plain module call (outside nnx.capture the sites are the identity) agrees too.
    np.testing.assert_allclose(model(x), out_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(js.split(model).apply(x), out_ref, rtol=1e-12, atol=1e-12)


def test_lenet_activations_equal_a_manual_forward_pass(x64, make_lenet):
    model = make_lenet()
    x = _x((2, 16, 16, 1))
    values = js.activations(model, x)
    h = x
    for i, conv in enumerate(model.convs):
        h = nnx.avg_pool(jax.nn.relu(conv(h)), window_shape=(2, 2), strides=(2, 2))
        np.testing.assert_allclose(values[f"c{i}"], h, rtol=1e-12, atol=1e-12)
    h = h.reshape(h.shape[0], -1)
    for i, layer in enumerate(model.dense[:-1]):
        h = jax.nn.relu(layer(h))
        np.testing.assert_allclose(values[f"h{i}"], h, rtol=1e-12, atol=1e-12)


def test_activation_and_input_deltas_through_apply(x64, make_mlp):
    model = make_mlp(6, [16, 12], 4)
    pm = js.split(model)
    x = _x((5, 6))
    deltas = {"input": _x((5, 6), 1), "h0": _x((5, 16), 2), "h1": _x((5, 12), 3)}
    out, values = pm.apply_with_values(x, deltas)
    ref_out, ref_values = _np_mlp(_kernels(model), x, _relu,
                                  {k: np.asarray(v) for k, v in deltas.items()})
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    # Recorded values are the clean values at the site (before its own delta).
    for s in ("h0", "h1"):
        np.testing.assert_allclose(values[s], ref_values[s], rtol=1e-12, atol=1e-12)
    # apply_one is apply on one example, with per-example deltas.
    one = pm.structure.apply_one(pm.params, pm.rest, x[2], {k: v[2] for k, v in deltas.items()})
    np.testing.assert_allclose(one, ref_out[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("site", ["layers/0/kernel", "layers/1/bias", "layers/2/kernel"])
def test_weight_delta_equals_running_the_model_with_modified_params(x64, make_mlp, site):
    model = make_mlp(6, [16, 12], 4)
    pm = js.split(model)
    x = _x((5, 6))
    delta = 0.3 * _x(pm.site(site).shape, 4)
    got = pm.apply(x, {site: delta})

    modified = nnx.clone(model)
    i, name = int(site.split("/")[1]), site.split("/")[2]
    param = getattr(modified.layers[i], name)
    param.set_value(param.get_value() + delta)
    np.testing.assert_allclose(got, modified(x), rtol=1e-12, atol=1e-12)
    layers = _kernels(model)
    k, b = layers[i]
    layers[i] = (k + np.asarray(delta), b) if name == "kernel" else (k, b + np.asarray(delta))
    np.testing.assert_allclose(got, _np_mlp(layers, x, _relu)[0], rtol=1e-12, atol=1e-12)
    # The model itself is untouched.
    np.testing.assert_allclose(pm.apply(x), _np_mlp(_kernels(model), x, _relu)[0], rtol=1e-12)


# --------------------------------------------------------------------------- user modules
class _Block(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(6, 6, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, h):
        return self.perturb("h", jnp.tanh(self.lin(h)))


class _UserNet(nnx.Module):
    """A user module marking sites with Flax's own ``perturb``, one in a submodule."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(5, 6, param_dtype=jnp.float64, rngs=rngs)
        self.block = _Block(rngs)
        self.out = nnx.Linear(6, 3, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        h = self.perturb("a", jax.nn.relu(self.inp(x)))
        return self.out(self.block(h))


def _user_forward(net, x):
    a = jax.nn.relu(net.inp(x))
    h = jnp.tanh(net.block.lin(a))
    return net.out(h), {"a": a, "block/h": h}


def test_user_module_with_perturb_works_unchanged(x64, init_from_numpy):
    net = init_from_numpy(lambda: _UserNet(nnx.Rngs(0)), 3)
    x = _x((4, 5))
    # No `input_shape` attribute: the sites need an example input.
    with pytest.raises(ValueError, match="example input"):
        js.activation_sites(net)
    assert js.activation_sites(net, x) == ("a", "block/h")
    pm = js.split(net, x)
    assert pm.input_shape == (5,) and pm.site("block/h").shape == (6,)
    assert "block/lin/kernel" in pm.weight_sites

    out_ref, values_ref = _user_forward(net, x)
    values = js.activations(net, x)
    for s in ("a", "block/h"):
        np.testing.assert_allclose(values[s], values_ref[s], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pm.apply(x), out_ref, rtol=1e-12, atol=1e-12)

    # The estimators take the module as is (they split it with x); at a tiny level the
    # network is linear to within ~1e-4 relative, far below the Monte Carlo error.
    n = 2000
    for site in ("a", "block/h", "block/lin/kernel"):  # top level, nested, weight
        law = (noise.WeightRelative(1e-4) if pm.site(site).kind == "weight"
               else noise.RelativeNorm(1e-4, reading="gaussian"))
        s = jax.tree.map(np.asarray, js.sampled(net, x[:2], site=site, noise=law,
                                                key=jax.random.key(1), num_samples=n))
        lin = jax.tree.map(np.asarray, js.linearized(net, x[:2], site=site, noise=law))
        m = lin.delta_cov
        se_ms = np.sqrt(2.0 * np.sum(m * m, axis=(1, 2)) / n)
        np.testing.assert_array_less(np.abs(s.rms**2 - lin.rms**2), 4 * se_ms + 1e-3 * lin.rms**2)
    # The certified bound reads the user's network from its traced computation: it
    # holds for every draw of the (almost surely bounded) sphere law.
    law = noise.RelativeNorm(0.1)
    b = js.bound(net, x, site="a", noise=law)
    s = js.sampled(net, x, site="a", noise=law, key=jax.random.key(2), num_samples=500,
                   quantiles=(1.0,))
    assert bool(b.almost_sure)
    assert np.all(np.asarray(s.quantiles[:, 0]) <= np.asarray(b.upper))


def test_activation_sites_come_in_forward_order_not_alphabetical():
    """Names that sort differently from the order the forward pass reaches them."""

    class Residual(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Linear(4, 8, rngs=rngs)
            self.inner = nnx.Linear(8, 8, rngs=rngs)
            self.head = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            h = self.perturb("zeta", self.embed(x))
            h = self.perturb("block/act", jax.nn.relu(self.inner(h))) + h
            return self.head(self.perturb("alpha", h))

    model = Residual(nnx.Rngs(0))
    assert js.activation_sites(model, jnp.ones((2, 4))) == ("zeta", "block/act", "alpha")
