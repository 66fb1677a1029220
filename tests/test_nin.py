"""Noise Injection Nodes: the node, the compiled dynamics program and its sweep, the phase
analysis of the reconstructed mechanism, and the two analysis kinds through the CLI."""

from __future__ import annotations

import inspect
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxsens import cli, models, nin
from jaxsens.analyses import nin_phases, nin_regularization
from jaxsens.config import load_config


def _linear(n=64, d=4, m=4, theta_scale=0.1, resample="step"):
    """The linear two-layer problem in float64 (call inside ``x64``)."""
    return nin.linear_problem(jax.random.key(3), input_dim=d, width=m, n=n,
                              theta_scale=theta_scale, resample=resample, dtype=jnp.float64)


def _flat(params) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in
            nnx.to_flat_state(params)}


# ------------------------------------------------------------------------------- the node
def test_node_adds_sigma_xi_theta_in_training_and_nothing_in_eval(x64):
    base = models.MLP(3, [5], 2, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    model = nin.attach(base, "layers/0", key=jax.random.key(1), sigma=0.7, theta_scale=2.0)
    node = model.layers[0]
    assert isinstance(node, nin.NoiseInjection)
    assert float(jnp.linalg.norm(node.theta.get_value())) == pytest.approx(2.0, rel=1e-12)
    x = jax.random.normal(jax.random.key(2), (6, 3), jnp.float64)
    keys = nin.example_keys(jax.random.key(4), jnp.arange(6), resample="step", step=0, epoch=0)
    node.keys.set_value(keys)
    z = model.layers[0](x) - base.layers[0](x)
    xi = jnp.stack([jax.random.normal(jax.random.wrap_key_data(k), (), jnp.float64)
                    for k in keys])
    np.testing.assert_allclose(z, 0.7 * xi[:, None] * node.theta.get_value(), rtol=1e-12)
    model.eval()
    assert np.array_equal(model(x), base(x))  # switched off: the plain layer, bitwise
    with pytest.raises(ValueError, match="noise keys for 0"):
        model.train()
        node.keys.set_value(keys[:0])
        model(x)


def test_convolutional_node_is_pixel_wise():
    conv = nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0))
    node = nin.NoiseInjection(conv, jnp.array([1.0, -2.0, 0.5]), sigma=1.0,
                              distribution="uniform")
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
    node.keys.set_value(nin.example_keys(jax.random.key(1), jnp.arange(4), resample="step",
                                         step=0, epoch=0))
    d = node(x) - conv(x)
    per_pixel = d / jnp.array([1.0, -2.0, 0.5])  # one ξ per (example, pixel), all channels
    np.testing.assert_allclose(per_pixel[..., 1], per_pixel[..., 0], rtol=1e-5, atol=1e-6)
    xi = np.asarray(per_pixel[..., 0])
    assert np.unique(np.round(xi, 5)).size > 100  # varies over pixels and examples
    assert np.abs(xi).max() <= math.sqrt(3) + 1e-6  # uniform on [−√3, √3]


@pytest.mark.parametrize("distribution", nin.DISTRIBUTIONS)
def test_unit_noise_has_variance_one(distribution):
    n = 40_000
    draws = np.asarray(nin.unit_noise(jax.random.key(0), (n,), distribution))
    # Sample variance of n draws: standard error ≤ √(μ₄ − 1)/√n ≤ √2/√n (μ₄ ≤ 3).
    assert abs(draws.var() - 1.0) < 5 * math.sqrt(2 / n)
    assert abs(draws.mean()) < 5 / math.sqrt(n)


def test_resampling_policies():
    key, idx = jax.random.key(0), jnp.arange(5)

    def keys(policy, step, epoch):
        return np.asarray(nin.example_keys(key, idx, resample=policy, step=step, epoch=epoch))

    assert np.array_equal(keys("once", 0, 0), keys("once", 9, 3))
    assert np.array_equal(keys("epoch", 0, 1), keys("epoch", 7, 1))
    assert not np.array_equal(keys("epoch", 0, 1), keys("epoch", 0, 2))
    assert not np.array_equal(keys("step", 1, 0), keys("step", 2, 0))
    assert len({tuple(k) for k in keys("step", 1, 0)}) == 5  # every example its own draw


def test_attach_refuses_what_is_no_layer_and_stacks_nothing_silently():
    base = models.MLP(3, [4], 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layer='layers/7'.*choose one of \['layers/0', "
                                         r"'layers/1'\]"):
        nin.attach(base, "layers/7", key=jax.random.key(0))
    model = nin.attach(base, "layers/1", key=jax.random.key(0), count=3)
    assert model.layers[1].theta.get_value().shape == (2, 3)
    assert nin.injection_layers(model) == ("layers/0",)
    assert nin.injection_layers(base) == ("layers/0", "layers/1")  # the input is unchanged
    with pytest.raises(ValueError, match="resample='sometimes' is not valid"):
        nin.attach(base, "layers/0", key=jax.random.key(0), resample="sometimes")


# ------------------------------------------------------------------------ the program
def test_sigma_zero_reproduces_the_plain_model_exactly(x64):
    """σ = 0 adds exactly zero to the layer, so every gradient, step and output of the plain
    model is reproduced; minibatches and momentum included."""
    base = models.MLP(4, [6], 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    model = nin.attach(base, "layers/0", key=jax.random.key(1), sigma=0.0, theta_scale=1.0)
    x = jax.random.normal(jax.random.key(2), (24, 4), jnp.float64)
    y = jax.random.randint(jax.random.key(3), (24,), 0, 3)
    sched = nin.Schedule(steps=12, learning_rate=0.1, batch_size=8, loss="cross_entropy",
                         momentum=0.5, record_every=4, probe=False)
    plain = nin.train_dynamics(base, x, y, key=jax.random.key(5), schedule=sched)
    noisy = nin.train_dynamics(model, x, y, key=jax.random.key(5), schedule=sched)
    np.testing.assert_allclose(noisy.trace.loss, plain.trace.loss, rtol=0, atol=1e-12)
    np.testing.assert_allclose(noisy.trace.clean_loss, plain.trace.clean_loss, rtol=0,
                               atol=1e-12)
    a, b = _flat(plain.params), _flat(noisy.params)
    for name, value in a.items():
        other = b[name.replace("layers/0/", "layers/0/layer/")]
        np.testing.assert_allclose(other, value, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(b["layers/0/theta"],
                                  np.asarray(model.layers[0].theta.get_value()))
    trained = nin.with_params(model, noisy.params)
    trained.eval()
    np.testing.assert_allclose(trained(x), nin.with_params(base, plain.params)(x), rtol=0,
                               atol=1e-12)


def test_same_key_same_trajectory_and_measurements_of_the_linear_model(x64):
    prob = _linear()
    sched = nin.Schedule(steps=30, learning_rate=0.5, batch_size=16, record_every=3)

    def run(k):
        return nin.train_dynamics(prob.model, prob.x, prob.y, key=jax.random.key(k),
                                  schedule=sched, sigma=0.4)

    a, b, c = run(0), run(0), run(1)
    for fa, fb in zip(a.trace, b.trace, strict=True):
        assert np.array_equal(np.asarray(fa), np.asarray(fb), equal_nan=True)
    assert not np.array_equal(np.asarray(a.trace.theta_norm), np.asarray(c.trace.theta_norm))
    # At step 0, θ ∥ v: the curvature along θ of ½(f − y)² is ‖v‖², the readout |v·θ|.
    v = np.asarray(prob.readout)
    theta0 = np.asarray(prob.model.layers[0].theta.get_value())
    assert a.trace.curvature[0, 0] == pytest.approx(float(v @ v), rel=1e-10)
    assert a.trace.readout[0, 0] == pytest.approx(abs(float(v @ theta0)), rel=1e-10)
    assert a.trace.clean_loss[0] == pytest.approx(0.0, abs=1e-25)  # starts at the minimum
    assert a.trace.step.tolist() == list(range(0, 31, 3))


def test_vmapped_sweep_equals_the_python_loop(x64):
    prob = _linear(resample="epoch")
    sched = nin.Schedule(steps=20, learning_rate=0.5, batch_size=32, record_every=5)
    sigmas = [0.2, 0.9, 2.5]
    keys = jax.random.split(jax.random.key(7), 2)
    swept = nin.sweep(prob.model, prob.x, prob.y, sigmas=sigmas, keys=keys, schedule=sched)
    assert swept.trace.theta_norm.shape == (3, 2, 5, 1)
    for i, s in enumerate(sigmas):
        for r in range(2):
            one = nin.train_dynamics(prob.model, prob.x, prob.y, key=keys[r], schedule=sched,
                                     sigma=s)
            for f_sweep, f_one in zip(swept.trace, one.trace, strict=True):
                np.testing.assert_allclose(np.asarray(f_sweep)[i, r], np.asarray(f_one),
                                           rtol=1e-9, atol=1e-13)
            for p_sweep, p_one in zip(jax.tree.leaves(swept.params),
                                      jax.tree.leaves(one.params), strict=True):
                np.testing.assert_allclose(np.asarray(p_sweep)[i, r], np.asarray(p_one),
                                           rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("c_target", [0.01, 0.04])
def test_decay_rate_matches_eta_sigma2_lambda_in_the_decay_phase(x64, c_target):
    """The linear model at its minimum, θ₀ = 0.1 v̂, full batch of n = 256, Gaussian ξ
    redrawn per step, float64. With c = ησ²λ the coupling obeys, step by step,
    ‖θ_{t+1}‖ = |1 − ησ̂_t² λ_t| ‖θ_t‖ up to terms of order ‖θ‖²/‖v‖² in the slow change of
    λ_t (which the trace measures, so λ̄ absorbs it) and of the residual (zero at the start),
    where σ̂_t² = σ² χ²_n / n. The rate measured over the window of t_w ≈ 3/c steps is
    r̂ = (1/t_w) Σ −ln(1 − c(1 + δ_t)), δ_t of variance 2/n, so
      r̂ / c − 1 = c/2 + O(c²)          (discrete step: −ln(1 − c) = c + c²/2 + …)
                 + N(0, 2/(n t_w))      (the batch's own σ̂²),
    and the test allows c/2 + c² + 4·√(2/(n t_w)) (four standard deviations) + 0.005 for the
    O(‖θ₀‖²/‖v‖²) = O(0.01/λ) coupling of θ and v: 0.036 at c = 0.01, 0.055 at c = 0.04.
    Also the phase must be "decay" and the measured and predicted phases agree."""
    n, eta = 256, 0.5
    prob = _linear(n=n)
    lam0 = float(prob.readout @ prob.readout)
    sigma = math.sqrt(c_target / (eta * lam0))
    t_w = 3 / c_target
    steps = int(round(1.3 * t_w / 10)) * 10
    sched = nin.Schedule(steps=steps, learning_rate=eta, record_every=1)
    dyn = nin.train_dynamics(prob.model, prob.x, prob.y, key=jax.random.key(11),
                             schedule=sched, sigma=sigma)
    rows = nin.phase_table(jax.tree.map(lambda a: np.asarray(a)[None, None], dyn.trace),
                           [sigma], learning_rate=eta)
    (row,) = rows
    assert row["phase"] == "decay" and row["phase_predicted"] == "decay"
    c = row["predicted_decay_rate"]
    assert c == pytest.approx(c_target, rel=0.02)  # λ̄ stays at λ₀
    tol = c / 2 + c**2 + 4 * math.sqrt(2 / (n * t_w)) + 0.005
    assert abs(row["measured_decay_rate"] / c - 1) < tol, (row["measured_decay_rate"], c, tol)
    # The step's own gradient drift equals ησ²λ here (ξ² averages to 1 over the batch).
    assert row["effective_decay_rate"] == pytest.approx(c, rel=4 * math.sqrt(2 / n))


def test_phases_and_findings_of_a_small_linear_sweep():
    prob = nin.linear_problem(jax.random.key(0), input_dim=8, width=8, n=128)
    eta = 0.5
    lam0 = float(prob.readout @ prob.readout)
    cs = np.array([2e-4, 0.05, 0.3, 2.6, 3.3, 6.0])
    sigmas = np.sqrt(cs / (eta * lam0))
    sched = nin.Schedule(steps=300, learning_rate=eta)
    dyn = nin.sweep(prob.model, prob.x, prob.y, sigmas=sigmas,
                    keys=jax.random.split(jax.random.key(1), 1), schedule=sched)
    rows = nin.phase_table(dyn.trace, sigmas, learning_rate=eta)
    assert [r["phase"] for r in rows] == ["decoupled", "decay", "decay", "catapult",
                                          "catapult", "divergent"]
    assert [r["phase"] for r in rows] == [r["phase_predicted"] for r in rows]
    found = nin.phase_findings(rows)
    assert found["agreement"] == 1.0
    assert 2.0 < found["catapult_onset"] < 2.75 and found["last_decay"] < 2.0
    assert 4.0 < found["divergence_onset"] and found["last_finite"] < 4.0
    assert abs(found["decay_time_slope"] + 2) < 0.1


def test_measured_phase_labels():
    up_down = np.r_[1.0, 3.0, 0.5, 0.1]
    assert nin.measured_phase(up_down) == "catapult"
    assert nin.measured_phase(np.r_[1.0, 0.9, 0.8]) == "decoupled"
    assert nin.measured_phase(np.r_[1.0, 0.5, 0.2]) == "decay"
    assert nin.measured_phase(np.r_[1.0, 5.0, np.inf]) == "divergent"
    assert nin.measured_phase(np.r_[1.0, 0.2], clean_loss=np.r_[2.3, 2.29],
                              chance_loss=math.log(10), readout=np.r_[0.5, 0.0]) == "collapsed"
    assert nin.measured_phase(np.r_[1.0, 0.9], clean_loss=np.r_[2.3, 2.29],
                              chance_loss=math.log(10), readout=np.r_[0.5, 0.4]) == "decoupled"
    assert nin.predicted_phase(1e-4, 1000) == "decoupled"
    assert nin.predicted_phase(3.0, 1000) == "catapult"
    assert nin.measured_decay_rate(np.arange(4), np.exp(-0.5 * np.arange(4))) == \
        pytest.approx(0.5)


# ---------------------------------------------------------------------- through the CLI
TINY = {
    "name": "nin_tiny", "seed": 0,
    "data": {"name": "digits8x8", "n_train": 40, "n_test": 20},
    "model": {"kind": "mlp", "widths": [4]},
    "train": {"epochs": 0},
}


def _write(tmp_path, analyses) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, analyses=analyses)))
    return str(path)


def test_both_kinds_run_end_to_end_through_the_cli(tmp_path):
    path = _write(tmp_path, [
        {"kind": "nin_phases", "name": "lin", "num_sigmas": 3, "sigma_min": 0.1,
         "sigma_max": 3.0, "refine": [], "steps": 40, "seeds": 2, "n_train": 32,
         "input_dim": 4, "width": 4},
        {"kind": "nin_phases", "name": "mlp", "problem": "mlp", "dataset": "digits8x8",
         "sigmas": [1.0, 10.0], "refine": [2.5], "n_train": 64, "widths": [8], "steps": 20,
         "batch_size": 32, "record_every": 2, "seeds": 1, "learning_rate": 0.1},
        {"kind": "nin_regularization", "dataset": "digits8x8", "n_train": 64, "widths": [8],
         "steps": 20, "batch_size": 32, "seeds": 2, "record_every": 10, "examples": 24,
         "samples": 4, "input_sigmas": [0.2], "nin_count": 4, "nin_sigma": 0.5,
         "nin_theta_scale": 1.0},
    ])
    out = tmp_path / "run"
    assert cli.main(["run", path, "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    lin, mlp, reg = (a["records"] for a in res["analyses"])
    assert len(lin) == 3 and len(mlp) == 3
    for r in lin + mlp:
        assert {"sigma", "phase", "measured_decay_rate", "predicted_decay_rate"} <= set(r)
        assert r["phase"] in nin.MEASURED_PHASES and r["phase_predicted"] in nin.PHASES
        assert r["level"] == r["sigma"] and len(r["trace_theta_norm"]) == len(r["trace_step"])
    small = min(lin, key=lambda r: r["sigma"])
    assert small["measured_decay_rate"] == pytest.approx(small["predicted_decay_rate"],
                                                         rel=0.05)
    assert {r["method"] for r in reg} == set(nin_regularization.METHODS)
    for r in reg:
        assert 0 <= r["accuracy"] <= 1 and len(r["accuracy_seeds"]) == 2
        if r["level"] > 0:
            assert r["jacobian_norm"] > 0 and 0 <= r["linearized_accuracy"] <= 1
    figs = {p.name for p in (out / "figures").iterdir()}
    assert {"lin_phase_diagram.png", "lin_trajectories.png", "mlp_phase_diagram.png",
            "nin_regularization_accuracy.png", "nin_regularization_theta.png"} <= figs
    report = (out / "report.md").read_text()
    assert "Which reconstructed predictions hold here" in report
    assert "not from the paper's text" in report and "‖J‖_F" in report


@pytest.mark.parametrize("analysis, pattern", [
    ({"kind": "nin_phases", "resample": "sometimes"},
     r"analyses\[0\]\.resample: unknown resampling policy 'sometimes'.*'once', 'epoch', "
     r"'step'"),
    ({"kind": "nin_phases", "sigma_min": 2.0, "sigma_max": 1.0},
     r"analyses\[0\]\.sigma_max: must exceed sigma_min=2\.0"),
    ({"kind": "nin_phases", "steps": 10, "record_every": 3},
     r"analyses\[0\]\.record_every: must divide steps=10"),
    ({"kind": "nin_phases", "problem": "mlp", "widths": [4], "layer": 3},
     r"analyses\[0\]\.layer: the MLP has dense layers 0\.\.1"),
    ({"kind": "nin_regularization", "methods": ["plain", "mystery"]},
     r"analyses\[0\]\.methods\[1\]: unknown method 'mystery'.*'plain', 'nin', 'dropout', 'l2'"),
    ({"kind": "nin_regularization", "distribution": "cauchy"},
     r"analyses\[0\]\.distribution: unknown noise distribution 'cauchy'"),
])
def test_a_bad_config_value_fails_in_one_line(tmp_path, capsys, analysis, pattern):
    path = _write(tmp_path, [analysis])
    assert cli.main(["run", path, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert re.search(pattern, err), err
    assert not (tmp_path / "run").exists()


def test_builtin_experiments_are_registered():
    for name in ("nin_phases_linear", "nin_phases_mlp", "nin_regularization"):
        cfg = load_config(name)
        assert cfg.name == name and cfg.analyses[0].kind in ("nin_phases",
                                                             "nin_regularization")
    assert load_config("nin_phases_linear").analyses[0].problem == "linear"


# ------------------------------------------------------------------------------- the API
def test_public_api_is_documented():
    """As tests/test_docstrings.py, for the NIN package and its analysis kinds."""
    offenders = []
    for module in (nin, nin_phases, nin_regularization):
        names = getattr(module, "__all__", None) or [n for n in vars(module)
                                                     if not n.startswith("_")]
        for name in names:
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue
            doc = inspect.getdoc(obj) or ""
            if inspect.isclass(obj):
                if not doc.strip() or doc.startswith(f"{obj.__name__}("):
                    offenders.append(f"{name}: no docstring")
                continue
            if not inspect.isfunction(inspect.unwrap(obj)) if callable(obj) else True:
                continue
            sig = inspect.signature(inspect.unwrap(obj))
            if not doc.strip():
                offenders.append(f"{name}: no docstring")
            elif sig.parameters and not re.search(r"^\s*Args:\s*$", doc, re.MULTILINE):
                offenders.append(f"{name}: no Args")
            elif sig.return_annotation not in (None, "None") and not re.search(
                    r"^\s*Returns:\s*$", doc, re.MULTILINE):
                offenders.append(f"{name}: no Returns")
    assert not offenders, offenders


def test_the_notebook_is_committed_without_outputs():
    path = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "nin_phases.ipynb"
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert any("nin.sweep" in "".join(c["source"]) for c in code)
