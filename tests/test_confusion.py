"""Interclass confusion from the analytic moments: formula, Monte Carlo, analysis kind.

Formula checks run in float64. Monte Carlo comparisons use Z = 5 binomial standard errors
(false alarm rate ~6e-7 per cell) computed from the sample count; the comparison on a
two-hidden-layer MLP adds a modelling slack of 0.02 per cell for the two-stage
linearization and the Gaussian treatment of the logits at sigma = 0.05 (measured: ~0.01).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from jax.test_util import check_grads
from scipy.stats import norm

import jaxsens as js
import jaxsens.moments as jm
from jaxsens import cli
from jaxsens.config import ConfigError, parse_config
from jaxsens.report import render_report

Z = 5.0
SLACK = 0.02  # two-stage + Gaussian-logit modelling error at SIGMA, per cell
SIGMA = 0.05


def _reference(mu, cov, y):
    """P_j by the formula with scipy's normal cdf; the sign rule where the variance is 0."""
    mu, cov = np.asarray(mu), np.asarray(cov)
    out = np.zeros(len(mu))
    for j in range(len(mu)):
        if j == y:
            continue
        var = cov[j, j] + cov[y, y] - 2 * cov[j, y]
        d = mu[j] - mu[y]
        out[j] = norm.cdf(d / np.sqrt(var)) if var > 1e-12 else float(d > 0)
    return out


def _hand_made():
    """Five logits: F3 = F0 and F4 = F0 + 0.5 exactly (zero-variance differences to F0)."""
    mu = jnp.array([0.3, 1.0, -0.2, 0.3, 0.8])
    cov = jnp.array([[1.0, 0.5, 0.0, 1.0, 1.0],
                     [0.5, 2.0, 0.1, 0.5, 0.5],
                     [0.0, 0.1, 0.5, 0.0, 0.0],
                     [1.0, 0.5, 0.0, 1.0, 1.0],
                     [1.0, 0.5, 0.0, 1.0, 1.0]])
    return mu, cov


# --------------------------------------------------------------------------- formula
def test_overtake_probabilities_match_scipy_and_the_sign_rule(x64):
    mu, cov = _hand_made()
    for y in range(5):
        got = np.asarray(jm.overtake_probabilities(jm.GaussianMoments(mu, cov), y))
        np.testing.assert_allclose(got, _reference(mu, cov, y), rtol=1e-12, atol=1e-15)
    got = np.asarray(jm.overtake_probabilities(jm.GaussianMoments(mu, cov), 0))
    assert got[0] == 0.0 and got[3] == 0.0 and got[4] == 1.0  # tie -> 0, ahead -> 1
    # Jit, vmap over labels, float32: the same numbers.
    batched = jax.jit(jax.vmap(jm.overtake_probabilities, in_axes=(None, 0)))
    rows = batched(jm.GaussianMoments(mu, cov), jnp.arange(5))
    assert rows.shape == (5, 5) and np.all(np.diagonal(np.asarray(rows)) == 0)
    f32 = jm.overtake_probabilities(jm.GaussianMoments(mu.astype(jnp.float32),
                                                       cov.astype(jnp.float32)), 0)
    np.testing.assert_allclose(np.asarray(f32), _reference(mu, cov, 0), atol=1e-6)


def test_overtake_probabilities_match_monte_carlo_on_a_gaussian(x64):
    rng = np.random.default_rng(3)
    k, n = 4, 200_000
    root = rng.standard_normal((k, k)) * 0.8
    cov = jnp.asarray(root @ root.T + 0.2 * np.eye(k))
    mu = jnp.asarray(rng.standard_normal(k) * 0.7)
    draws = np.asarray(jax.random.multivariate_normal(jax.random.key(0), mu, cov, (n,)))
    for y in range(k):
        p = np.asarray(jm.overtake_probabilities(jm.GaussianMoments(mu, cov), y))
        freq = (draws > draws[:, [y]]).mean(axis=0)
        se = np.sqrt(np.maximum(p * (1 - p), 1.0 / n) / n)
        assert np.all(np.abs(freq - p) <= Z * se), (y, p, freq, se)
        assert np.any((p > 0.05) & (p < 0.95))  # not a trivial comparison


def test_overtake_probabilities_gradients(x64):
    rng = np.random.default_rng(4)
    root = rng.standard_normal((4, 4))
    cov = jnp.asarray(root @ root.T + 0.5 * np.eye(4))
    mu = jnp.asarray(rng.standard_normal(4))
    check_grads(lambda m: jm.overtake_probabilities(jm.GaussianMoments(m, cov), 1), (mu,),
                order=1, modes=["rev"])
    # Zero-variance differences (and the label's own entry): finite, NaN-free gradients.
    mu0, cov0 = _hand_made()
    g_mu, g_cov = jax.grad(lambda m, c: jnp.sum(jm.overtake_probabilities(
        jm.GaussianMoments(m, c), 0)), argnums=(0, 1))(mu0, cov0)
    assert np.all(np.isfinite(np.asarray(g_mu))) and np.all(np.isfinite(np.asarray(g_cov)))


# --------------------------------------------------------------------------- matrices
def _near_boundaries(model, x, sigma, pairs=8):
    """Points ±sigma/2 from the decision boundary on segments between inputs of different
    predicted classes, so the overtaking probabilities are far from 0 and 1."""
    f = jax.jit(lambda v: jnp.argmax(model(v), -1))
    cls = np.asarray(f(x))
    ab = np.array([(a, b) for a in range(len(x)) for b in range(a + 1, len(x))
                   if cls[a] != cls[b]])[:pairs]
    start, end = x[ab[:, 0]], x[ab[:, 1]]
    lo, hi = np.zeros(len(ab)), np.ones(len(ab))
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        same = np.asarray(f(start + mid[:, None] * (end - start))) == cls[ab[:, 0]]
        lo, hi = np.where(same, mid, lo), np.where(same, hi, mid)
    step = sigma / np.linalg.norm(end - start, axis=1)
    return np.concatenate([start + (lo + off * step)[:, None] * (end - start)
                           for off in (-0.5, 0.5)])


def test_predicted_matrix_matches_monte_carlo_and_empty_rows_are_nan(x64):
    model = js.models.MLP(6, (16, 16), 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((12, 6))
    x = np.concatenate([x, _near_boundaries(model, x, SIGMA)])
    y = np.arange(len(x)) % 2  # class 2 has no examples
    n = 4000
    pred = jm.confusion_matrix(model, x, y, sigma=SIGMA, num_classes=3)
    mc = jm.sampled_confusion_matrix(model, x, y, sigma=SIGMA, key=jax.random.key(0),
                                     num_samples=n, chunk=1000)
    p, s = np.asarray(pred.matrix), np.asarray(mc.matrix)
    assert mc.stderr is not None and pred.stderr is None
    se = np.asarray(mc.stderr)
    assert p.shape == s.shape == (3, 3)
    np.testing.assert_array_equal(np.asarray(pred.counts), [len(x) - len(x) // 2,
                                                            len(x) // 2, 0])
    np.testing.assert_array_equal(np.asarray(mc.counts), np.asarray(pred.counts))
    assert np.all(np.isnan(p[2])) and np.all(np.isnan(s[2])) and np.all(np.isnan(se[2]))
    assert np.all(p[[0, 1], [0, 1]] == 0) and np.all(s[[0, 1], [0, 1]] == 0)
    off = ~np.eye(3, dtype=bool)
    off[2] = False
    assert np.all(np.abs(p - s)[off] <= Z * se[off] + SLACK), (p, s, se)
    assert np.any((s[off] > 0.1) & (s[off] < 0.9))  # some cells far from 0 and 1
    # The standard error is the binomial one from the sample count: below 1/(2 sqrt(n)).
    assert np.all(se[off] <= 0.5 / np.sqrt(n))
    # The draws of example i use fold_in(key, i): the chunk size does not change them.
    again = jm.sampled_confusion_matrix(model, x, y, sigma=SIGMA, key=jax.random.key(0),
                                        num_samples=n, chunk=700)
    np.testing.assert_allclose(np.asarray(again.matrix), s, rtol=1e-12)


def test_bad_arguments_are_one_line_value_errors(x64):
    model = js.models.MLP(4, (8,), 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x, y = np.zeros((2, 4)), np.array([0, 1])
    cases = [
        (lambda: jm.confusion_matrix(model, x, y, sigma=0.0), "sigma"),
        (lambda: jm.confusion_matrix(model, x, np.array([0, 3]), sigma=0.1), r"\[0, 3\)"),
        (lambda: jm.confusion_matrix(model, x, y, sigma=0.1, num_classes=4), "num_classes"),
        (lambda: jm.confusion_matrix(model, x, y, sigma=0.1, method="exact"), "method"),
        (lambda: jm.sampled_confusion_matrix(model, x, y, sigma=0.1, key=jax.random.key(0),
                                             num_samples=0), "num_samples"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- analysis kind
BASE = {
    "name": "confusion",
    "seed": 1,
    "data": {"name": "digits", "n_train": 200, "n_test": 40},
    "model": {"kind": "mlp", "widths": [16, 12]},
    "train": {"epochs": 0, "batch_size": 50},
}


def test_the_analysis_kind_runs_end_to_end(tmp_path):
    analysis = {"kind": "interclass_confusion", "name": "conf", "sigma": 0.3, "examples": 40,
                "samples": 200}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(dict(BASE, analyses=[analysis])))
    run_dir = tmp_path / "run"
    assert cli.main(["run", str(path), "--out", str(run_dir), "--quiet"]) == 0
    res = json.loads((run_dir / "results.json").read_text())
    (entry,) = res["analyses"]
    assert entry["kind"] == "interclass_confusion"
    (rec,) = entry["records"]
    k = res["data"]["num_classes"]
    assert rec["num_classes"] == k and sum(rec["counts"]) == 40
    for key in ("predicted", "sampled", "sampled_stderr"):
        assert len(rec[key]) == k and all(len(row) == k for row in rec[key])
    p = np.array(rec["predicted"], dtype=float)  # None (empty rows) -> NaN
    s = np.array(rec["sampled"], dtype=float)
    assert np.all(np.isnan(p) == np.isnan(s))
    assert np.all(np.isnan(p[np.array(rec["counts"]) == 0]))
    off = ~np.eye(k, dtype=bool) & np.isfinite(p)
    assert rec["max_abs_diff"] == pytest.approx(np.abs(p - s)[off].max())
    assert rec["mean_abs_diff"] == pytest.approx(np.abs(p - s)[off].mean())
    for name in ("conf_matrices.png", "conf_scatter.png"):
        assert (run_dir / "figures" / name).stat().st_size > 0
    summary = render_report(run_dir)
    assert "largest y → j" in summary and "conf" in summary
    report = (run_dir / "report.md").read_text()
    assert "## conf (interclass confusion under Gaussian input noise)" in report
    assert "| true class | overtaking class | predicted | sampled ± se |" in report
    assert "![conf_matrices.png](figures/conf_matrices.png)" in report


@pytest.mark.parametrize("sigma,pattern", [
    (0.0, r"analyses\[0\]\.sigma: .*greater than 0"),
    (-0.1, r"analyses\[0\]\.sigma: .*greater than 0"),
    (None, r"analyses\[0\]\.sigma: an interclass_confusion analysis needs"),
])
def test_bad_sigma_is_a_one_line_config_error(sigma, pattern):
    analysis = {"kind": "interclass_confusion"}
    if sigma is not None:
        analysis["sigma"] = sigma
    with pytest.raises(ConfigError, match=pattern) as info:
        parse_config(dict(BASE, analyses=[analysis]))
    assert "\n" not in str(info.value)
