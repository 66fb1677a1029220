"""The attack estimator: the lower end of the worst-case bracket, lower ≤ max ‖ΔF‖ ≤ upper.

Exact on a linear network (the top singular direction is the maximizer), never above the
certified bound, never below what sampling finds, for every kind of site and ball."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import jaxsens as js
from jaxsens import cli, noise


def test_attack_is_exact_on_a_linear_network(x64, make_mlp):
    model = make_mlp(6, [5], 3, activation="identity", seed=1)
    pm = js.split(model)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)))
    law = noise.RelativeNorm(0.1)
    a = js.attack(model, x, site="h0", noise=law, key=jax.random.key(0))
    # F is affine in h0 with Jacobian W1ᵀ: the worst case is σ_max(W1) · ε‖h0‖.
    h0 = pm.apply_with_values(x)[1]["h0"]
    want = (np.linalg.norm(np.asarray(pm.param("layers/1/kernel")), 2) * 0.1
            * np.linalg.norm(np.asarray(h0), axis=1))
    np.testing.assert_allclose(np.asarray(a.lower), want, rtol=1e-10)
    assert a.estimator == "attack" and a.has("lower") and not a.has("upper")


@pytest.mark.parametrize("site,law", [
    ("input", noise.RelativeNorm(0.2)),
    ("h0", noise.RelativeNorm(0.3)),
    ("h1", noise.RelativeNorm(0.3)),
    ("layers/0/kernel", noise.WeightRelative(0.2)),
    ("layers/1/kernel", noise.WeightRelative(0.2, norm="spectral")),
    ("layers/1/kernel", noise.WeightRelative(0.2, norm="linf")),
    ("layers/2/bias", noise.WeightRelative(0.5)),
])
def test_attack_is_bracketed_by_sampling_and_the_bound(x64, make_mlp, site, law):
    model = make_mlp(5, [7, 6], 3, seed=2)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5)))
    a = np.asarray(js.attack(model, x, site=site, noise=law, key=jax.random.key(1)).lower)
    b = np.asarray(js.bound(model, x, site=site, noise=law).upper)
    s = js.sampled(model, x, site=site, noise=law, key=jax.random.key(2), num_samples=300,
                   quantiles=(1.0,))
    assert np.all(a <= b * (1 + 1e-9)), (a, b)
    assert np.all(a >= np.asarray(s.quantiles[:, 0]) * (1 - 1e-9)), (a, s.quantiles)


def test_profile_shows_attack_beside_bound(x64, make_mlp):
    model = make_mlp(5, [7, 6], 3, seed=3)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5)))
    law = noise.RelativeNorm(0.1)
    prof = js.profile(model, x, noise=law, levels=[0.05, 0.1],
                      estimators=("bound", "attack"))
    assert prof.estimators == ("bound", "attack") and all(all(r) for r in prof.present)
    recs = {(r["site"], r["level"], r["estimator"]): r for r in prof.to_records()}
    for site in ("h0", "h1"):
        for lv in (0.05, 0.1):
            assert recs[(site, lv, "attack")]["lower"] <= recs[(site, lv, "bound")]["upper"]
    one = js.attack(model, x, site="h1", noise=law.with_level(0.1), key=None)
    np.testing.assert_allclose(prof.select(site="h1", level=0.1, estimator="attack").lower,
                               one.lower, rtol=1e-6)
    # The default profile does not run the attack (an optimization per example).
    assert "attack" not in js.profile(model, x, noise=law, levels=[0.1],
                                      key=jax.random.key(0)).estimators


def test_multiplicative_noise_has_no_ball(x64, make_mlp):
    model = make_mlp(5, [4], 3, seed=0)
    x = jnp.ones((2, 5))
    with pytest.raises(ValueError, match="multiplicative noise defines no norm ball"):
        js.attack(model, x, site="layers/0/kernel", noise=noise.Multiplicative(0.1))


def test_noise_analysis_reports_attack_beside_bound(tmp_path):
    """An activation_noise analysis asked for the attack shows it with bound/attack."""
    cfg = {"name": "att", "seed": 0, "data": {"name": "digits", "n_train": 100, "n_test": 8},
           "model": {"kind": "mlp", "widths": [12]}, "train": {"epochs": 1, "batch_size": 50},
           "analyses": [{"kind": "activation_noise", "noise": {"law": "relative_norm"},
                         "levels": [0.05, 0.1], "samples": 16, "examples": 4,
                         "estimators": ["sampled", "bound", "attack"]}]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    recs = res["analyses"][0]["records"]
    att = {(r["site"], r["level"]): r["lower"] for r in recs if r["estimator"] == "attack"}
    bnd = {(r["site"], r["level"]): r["upper"] for r in recs if r["estimator"] == "bound"}
    assert att and att.keys() == bnd.keys()
    assert all(att[k] <= bnd[k] for k in att)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "attack (worst found) | bound/attack |" in report
