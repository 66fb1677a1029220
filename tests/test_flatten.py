"""The cached module flatten (jaxsens.flatten) always equals jax.tree_util.tree_flatten.

Each test changes a live module the way researchers do between two jaxsens calls and checks
that the cached flatten sees it: same tree definition and the very same leaf objects as a
fresh ``tree_flatten``, and a re-flatten only when something changed.
"""

from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsens as js
from jaxsens import flatten as flatten_lib


@pytest.fixture
def count(monkeypatch):
    """How many times the real tree_flatten ran (a cache miss)."""
    calls = []
    real = jax.tree_util.tree_flatten

    def counting(tree, *a, **k):
        if isinstance(tree, nnx.Module):
            calls.append(tree)
        return real(tree, *a, **k)

    monkeypatch.setattr(jax.tree_util, "tree_flatten", counting)
    return calls


def same(module) -> bool:
    leaves, treedef = flatten_lib.flatten(module)
    ref_leaves, ref_def = jax.tree_util.tree_flatten(module)
    return treedef == ref_def and len(leaves) == len(ref_leaves) and all(
        a is b for a, b in zip(leaves, ref_leaves, strict=True))


def mlp(seed=0):
    return js.models.MLP(6, [5, 4], 3, rngs=nnx.Rngs(seed))


def test_unchanged_module_is_flattened_once(count):
    m = mlp()
    first = flatten_lib.flatten(m)
    for _ in range(3):
        leaves, treedef = flatten_lib.flatten(m)
        assert treedef == first[1] and all(a is b for a, b in zip(leaves, first[0], strict=True))
    assert len(count) == 1


@pytest.mark.parametrize("change", [
    "value", "setitem", "update", "optimizer", "new_attribute", "delete_attribute", "replace_layer",
    "append_layer", "replace_variable", "metadata", "static_value"])
def test_every_change_is_seen(count, change):
    m = mlp()
    flatten_lib.flatten(m)
    before = len(count)
    lin = m.layers[0]
    if change == "value":
        lin.kernel.set_value(lin.kernel.get_value() + 1.0)
    elif change == "setitem":
        lin.kernel[...] = lin.kernel[...] * 0.5
    elif change == "update":
        state = nnx.state(m, nnx.Param)
        nnx.update(m, jax.tree.map(lambda a: a * 2.0, state))
    elif change == "optimizer":
        opt = nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param)
        grads = nnx.grad(lambda mm: jnp.sum(mm(jnp.ones((2, 6))) ** 2))(m)
        opt.update(m, grads)
    elif change == "new_attribute":
        m.extra = nnx.Param(jnp.ones(2))
    elif change == "delete_attribute":
        del lin.bias
    elif change == "replace_layer":
        m.layers[1] = nnx.Linear(5, 4, rngs=nnx.Rngs(3))
    elif change == "append_layer":
        m.layers.append(nnx.Linear(3, 3, rngs=nnx.Rngs(4)))
    elif change == "replace_variable":
        lin.kernel = nnx.Param(jnp.zeros((6, 5)))
    elif change == "metadata":
        lin.kernel.set_metadata(note="changed")
    elif change == "static_value":
        m.use_bias = False
    assert same(m)
    assert len(count) > before + 1  # the cached entry was found stale and rebuilt


def test_mode_switches_are_seen():
    class Net(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self.bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
            self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.drop(self.bn(self.lin(x)))

    net = Net()
    flat_train = flatten_lib.flatten(net)[1]
    net.eval()
    assert same(net) and flatten_lib.flatten(net)[1] != flat_train
    net.train()
    assert same(net) and flatten_lib.flatten(net)[1] == flat_train
    net(jnp.ones((3, 4)))  # training step: running statistics and RNG counts change
    assert same(net)


def test_mutable_static_values_are_compared_by_value(count):
    m = mlp()
    m.notes = ["a"]  # a plain list of strings: static
    flatten_lib.flatten(m)
    hits = len(count)
    assert same(m)
    assert len(count) == hits + 1  # only same()'s own reference flatten
    m.notes.append("b")
    assert same(m)


def test_metadata_replaced_by_an_equal_copy_of_another_order_is_seen():
    """Metadata is compared as the tree definition compares it (the same value objects):
    an OrderedDict replaced by one with another order is a change."""
    from collections import OrderedDict

    m = mlp()
    m.w = nnx.Param(jnp.ones(3), axes=OrderedDict([("a", 1), ("b", 2)]))
    flatten_lib.flatten(m)
    m.w.set_metadata(axes=OrderedDict([("b", 2), ("a", 1)]))
    assert same(m)


def test_odd_static_values_never_break_the_call():
    class BadHash:
        def __hash__(self):
            raise ValueError("no hash")

        def __eq__(self, other):
            return self is other

    m = mlp()
    loop: list = []
    loop.append(loop)
    m.loop = loop  # a self-referencing static list
    m.bad = BadHash()
    for _ in range(2):
        assert same(m)


def test_shared_submodules_and_numpy_leaves_are_correct():
    class Tied(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
            self.b = self.a  # reached twice: not cached, still right
            self.table = nnx.data(np.arange(3.0))

    t = Tied()
    for _ in range(2):
        assert same(t)
    t.a.kernel.set_value(jnp.zeros((3, 3)))
    assert same(t)


def test_cache_does_not_keep_modules_alive():
    m = mlp()
    flatten_lib.flatten(m)
    key, ref = id(m), weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None
    assert key not in flatten_lib._ENTRIES


def test_estimates_follow_in_place_training(x64):
    """A public estimator on a module changed in place equals one on a fresh copy."""
    m = mlp()
    x = jax.random.normal(jax.random.key(0), (4, 6))
    law = js.noise.RelativeNorm(0.1)
    before = js.linearized(m, x, site="h0", noise=law)
    opt = nnx.Optimizer(m, optax.sgd(0.5), wrt=nnx.Param)
    grads = nnx.grad(lambda mm: jnp.sum(mm(x) ** 2))(m)
    opt.update(m, grads)
    after = js.linearized(m, x, site="h0", noise=law)
    fresh = nnx.merge(*nnx.split(m))
    expect = js.linearized(fresh, x, site="h0", noise=law)
    np.testing.assert_array_equal(after.mean, expect.mean)
    assert not np.allclose(after.mean, before.mean)


def test_traced_modules_are_not_cached():
    m = mlp()
    x = jnp.ones((2, 6))

    @jax.jit
    def f(mod, x):
        return js.linearized(mod, x, site="h0", noise=js.noise.RelativeNorm(0.1)).rms

    np.testing.assert_allclose(f(m, x), js.linearized(
        m, x, site="h0", noise=js.noise.RelativeNorm(0.1)).rms, rtol=1e-6)
    assert same(m)
