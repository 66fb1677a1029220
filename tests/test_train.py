"""The training loop: learning, determinism, bitwise resume, divergence, optimizers."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsens as js
from jaxsens import data, losses
from jaxsens import noise as nz
from jaxsens import train as tr

# One optimizer object and one set of terms for the resumable runs: the jitted step is
# shared between calls with the same structure, optimizer and terms (compiled once).
ADAM = tr.make_optimizer("adam", 1e-2)
TERMS = ((1.0, losses.CrossEntropy()),
         (0.05, losses.NoiseLoss(site="h0", noise=nz.RelativeNorm(0.1))))


def _mixture(n_train=300, seed=0):
    # Means of norm 3 in 8 dimensions, unit noise: pairwise distance ≈ 3√2, so the Bayes
    # error is about Φ(−3/√2) ≈ 2% per pair — an easy problem, chance is 1/3.
    return data.gaussian_mixture(seed, n_train=n_train, n_test=300, dim=8, num_classes=3,
                                 separation=3.0)


def _mlp(seed=0, dtype=jnp.float32):
    return js.models.MLP(8, (16,), 3, param_dtype=dtype, rngs=nnx.Rngs(seed))


def _run(dataset=None, **kw):
    args = dict(optimizer=ADAM, loss_terms=TERMS, epochs=4, batch_size=64,
                key=jax.random.key(0), progress=False)
    args.update(kw)
    return tr.train(_mlp(), _mixture() if dataset is None else dataset, **args)


def _numbers(history):
    return [{k: v for k, v in h.items() if k not in tr.TIME_KEYS} for h in history]


def _leaves(model):
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _assert_same_model(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference():
    """An uninterrupted 4-epoch run (300 examples, batch 64: the last batch is smaller)."""
    return _run()


# --------------------------------------------------------------------------- learning
def test_training_learns_an_easy_problem(reference):
    h = reference.history
    assert [r["epoch"] for r in h] == [1, 2, 3, 4]
    assert h[-1]["train_loss"] < 0.5 * h[0]["train_loss"]
    assert h[-1]["test_accuracy"] > 0.9  # chance: 1/3
    for r in h:
        assert set(r) >= {"train_loss", "train_cross_entropy", "train_noise", "train_accuracy",
                          "test_loss", "test_accuracy", "epoch_time", "steps_per_second"}
        assert r["steps"] == 5
        np.testing.assert_allclose(r["train_loss"],
                                   r["train_cross_entropy"] + 0.05 * r["train_noise"],
                                   rtol=1e-6)
    # The trained model evaluates as reported.
    ds = _mixture()
    logits = jax.jit(lambda m, x: m(x))(reference.model, jnp.asarray(ds.x_test))
    acc = np.mean(np.argmax(np.asarray(logits), -1) == ds.y_test)
    assert acc == pytest.approx(h[-1]["test_accuracy"], abs=1e-12)


def test_warmup_weight_ramps_inside_the_compiled_step():
    """A Warmup weight is taken at the step's number: 0 at the start, half-way through the
    ramp half the weight, the full weight after it; the step compiles once for all."""
    pm = js.split(_mlp())
    x, y = _mixture().x_train[:32], _mixture().y_train[:32]
    noise = losses.NoiseLoss(site="h0", noise=nz.RelativeNorm(0.1))
    terms = ((1.0, losses.CrossEntropy()), (losses.Warmup(2.0, steps=10), noise))
    step = jax.jit(tr.make_train_step(pm.structure, ADAM, terms))
    opt_state = ADAM.init(pm.params)
    key = jax.random.key(3)
    got = {c: step(pm.params, opt_state, pm.rest, x, y, key, np.int32(c))[3]
           for c in (0, 5, 10, 1000)}
    for c, factor in ((0, 0.0), (5, 1.0), (10, 2.0), (1000, 2.0)):
        m = got[c]
        want = float(m["cross_entropy"]) + factor * float(m["noise"])
        assert float(m["loss"]) == pytest.approx(want, rel=1e-6), c
    assert float(got[10]["noise"]) > 0  # the term itself is computed all along
    assert step._cache_size() == 1
    with pytest.raises(ValueError, match="schedule and needs the optimizer step"):
        tr.make_train_step(pm.structure, ADAM, terms)(pm.params, opt_state, pm.rest, x, y, key)


def test_train_passes_the_global_step_to_scheduled_weights():
    """Epochs of 5 steps and a 6-step warm-up: in epoch 1 (weights 0 ... 4/6) the total is
    strictly between cross-entropy and cross-entropy + term; in epoch 3 (steps 10-14, full
    weight) it is their sum: the step number runs on across epochs."""
    ds = _mixture(n_train=320)
    noise = losses.NoiseLoss(site="h0", noise=nz.RelativeNorm(0.1))
    res = tr.train(_mlp(), ds, optimizer=ADAM, epochs=3, batch_size=64,
                   loss_terms=((1.0, losses.CrossEntropy()), (losses.Warmup(1.0, 6), noise)),
                   key=jax.random.key(0), progress=False)
    h = res.history
    assert h[0]["train_cross_entropy"] < h[0]["train_loss"] \
        < h[0]["train_cross_entropy"] + h[0]["train_noise"] - 1e-4
    assert h[2]["train_loss"] == pytest.approx(
        h[2]["train_cross_entropy"] + h[2]["train_noise"], rel=1e-6)


def test_warmup_rejects_bad_values():
    assert float(losses.Warmup(0.5, 0, start=3)(2)) == 0.0
    assert float(losses.Warmup(0.5, 0, start=3)(3)) == 0.5
    for bad in ({"weight": -1.0, "steps": 1}, {"weight": 1.0, "steps": -2},
                {"weight": 1.0, "steps": 1.5}, {"weight": float("nan"), "steps": 1}):
        with pytest.raises(ValueError, match="Warmup"):
            losses.Warmup(**bad)


def test_input_model_is_not_modified():
    model = _mlp()
    before = _leaves(model)
    tr.train(model, _mixture(), optimizer=ADAM, loss_terms=TERMS, epochs=1, batch_size=64,
             key=jax.random.key(0), progress=False)
    for a, b in zip(before, _leaves(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_same_key_same_history_other_key_other_history(reference):
    again = _run()
    assert _numbers(again.history) == _numbers(reference.history)
    _assert_same_model(again.model, reference.model)
    other = _run(key=jax.random.key(1), epochs=1)
    assert _numbers(other.history)[0] != _numbers(reference.history)[0]


@pytest.mark.parametrize(
    "term",
    [losses.JacobianPenalty(),
     losses.LinearizedPenalty(site="h0", noise=nz.RelativeNorm(0.1))],
    ids=["jacobian", "linearized"],
)
def test_robust_terms_train(term):
    res = tr.train(_mlp(), _mixture(), optimizer=ADAM,
                   loss_terms=[(1.0, losses.CrossEntropy()), (0.1, term)], epochs=2,
                   batch_size=100, key=jax.random.key(0), progress=False)
    h = res.history
    assert all(np.isfinite(r[f"train_{term.name}"]) and r[f"train_{term.name}"] > 0 for r in h)
    assert h[-1]["train_loss"] < h[0]["train_loss"]


def test_lenet_on_real_digits_beats_chance_and_calls_back():
    ds = data.subsample(data.load_digits("sklearn8x8"), n_train=600, n_test=300, seed=0)
    model = js.models.LeNet((8, 8, 1), 10, channels=(4, 8), hidden=(32,), kernel_size=3,
                            rngs=nnx.Rngs(0))
    seen = []
    res = tr.train(model, ds, optimizer=tr.make_optimizer("adam", 1e-2), epochs=4,
                   batch_size=50, key=jax.random.key(0), on_epoch=seen.append, progress=True)
    assert [r["epoch"] for r in seen] == [1, 2, 3, 4]
    assert res.history[-1]["test_accuracy"] > 0.5  # chance: 0.1
    assert isinstance(res.model, js.models.LeNet)


def test_float64_parameters_train_in_float64(x64):
    model = js.models.MLP(8, (16,), 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    res = tr.train(model, _mixture(), optimizer=tr.make_optimizer("sgd", 0.1, momentum=0.9),
                   epochs=2, batch_size=100, key=jax.random.key(0), progress=False)
    assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(nnx.state(res.model)))
    assert res.history[-1]["test_accuracy"] > 0.8


# --------------------------------------------------------------------------- checkpoints
def test_resumed_run_is_bitwise_identical(reference, tmp_path):
    first = _run(epochs=2, checkpoint_dir=tmp_path)
    assert len(first.history) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
    resumed = _run(epochs=4, checkpoint_dir=tmp_path)
    assert _numbers(resumed.history) == _numbers(reference.history)
    _assert_same_model(resumed.model, reference.model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]  # keeps the last two
    # Asking for what is already there trains nothing and returns the saved run.
    done = _run(epochs=4, checkpoint_dir=tmp_path)
    assert done.history == resumed.history
    _assert_same_model(done.model, reference.model)


def test_checkpoint_every_and_load_checkpoint(reference, tmp_path):
    _run(epochs=3, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]  # and always the last
    ck = tr.load_checkpoint(tmp_path, _mlp(), optimizer=ADAM)
    assert ck.epoch == 3 and _numbers(ck.history) == _numbers(reference.history)[:3]
    assert jax.tree.structure(ck.opt_state) == jax.tree.structure(
        ADAM.init(nnx.state(_mlp(), nnx.Param)))
    assert tr.load_checkpoint(tmp_path, _mlp(), epoch=2).epoch == 2


def test_interrupted_save_and_damaged_checkpoint_do_not_corrupt_the_run(reference, tmp_path):
    _run(epochs=2, checkpoint_dir=tmp_path)
    # A save killed midway leaves orbax's temporary directory: never a checkpoint.
    leftover = tmp_path / "3.orbax-checkpoint-tmp-1700000000"
    (leftover / "params").mkdir(parents=True)
    (leftover / "params" / "junk").write_bytes(b"\x00" * 10)
    # A finalized checkpoint damaged afterwards: resume falls back to the previous one.
    shutil.rmtree(tmp_path / "2" / "params")
    resumed = _run(epochs=4, checkpoint_dir=tmp_path)
    assert _numbers(resumed.history) == _numbers(reference.history)
    _assert_same_model(resumed.model, reference.model)
    assert not leftover.exists()


def test_resuming_with_other_settings_is_refused(tmp_path):
    _run(epochs=1, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different key_data") as err:
        _run(epochs=2, checkpoint_dir=tmp_path, key=jax.random.key(5))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="different batch_size"):
        _run(epochs=2, checkpoint_dir=tmp_path, batch_size=32)
    wider = js.models.MLP(8, (32,), 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"holds a different model: saved .*\(16,\)"):
        tr.train(wider, _mixture(), optimizer=ADAM, loss_terms=TERMS, epochs=2, batch_size=64,
                 key=jax.random.key(0), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="holds a different optimizer"):
        _run(epochs=2, checkpoint_dir=tmp_path, optimizer=optax.sgd(0.1, momentum=0.9))
    _run(epochs=2, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="trained for 2 epochs, more than epochs=0"):
        _run(epochs=0, checkpoint_dir=tmp_path)


# --------------------------------------------------------------------------- divergence
def test_huge_learning_rate_raises_training_diverged():
    with pytest.raises(tr.TrainingDiverged, match=r"epoch 1, step \d+: .*lower learning rate"
                       ) as err:
        tr.train(_mlp(), _mixture(), optimizer=optax.sgd(1e30), epochs=2, batch_size=64,
                 key=jax.random.key(0), progress=False)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, RuntimeError)


def test_nan_data_raises_and_keeps_the_last_good_checkpoint(reference, tmp_path):
    _run(epochs=1, checkpoint_dir=tmp_path)
    good = tr.load_checkpoint(tmp_path, _mlp(), optimizer=ADAM)
    ds = _mixture()
    x = ds.x_train.copy()
    x[17, 3] = np.nan
    with pytest.raises(tr.TrainingDiverged, match=r"epoch 2, step \d+: loss = nan") as err:
        _run(dataset=ds.replace(x_train=x), epochs=3, checkpoint_dir=tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    after = tr.load_checkpoint(tmp_path, _mlp(), optimizer=ADAM)
    assert after.epoch == 1 and after.history == good.history
    _assert_same_model(after.model, good.model)
    meta = json.loads((tmp_path / "1" / "meta" / "metadata").read_text())
    assert meta["epoch"] == 1
    # The intact checkpoint still resumes into the uninterrupted run.
    resumed = _run(epochs=4, checkpoint_dir=tmp_path)
    assert _numbers(resumed.history) == _numbers(reference.history)


# --------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("name", list(tr.OPTIMIZERS))
def test_every_optimizer_constructs_and_steps(name):
    opt = tr.make_optimizer(name, 1e-2)
    params = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "b": jnp.ones(3)}

    @jax.jit
    def one_step(params):
        grads = jax.tree.map(lambda p: 0.5 - p, params)
        updates, _ = opt.update(grads, opt.init(params), params)
        return optax.apply_updates(params, updates)

    new = one_step(params)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(new))
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(new),
                                                     jax.tree.leaves(params), strict=True))


SCHEDULE_KWARGS = {
    "exponential_decay": {"decay_rate": 0.5, "transition_steps": 10},
    "warmup_constant": {"warmup_steps": 10},
    "piecewise_constant": {"boundaries_and_scales": {"50": 0.1}},
}


@pytest.mark.parametrize("schedule", list(tr.SCHEDULES))
def test_every_schedule_gives_finite_positive_rates(schedule):
    lr = tr.make_schedule(schedule, 0.1, total_steps=100, **SCHEDULE_KWARGS.get(schedule, {}))
    rates = np.asarray(jax.jit(jax.vmap(lr))(jnp.array([0, 1, 50, 99])))
    assert np.all(np.isfinite(rates)) and np.all(rates >= 0) and rates.max() <= 0.1 + 1e-7
    opt = tr.make_optimizer("sgd", 0.1, schedule, SCHEDULE_KWARGS.get(schedule), 100)
    assert callable(opt.update)


def test_warmup_cosine_peaks_at_the_learning_rate():
    lr = tr.make_schedule("warmup_cosine_decay", 0.3, total_steps=100, warmup_steps=10)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(0.3)
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-7)


def test_gradient_clipping_bounds_the_update():
    opt = tr.make_optimizer("sgd", 1.0, clip_norm=0.5)
    g = {"w": jnp.full(4, 10.0)}
    updates, _ = opt.update(g, opt.init(g))
    assert float(optax.tree.norm(updates)) == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: tr.make_optimizer("adamm", 1e-3), "unknown optimizer 'adamm'; valid: sgd, adam"),
        (lambda: tr.make_optimizer("adam", 1e-3, betas=(0.9, 0.99)),
         r"unknown argument\(s\) \['betas'\]; valid: .*b1"),
        (lambda: tr.make_optimizer("adam", 0.0), "learning_rate must be"),
        (lambda: tr.make_optimizer("adam", 1e-3, "cosine"), "unknown schedule 'cosine'; valid"),
        (lambda: tr.make_optimizer("adam", 1e-3, "cosine_decay"), "needs total_steps"),
        (lambda: tr.make_optimizer("adam", 1e-3, "exponential_decay", {}, 10),
         "decay_rate"),
        (lambda: tr.make_optimizer("adam", 1e-3, clip_norm=-1.0), "clip_norm must be"),
        (lambda: tr.train(_mlp(), _mixture(), optimizer=ADAM, epochs=1, batch_size=0,
                          key=jax.random.key(0)), "batch_size must be"),
        (lambda: tr.train(_mlp(), _mixture(), optimizer=ADAM, epochs=1, batch_size=8, key=0),
         "key must be a JAX PRNG key"),
        (lambda: tr.train(_mlp(), _mixture(), optimizer=ADAM, epochs=1, batch_size=8,
                          loss_terms=[losses.JacobianPenalty(site="h7")],
                          key=jax.random.key(0)), "site='h7' is not a site"),
        (lambda: tr.train(_mlp(), _mixture(), optimizer=ADAM, epochs=1, batch_size=8,
                          loss_terms=[losses.NoiseLoss(site="input", noise=nz.WeightRelative())],
                          key=jax.random.key(0)), "cannot be used at input site"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


class _NormDrop(nnx.Module):
    """Dense → BatchNorm → relu → Dropout → dense: state that training must carry."""

    def __init__(self, rngs):
        self.input_shape = (8,)
        self.dense = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, momentum=0.8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        h = self.drop(jax.nn.relu(self.norm(self.dense(x))))
        return self.out(js.models.mark_site(self, "h0", h))


def test_batchnorm_and_dropout_state_is_carried_like_a_plain_optax_loop(tmp_path):
    """Running statistics move, dropout masks change from step to step, the test metrics
    are those of the model in inference mode, and the parameters equal those of the
    same training written by hand with nnx and optax."""
    ds = _mixture()
    key = jax.random.key(0)
    sgd = tr.make_optimizer("sgd", 0.05)
    res = tr.train(_NormDrop(nnx.Rngs(0)), ds, optimizer=sgd,
                   loss_terms=[(1.0, losses.CrossEntropy())], epochs=2, batch_size=64,
                   key=key, progress=False, checkpoint_dir=tmp_path / "ck")
    trained = res.model
    steps = 2 * data.num_batches(ds.n_train, 64)
    assert not np.allclose(trained.norm.mean.get_value(), 0.0, atol=1e-3)
    assert not np.allclose(trained.norm.var.get_value(), 1.0, atol=1e-3)
    assert int(trained.drop.rngs.count.get_value()) == steps  # one mask per step

    # The same training by hand: the batches of train(), one forward per step.
    ref = _NormDrop(nnx.Rngs(0))
    opt = nnx.Optimizer(ref, optax.sgd(0.05), wrt=nnx.Param)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    index = np.arange(ds.n_train)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        opt.update(model, nnx.grad(loss_fn)(model))

    for epoch in range(2):
        shuffle_key, _ = jax.random.split(jax.random.fold_in(key, epoch))
        for idx, _ in data.batches(index, index, 64, key=shuffle_key):
            step(ref, opt, x[idx], y[idx])
    for a, b in zip(jax.tree.leaves(nnx.state(trained, nnx.Param)),
                    jax.tree.leaves(nnx.state(ref, nnx.Param)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trained.norm.mean.get_value(), ref.norm.mean.get_value(),
                               rtol=1e-5, atol=1e-6)

    # Test metrics in inference mode (running statistics, no dropout).
    ref.eval()
    logits = ref(jnp.asarray(ds.x_test))
    acc = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(ds.y_test)))
    assert res.history[-1]["test_accuracy"] == pytest.approx(acc)
    # The state is checkpointed: loading the run gives the trained statistics back.
    loaded = tr.load_checkpoint(tmp_path / "ck", _NormDrop(nnx.Rngs(5))).model
    np.testing.assert_array_equal(loaded.norm.var.get_value(), trained.norm.var.get_value())
    assert int(loaded.drop.rngs.count.get_value()) == steps
