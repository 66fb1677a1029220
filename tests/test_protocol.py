"""One estimator protocol, compiled end to end.

Every registered estimator has the call shape ``estimator(model, x, *, site, noise,
key=None, **options) -> Deviation`` and returns the same pytree; a call on a model seen
before does no tracing, no compilation and no device-to-host transfer; estimators work
inside ``jax.jit``, ``jax.vmap`` and ``jax.grad``; ``profile`` returns a typed table.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsens as js
from jaxsens import noise
from jaxsens.estimators import DEFAULT_QUANTILES

# One call per registered estimator, at a site and law where it applies.
CALLS = {
    "sampled": dict(site="h1", noise=noise.RelativeNorm(0.1), num_samples=64),
    "linearized": dict(site="h1", noise=noise.RelativeNorm(0.1)),
    "bound": dict(site="h1", noise=noise.RelativeNorm(0.1)),
    "moments": dict(site="input", noise=noise.Absolute(0.1)),
    "attack": dict(site="h1", noise=noise.RelativeNorm(0.1), steps=5),
}


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module")
def model():
    return js.models.MLP(6, [16, 12], 4, rngs=nnx.Rngs(0))


@contextlib.contextmanager
def count_compile_events():
    """Counts tracing, lowering and backend compilations while the block runs."""
    events: list[str] = []

    def listener(event, duration, **kwargs):
        del duration, kwargs
        if event.startswith("/jax/core/compile/"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_registry_covers_every_estimator_with_one_call_shape(model):
    assert set(js.REGISTRY) == set(CALLS) and js.ESTIMATORS == tuple(js.REGISTRY)
    x = _x((3, 6))
    key = jax.random.key(0)
    results = {}
    for name, spec in js.REGISTRY.items():
        dev = spec.call(model, x, key=key, **CALLS[name])
        assert isinstance(dev, js.Deviation)
        assert dev.estimator == name and dev.site == CALLS[name]["site"]
        assert dev.law == CALLS[name]["noise"].describe()
        results[name] = dev
    # Deterministic estimators accept a key and ignore it.
    for name in ("linearized", "bound", "moments"):  # (the attack's key seeds its restarts)
        other = js.REGISTRY[name].call(model, x, key=jax.random.key(7), **CALLS[name])
        for a, b in zip(jax.tree.leaves(results[name]), jax.tree.leaves(other), strict=True):
            np.testing.assert_array_equal(a, b)
        again = js.REGISTRY[name].call(model, x, **CALLS[name])  # key left out
        np.testing.assert_array_equal(again.rms, results[name].rms)


def test_every_deviation_has_one_tree_structure_and_stacks(model):
    x = _x((3, 6))
    devs = [js.REGISTRY[n].call(model, x, key=jax.random.key(0), **CALLS[n]) for n in CALLS]
    structures = {jax.tree.structure(d) for d in devs}
    assert len(structures) == 1
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *devs)
    n = len(CALLS)
    assert stacked.mean.shape == (n, 3) and stacked.delta_cov.shape == (n, 3, 4, 4)
    assert stacked.quantiles.shape == (n, 3, len(DEFAULT_QUANTILES))
    # Labels are not part of the tree: transformed results carry empty ones.
    assert stacked.estimator == ""


# Which fields each estimator produces; all others are NaN ("absent").
PRODUCED = {
    "sampled": {"mean", "rms", "stderr", "quantiles", "delta_mean", "delta_cov", "flip_rate",
                "loss_change"},
    "linearized": {"mean", "rms", "delta_mean", "delta_cov", "factor"},
    "bound": {"upper"},
    "moments": {"mean", "rms", "delta_mean", "delta_cov"},
    "attack": {"lower"},
}
FLOAT_FIELDS = ("mean", "rms", "stderr", "quantiles", "delta_mean", "delta_cov", "flip_rate",
                "loss_change", "accuracy", "upper", "lower", "factor")


@pytest.mark.parametrize("name", list(CALLS))
def test_absent_quantities_are_nan_and_produced_ones_finite(model, name):
    dev = js.REGISTRY[name].call(model, _x((3, 6)), key=jax.random.key(0), **CALLS[name])
    for field in FLOAT_FIELDS:
        value = np.asarray(getattr(dev, field))
        if field in PRODUCED[name]:
            assert np.all(np.isfinite(value)), (name, field)
            assert dev.has(field)
        else:
            assert np.all(np.isnan(value)), (name, field)
            assert not dev.has(field)
    assert int(dev.num_samples) == (64 if name == "sampled" else 0)
    np.testing.assert_allclose(dev.quantile_levels, DEFAULT_QUANTILES, rtol=1e-6)
    assert bool(dev.almost_sure) == (name == "bound")


@pytest.mark.parametrize("name", list(CALLS))
def test_repeated_calls_on_fresh_batches_neither_trace_nor_compile_nor_sync(model, name):
    """After the first call, fresh inputs of the same shape (and a fresh key, a new
    noise level, new parameters of the same architecture) reuse the compiled program
    and read nothing back from the device."""
    call = js.REGISTRY[name].call
    kw = dict(CALLS[name])
    jax.block_until_ready(call(model, _x((5, 6)), key=jax.random.key(0), **kw))
    other = js.models.MLP(6, [16, 12], 4, rngs=nnx.Rngs(3))  # same architecture
    law = kw.pop("noise")
    for seed, m in ((1, model), (2, other), (3, model)):
        x = _x((5, 6), seed)
        key = jax.random.key(seed)
        with count_compile_events() as events, jax.transfer_guard_device_to_host("disallow"):
            dev = call(m, x, key=key, noise=law.with_level(0.1 * seed), **kw)
        assert events == [], f"{name}: {events}"
        jax.block_until_ready(dev)


@pytest.mark.parametrize("name", list(CALLS))
def test_public_call_reads_no_value_back(model, name):
    """Run with every array abstract (the model and inputs traced by ``jax.jit``): a
    public call that read any value back to the host (a check, a Python branch on data)
    would fail here. The transfer guard above says the same on accelerators, where
    device-to-host copies are real."""
    call = js.REGISTRY[name].call
    x, key = _x((3, 6)), jax.random.key(0)
    traced = jax.jit(lambda m, x, k: call(m, x, key=k, **CALLS[name]))(model, x, key)
    eager = call(model, x, key=key, **CALLS[name])
    for a, b in zip(jax.tree.leaves(traced), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)


def test_estimators_inside_jit_vmap_and_grad(x64, make_mlp):
    model = make_mlp(6, [16, 12], 4)  # relu: the moments need it
    law = noise.Absolute(0.1)
    x = _x((3, 6)).astype(jnp.float64)
    key = jax.random.key(0)
    for name in CALLS:
        call = js.REGISTRY[name].call
        kw = dict(CALLS[name], noise=law)
        eager = call(model, x, key=key, **kw)
        jitted = jax.jit(lambda x, call=call, kw=kw: call(model, x, key=key, **kw))(x)
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=name)
        if name != "sampled":  # per-example estimators: vmap over single examples
            per = jax.vmap(lambda x1, call=call, kw=kw: call(model, x1[None], key=key, **kw))(x)
            np.testing.assert_allclose(per.rms[:, 0] if name != "bound" else per.upper[:, 0],
                                       eager.rms if name != "bound" else eager.upper,
                                       rtol=1e-10, err_msg=name)
    # Gradients with respect to the input through the linearized prediction, checked
    # against central differences.
    def f(x):
        return js.linearized(model, x, site="h0", noise=noise.RelativeNorm(0.1)).rms.sum()

    g = jax.grad(f)(x)
    e = np.zeros(x.shape)
    e[1, 2] = 1e-6
    fd = (f(x + e) - f(x - e)) / 2e-6
    assert g[1, 2] == pytest.approx(float(fd), rel=1e-6)


def test_profile_is_a_table_with_site_level_estimator_axes(model):
    x = _x((4, 6))
    law = noise.RelativeNorm(0.1, reading="gaussian")
    levels = (0.05, 0.2)
    prof = js.profile(model, x, noise=law, levels=levels, key=jax.random.key(0),
                      sites=["input", "h0", "h1"], num_samples=64)
    assert isinstance(prof, js.Profile)
    s, lv, e = 3, len(levels), len(js.estimators.DEFAULT_ESTIMATORS)
    assert prof.deviation.mean.shape == (s, lv, e, 4)
    assert prof.deviation.delta_cov.shape == (s, lv, e, 4, 4, 4)
    assert prof.estimators == js.estimators.DEFAULT_ESTIMATORS
    assert prof.sites == ("input", "h0", "h1")
    moments_col = prof.estimators.index("moments")
    assert [row[moments_col] for row in prof.present] == [True, False, False]
    skipped = prof.skipped()  # never dropped silently: what did not run, and why
    assert [(r["site"], r["estimator"]) for r in skipped] == [("h0", "moments"),
                                                              ("h1", "moments")]
    assert all("input noise only" in r["reason"] for r in skipped)
    # Each cell equals the estimator called alone with the key profile derives.
    for i, site in enumerate(prof.sites):
        for j, level in enumerate(levels):
            one = law.with_level(level)
            cell = prof.select(site=site, level=level, estimator="sampled")
            alone = js.sampled(model, x, site=site, noise=one, num_samples=64,
                               key=jax.random.fold_in(jax.random.fold_in(
                                   jax.random.key(0), i), j))
            np.testing.assert_allclose(cell.mean, alone.mean, rtol=1e-5)
            np.testing.assert_allclose(cell.quantiles, alone.quantiles, rtol=1e-5)
            lin = js.linearized(model, x, site=site, noise=one)
            np.testing.assert_allclose(
                prof.select(site=site, level=level, estimator="linearized").rms, lin.rms,
                rtol=1e-5)
            b = js.bound(model, x, site=site, noise=one)
            np.testing.assert_allclose(
                prof.select(site=site, level=level, estimator="bound").upper, b.upper,
                rtol=1e-5)
    mom = js.propagate_moments(model, x, noise=law.with_level(0.2))
    np.testing.assert_allclose(
        prof.select(site="input", level=0.2, estimator="moments").rms, mom.rms, rtol=1e-5)
    records = prof.to_records()
    assert len(records) == 3 * lv * 3 + lv  # three estimators everywhere, moments at input
    assert records[0]["site"] == "input" and records[0]["estimator"] == "sampled"
    with pytest.raises(ValueError, match="estimator='exact'"):
        prof.select(site="h0", level=0.05, estimator="exact")


def test_profile_compiles_once_per_estimator_for_all_sites_and_levels(model):
    x = _x((4, 6))
    law = noise.RelativeNorm(0.1)
    kw = dict(noise=law, key=jax.random.key(0), sites=["h0", "h1"], num_samples=32,
              estimators=("sampled", "linearized", "bound"))
    js.profile(model, x, levels=(0.1, 0.2), **kw)
    with count_compile_events() as events:
        js.profile(model, _x((4, 6), 1), levels=(0.3, 0.4), **kw)
    assert events == []


def test_pure_model_is_a_pytree_argument_of_jit(model):
    pm = js.split(model)
    x = _x((3, 6))
    law = noise.RelativeNorm(0.1)
    f = jax.jit(lambda pm, x: js.linearized(pm, x, site="h1", noise=law).rms)
    np.testing.assert_allclose(f(pm, x), js.linearized(model, x, site="h1", noise=law).rms,
                               rtol=1e-6)
    doubled = jax.tree.map(lambda a: 2 * a, pm)  # a new PureModel, same structure
    assert isinstance(doubled, js.PureModel) and doubled.structure is pm.structure


def test_traced_noise_levels_vmap_and_grad(model):
    """The level is data of the law's pytree: vmap over ε and d/dε work, and agree with
    the exact scaling (rms ∝ ε for linearized and bound, ∝ σ for sampled Gaussian noise)."""
    x = _x((3, 6))
    eps = jnp.array([0.1, 0.2, 0.4])

    def lin(e):
        return js.linearized(model, x, site="h1", noise=noise.RelativeNorm(e)).rms.sum()

    def bnd(e):
        return js.bound(model, x, site="h1", noise=noise.RelativeNorm(e)).upper.sum()

    def smp(e):
        return js.sampled(model, x, site="h1", noise=noise.Absolute(e),
                          key=jax.random.key(0), num_samples=64).rms.sum()

    for f in (lin, bnd):
        v = jax.vmap(f)(eps)
        np.testing.assert_allclose(v / eps, v[0] / eps[0], rtol=1e-5)
        np.testing.assert_allclose(jax.grad(f)(0.2), v[0] / eps[0], rtol=1e-5)
    # Sampled with a fixed key: η = σ g, a ReLU net is not linear, but d/dσ exists and the
    # vmapped values equal separate calls.
    v = jax.vmap(smp)(eps)
    np.testing.assert_allclose(v, [smp(e) for e in eps], rtol=1e-5)
    assert np.isfinite(float(jax.grad(smp)(0.2)))


def test_training_mode_models_are_analysed_in_inference_mode_with_a_warning():
    """BatchNorm with batch statistics and active dropout would make the linearized
    estimate depend on the batch and the draws of the mask: the estimators analyse what
    the model computes at inference (Flax's eval()) and say so once."""

    class NormDrop(nnx.Module):
        def __init__(self, rngs):
            self.input_shape = (6,)
            self.dense = nnx.Linear(6, 10, rngs=rngs)
            self.norm = nnx.BatchNorm(10, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.out = nnx.Linear(10, 3, rngs=rngs)

        def __call__(self, x):
            h = self.drop(jax.nn.relu(self.norm(self.dense(x))))
            return self.out(js.models.mark_site(self, "h", h))

    x = _x((4, 6))
    law = noise.RelativeNorm(0.1)
    training = NormDrop(nnx.Rngs(0))
    with pytest.warns(UserWarning, match=r"inference mode .*drop \(dropout\), norm "
                                         r"\(batch statistics\)"):
        first = js.linearized(training, x, site="h", noise=law)
    again = js.linearized(training, x, site="h", noise=law)  # once per architecture
    inference = NormDrop(nnx.Rngs(0))
    inference.eval()
    ref = js.linearized(inference, x, site="h", noise=law)
    np.testing.assert_allclose(first.rms, ref.rms, rtol=1e-6)
    np.testing.assert_allclose(again.rms, ref.rms, rtol=1e-6)
    assert training.drop.deterministic is False  # the user's model is left as it was


def test_deviation_repr_is_one_short_line(model):
    dev = js.linearized(model, _x((32, 6)), site="h1", noise=noise.RelativeNorm(0.1))
    text = repr(dev)
    assert "\n" not in text and len(text) < 400, text
    assert text.startswith("Deviation(estimator='linearized', site='h1'")
    assert "rms(32,) mean=" in text and "upper" not in text  # absent quantities left out


def test_profile_needs_a_key_only_for_the_sampled_estimator(model):
    x = _x((3, 6))
    law = noise.RelativeNorm(0.1)
    prof = js.profile(model, x, noise=law, levels=[0.1], estimators=("linearized", "bound"))
    assert prof.deviation.mean.shape == (2, 1, 2, 3)
    with pytest.raises(ValueError, match="'sampled' estimator needs key="):
        js.profile(model, x, noise=law, levels=[0.1])


# --------------------------------------------------------------------------- XLA:CPU LAPACK
_CHAINED = """
import jax, jax.numpy as jnp
from jaxsens.estimators._common import after
ms = [jnp.broadcast_to(jnp.eye(10), (256, 10, 10)) * (i + 1) for i in range(40)]
def chained(*ms):
    out = []
    for m in ms:
        out.append(jnp.linalg.eigvalsh(after(m, out[-1] if out else None)))
    return out
for _ in range(3):
    jax.block_until_ready(jax.jit(chained)(*ms))
print("done")
"""


def test_after_orders_batched_lapack_calls_and_changes_no_number():
    """40 independent batched eigvalsh calls in one program deadlock XLA:CPU's thread pool
    on a multi-core host (every pool thread waits for parts of its own batch); chained
    through ``after`` they run one by one and finish. A NaN in the previous result does
    not leak into the next input."""
    import os
    import subprocess
    import sys

    from jaxsens.estimators._common import after

    run = subprocess.run([sys.executable, "-c", _CHAINED], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr[-2000:]
    m = jnp.arange(6.0).reshape(2, 3) - 2.5
    prev = {"a": jnp.asarray([jnp.nan, 1.0]), "b": jnp.asarray([jnp.inf]),
            "n": jnp.asarray([3], jnp.int32), "flag": jnp.asarray(True)}
    got = jax.jit(after)({"m": m, "i": jnp.arange(3)}, prev)
    np.testing.assert_array_equal(np.asarray(got["m"]), np.asarray(m))
    np.testing.assert_array_equal(np.asarray(got["i"]), np.arange(3))
    assert after(m, None) is m
