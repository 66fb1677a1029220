"""Uses of the analytic moments: sensitivity maps, Gaussian noise attacks, expected CE loss.

Exact identities (the map against ``output_moments``, the methods against each other) are
checked in float64 to 1e-10. Monte Carlo comparisons on the true network use one-hidden-
layer nets, where the two-stage moments are exact, and a tolerance of Z = 4 standard errors
estimated from the same draws (false alarm rate ~6e-5 per comparison). The second-order
expected cross-entropy additionally carries its derived truncation bound
``(sqrt(2)/12) E||F - m||^3`` (see ``jaxsens.moments.expected_cross_entropy``), also
estimated from the draws.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

import jaxsens as js
import jaxsens.moments as jm
from jaxsens import data, losses
from jaxsens import train as tr

Z = 4.0
REMAINDER = math.sqrt(2.0) / 12.0  # |E lse(F) - 2nd-order expansion| <= REMAINDER E||F - m||^3


def _input(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(n))


def _noisy_outputs(pm, x1, delta, std, key, n):
    """``n`` forward passes of the true network at ``x1 + delta + std * eps``."""
    eps = jax.random.normal(key, (n, *x1.shape), x1.dtype)
    return jax.jit(lambda e: pm.apply(x1 + delta + std * e))(eps).reshape(n, -1)


# --------------------------------------------------------------------------- sensitivity map
@pytest.mark.parametrize("method", jm.METHODS)
def test_map_equals_output_moments_with_noise_on_one_pixel_or_block(x64, make_mlp, method):
    pm = js.split(make_mlp(16, (9, 7), 4, seed=1))
    x1, sigma = _input(16), 0.7
    eye = jnp.eye(16)
    blocks = [np.ravel_multi_index(np.mgrid[r:r + 2, c:c + 2].reshape(2, -1), (4, 4))
              for r in (0, 2) for c in (0, 2)]
    covs = jnp.concatenate([
        sigma**2 * eye[:, :, None] * eye[:, None, :],  # sigma^2 e_i e_i^T
        jnp.stack([sigma**2 * jnp.diag(jnp.zeros(16).at[b].set(1.0)) for b in blocks])])
    ref = jax.jit(jax.vmap(lambda c: jnp.trace(jm.output_moments(
        pm, x1, jnp.zeros(16), c, method=method).cov)))(covs)

    pixel = jm.sensitivity_map(pm, x1, sigma=sigma, method=method)
    block = jm.sensitivity_map(pm, x1, sigma=sigma, method=method, region=2, image_shape=(4, 4))
    assert pixel.shape == (16,) and block.shape == (2, 2)
    np.testing.assert_allclose(np.asarray(pixel), np.asarray(ref[:16]), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(block).ravel(), np.asarray(ref[16:]), rtol=1e-10)


def test_map_of_a_cnn_has_one_entry_per_pixel_or_block_and_channel(x64, make_lenet):
    pm = js.split(make_lenet(seed=2))
    x1 = _input(256, 3).reshape(16, 16, 1)
    sigma = 0.5
    pixel = jm.sensitivity_map(pm, x1, sigma=sigma)
    block = jm.sensitivity_map(pm, x1, sigma=sigma, region=4)
    assert pixel.shape == (16, 16, 1) and block.shape == (4, 4, 1)
    assert bool(jnp.all(pixel > 0)) and bool(jnp.all(block > 0))
    # Two entries against the dense d x d route.
    e = jnp.zeros((16, 16, 1)).at[5, 9, 0].set(1.0).reshape(-1)
    b = jnp.zeros((16, 16, 1)).at[8:12, 4:8, 0].set(1.0).reshape(-1)
    ref = jax.jit(jax.vmap(lambda v: jnp.trace(jm.output_moments(
        pm, x1, jnp.zeros_like(x1), sigma**2 * jnp.diag(v)).cov)))(jnp.stack([e, b]))
    np.testing.assert_allclose(float(pixel[5, 9, 0]), float(ref[0]), rtol=1e-10)
    np.testing.assert_allclose(float(block[2, 1, 0]), float(ref[1]), rtol=1e-10)
    with pytest.raises(ValueError, match="region=3 must divide"):
        jm.sensitivity_map(pm, x1, sigma=sigma, region=3)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        jm.sensitivity_map(pm, x1, sigma=0.0)


def test_blocks_sum_pixels_in_the_linear_regime(x64, make_mlp):
    # With sigma below min|z0| / (40 max|A|) every kink is > 40 standard deviations from the
    # clean pre-activations (phi(40) underflows to 0 in float64), so the exact moments are
    # those of the linearization: map_R = sigma^2 ||J P_R||_F^2 = the sum over the block's
    # pixels of sigma^2 ||J e_i||^2. Blocks go through relu_moments, whose covariance
    # E[r r^T] - E r E r^T cancels to relative eps (|z0| / sigma)^2 (~1e-10 here).
    pm = js.split(make_mlp(16, (9, 7), 4, seed=1))
    x1 = _input(16)
    ts = jm.two_stage_linearization(pm, x1)
    z0 = ts.A @ x1 + ts.c1
    sigma = float(jnp.min(jnp.abs(z0))) / (40 * float(jnp.max(jnp.abs(ts.A))))
    jac = jax.jacfwd(lambda v: pm.apply(v[None])[0])(x1)
    pixel = jm.sensitivity_map(pm, x1, sigma=sigma)
    block = jm.sensitivity_map(pm, x1, sigma=sigma, region=2, image_shape=(4, 4))
    np.testing.assert_allclose(np.asarray(pixel), sigma**2 * np.sum(np.asarray(jac)**2, 0),
                               rtol=1e-10)
    sums = np.asarray(pixel).reshape(2, 2, 2, 2).sum(axis=(1, 3))
    np.testing.assert_allclose(np.asarray(block), sums, rtol=1e-7)


@pytest.mark.parametrize("where", [(0, 0), (1, 2), (3, 1), "block"])
def test_map_of_one_hidden_layer_matches_monte_carlo(x64, make_mlp, where):
    # One hidden layer: two-stage moments are exact, so the map is tr Cov F exactly. The
    # sample trace T = sum_n ||F_n - mean||^2 / (n - 1) has standard error
    # ~ std(||F_n - mean||^2) / sqrt(n).
    pm = js.split(make_mlp(16, (24,), 5, seed=4))
    x1, sigma, n = _input(16, 5), 0.8, 40_000
    smap = jm.sensitivity_map(pm, x1, sigma=sigma, region=1 if where != "block" else 2,
                              image_shape=(4, 4))
    mask = jnp.zeros((4, 4))
    mask = mask.at[2:4, 2:4].set(1.0) if where == "block" else mask.at[where].set(1.0)
    exact = float(smap[1, 1] if where == "block" else smap[where])
    out = np.asarray(_noisy_outputs(pm, x1, 0.0, sigma * mask.reshape(-1),
                                    jax.random.key(hash(str(where)) % 2**31), n))
    sq = np.sum((out - out.mean(0))**2, axis=1)
    est, se = sq.sum() / (n - 1), sq.std(ddof=1) / math.sqrt(n)
    assert abs(est - exact) < Z * se, (est, exact, se)
    assert se < 0.05 * exact  # the check has teeth


def test_map_figure_to_file_and_to_axes(x64, make_mlp, tmp_path):
    from matplotlib.figure import Figure

    pm = js.split(make_mlp(16, (9,), 3, seed=1))
    x1 = _input(16)
    smap = jm.sensitivity_map(pm, x1, sigma=0.3)
    path = tmp_path / "map.png"
    fig = jm.sensitivity_map_figure(smap, path, image=x1, title="pixel noise")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2  # the map and its colorbar
    assert fig.axes[0].get_images()[1].get_array().shape == (4, 4)  # square from flat
    ax = Figure().add_subplot()
    block = jm.sensitivity_map(pm, x1, sigma=0.3, region=2, image_shape=(4, 4))
    assert jm.sensitivity_map_figure(block, ax, image=x1.reshape(4, 4)) is ax.figure
    assert ax.get_images()[1].get_extent() == [-0.5, 3.5, 3.5, -0.5]  # stretched over it


# --------------------------------------------------------------------------- attacks
@pytest.fixture
def shallow(x64, make_mlp):
    pm = js.split(make_mlp(16, (24,), 5, seed=3))
    x1 = _input(16)
    y = int(jnp.argmax(pm.apply(x1[None])[0]))
    return pm, x1, y


def _energy(res):
    return float(jnp.sum(res.mean_shift**2) + jnp.sum(res.std**2))


def test_noise_only_attack_improves_keeps_budget_and_matches_monte_carlo(shallow):
    # Zero-mean noise: the expected margin moves only through the ReLU curvature, which the
    # exact moments capture; Monte Carlo on the true network must agree within Z se.
    pm, x1, y = shallow
    budget = 3.0
    res = jm.gaussian_noise_attack(pm, x1, y, budget=budget, objective="margin",
                                   optimize_mean=False, steps=150, learning_rate=0.05)
    assert res.history.shape == (150,)
    assert float(res.predicted_objective) > float(res.history[0]) + 0.05
    assert float(res.history[-1]) >= float(jnp.max(res.history[:75])) - 1e-3  # no collapse
    assert _energy(res) <= budget**2 * (1 + 1e-12)
    assert bool(jnp.all(res.mean_shift == 0)) and bool(jnp.all(res.std >= 0))
    a, b = (int(v) for v in res.margin_classes)
    assert b == y and a != y
    m = res.output.mean
    np.testing.assert_allclose(float(res.predicted_margin), float(m[a] - m[b]), rtol=1e-12)

    chk = jm.check_attack(pm, x1, y, res, key=jax.random.key(0), num_samples=20_000)
    assert abs(float(chk.margin) - float(res.predicted_margin)) < Z * float(chk.margin_stderr)
    assert float(chk.margin_stderr) < 0.05  # the check has teeth
    # The clean margin, by contrast, is off by many standard errors.
    f0 = pm.apply(x1[None])[0]
    assert abs(float(chk.margin) - float(f0[a] - f0[b])) > 10 * float(chk.margin_stderr)


def test_targeted_attack_raises_the_target_margin_within_budget(shallow):
    pm, x1, y = shallow
    target = (y + 1) % 5
    res = jm.gaussian_noise_attack(pm, x1, y, budget=1.5, target=target, steps=150,
                                   learning_rate=0.05, key=jax.random.key(1))
    assert int(res.target) == target and int(res.margin_classes[0]) == target
    assert float(res.predicted_objective) > float(res.history[0]) + 0.1
    assert _energy(res) <= 1.5**2 * (1 + 1e-12)
    chk = jm.check_attack(pm, x1, y, res, key=jax.random.key(2), num_samples=20_000)
    # The attack spends its budget on the mean (the margin is linear in it): the std
    # shrinks and the sampled margin equals the prediction to rounding plus Z se.
    assert abs(float(chk.margin) - float(res.predicted_margin)) <= (
        Z * float(chk.margin_stderr) + 1e-9)


def test_untargeted_ce_attack_beats_isotropic_noise_of_the_same_budget(shallow):
    pm, x1, y = shallow
    budget = 2.0
    res = jm.gaussian_noise_attack(pm, x1, y, budget=budget, objective="ce", steps=150,
                                   learning_rate=0.05)
    assert float(res.predicted_objective) > float(res.history[0])
    assert _energy(res) <= budget**2 * (1 + 1e-12)
    iso = res._replace(mean_shift=jnp.zeros_like(x1),
                       std=jnp.full_like(x1, budget / math.sqrt(x1.size)))
    key = jax.random.key(3)
    att = jm.check_attack(pm, x1, y, res, key=key, num_samples=20_000)
    base = jm.check_attack(pm, x1, y, iso, key=key, num_samples=20_000)
    gap = float(att.cross_entropy - base.cross_entropy)
    assert gap > 0.1
    assert gap > Z * math.hypot(float(att.cross_entropy_stderr), float(base.cross_entropy_stderr))
    # It flips the decision on every draw; isotropic noise of the same energy rarely does.
    assert float(att.success_rate) == 1.0
    assert float(base.success_rate) < 0.5


def test_penalties_make_the_noise_sparser_and_smoother(x64, make_mlp):
    # Penalty weights are traced: the three runs share one compiled program.
    pm = js.split(make_mlp(16, (12,), 3, seed=6))
    x1 = _input(16, 7)
    y = int(jnp.argmax(pm.apply(x1[None])[0]))

    def run(sparsity, smoothness):
        return jm.gaussian_noise_attack(pm, x1, y, budget=2.0, optimize_mean=False,
                                        objective="ce", steps=100, learning_rate=0.05,
                                        sparsity=sparsity, smoothness=smoothness,
                                        image_shape=(4, 4))

    def tv(s):
        s = s.reshape(4, 4)
        return float(jnp.sum(jnp.abs(jnp.diff(s, axis=0))) + jnp.sum(jnp.abs(jnp.diff(s, axis=1))))

    plain, sparse, smooth = run(0.0, 0.0), run(0.5, 0.0), run(0.0, 0.5)
    assert float(jnp.sum(sparse.std)) < 0.8 * float(jnp.sum(plain.std))
    assert tv(smooth.std) < 0.8 * tv(plain.std)
    with pytest.raises(ValueError, match="needs an image"):
        jm.gaussian_noise_attack(pm, x1, y, budget=1.0, smoothness=0.1)
    with pytest.raises(ValueError, match="equals the true label"):
        jm.gaussian_noise_attack(pm, x1, y, budget=1.0, target=y)
    with pytest.raises(ValueError, match="budget must be finite and > 0"):
        jm.gaussian_noise_attack(pm, x1, y, budget=-1.0)


# --------------------------------------------------------------------------- expected CE loss
def _loss(term, pm, x, y):
    return jax.jit(lambda p: term(pm.structure, p, pm.rest, x, y, None))(pm.params)


def test_expected_gaussian_loss_matches_monte_carlo_for_small_noise(x64, make_mlp):
    # One hidden layer: the moments are exact, so the only approximation is the second-order
    # expansion, off by at most REMAINDER E||F - m||^3 = O(sigma^3), while its curvature term
    # (1/2) tr(H C) is O(sigma^2): at small sigma the check resolves it. The Monte Carlo mean
    # of CE(F(x + eta)) uses the control variate g.(J eta) (g = dCE/dF, J = dF/dx at x;
    # E[J eta] = 0), which removes the first-order fluctuation and keeps it unbiased.
    pm = js.split(make_mlp(6, (16,), 4, seed=8))
    x = jnp.asarray(np.random.default_rng(9).standard_normal((3, 6)))
    y = jnp.array([0, 1, 3])
    sigma, n = 0.05, 40_000
    term = losses.ExpectedGaussianLoss(sigma=sigma)
    val = _loss(term, pm, x, y)
    assert val.shape == (3,) and bool(jnp.all(jnp.isfinite(val)))
    # One hidden layer: layerwise_full moments are exact too, hence equal.
    full = _loss(losses.ExpectedGaussianLoss(sigma=sigma, method="layerwise_full"), pm, x, y)
    np.testing.assert_allclose(np.asarray(full), np.asarray(val), rtol=1e-10)
    eta = sigma * jax.random.normal(jax.random.key(10), (3, n, 6), x.dtype)

    @jax.jit
    def draws(x1, eta1, y1):
        out = pm.apply(x1 + eta1)
        jac = jax.jacfwd(lambda v: pm.apply(v[None])[0])(x1)
        g = jax.nn.softmax(pm.apply(x1[None])[0]) - jax.nn.one_hot(y1, 4, dtype=x.dtype)
        return -jnp.take(jax.nn.log_softmax(out), y1, axis=-1) - (eta1 @ jac.T) @ g, out

    for b in range(3):
        ce, out = (np.asarray(v) for v in draws(x[b], eta[b], y[b]))
        dev = out - out.mean(0)
        cube = float(np.mean(np.sum(dev**2, axis=1) ** 1.5))
        tol = Z * ce.std(ddof=1) / math.sqrt(n) + REMAINDER * cube
        assert abs(ce.mean() - float(val[b])) < tol, (b, ce.mean(), float(val[b]), tol)
        mom = jm.diagonal_output_moments(pm, x[b], 0.0, sigma**2)
        curvature = float(val[b]) + float(jax.nn.log_softmax(mom.mean)[int(y[b])])
        assert curvature > 2 * tol  # the check has teeth


def test_expected_gaussian_loss_gradient(x64, make_mlp):
    pm = js.split(make_mlp(5, (6, 5), 3, seed=11))
    x = jnp.asarray(np.random.default_rng(12).standard_normal((3, 5)))
    y = jnp.array([0, 2, 1])
    term = losses.ExpectedGaussianLoss(sigma=0.3)
    flat, unravel = ravel_pytree(pm.params)

    @jax.jit
    def f(v):
        return jnp.mean(term(pm.structure, unravel(v), pm.rest, x, y, None))

    # Kinks of the clean ReLU masks are > eps away (random parameters): f is smooth there.
    check_grads(f, (flat,), order=1, modes=["rev"], eps=1e-6)


def test_expected_gaussian_loss_trains_and_is_registered(x64, make_mlp):
    term = losses.make_loss("expected_gaussian", sigma=0.2)
    assert term == losses.ExpectedGaussianLoss(sigma=0.2)
    ds = data.gaussian_mixture(0, n_train=120, n_test=60, dim=8, num_classes=3)
    res = tr.train(make_mlp(8, (16,), 3, seed=0), ds, optimizer=tr.make_optimizer("adam", 1e-2),
                   loss_terms=[(1.0, losses.CrossEntropy()), (0.5, term)], epochs=1,
                   batch_size=40, key=jax.random.key(0), progress=False)
    h = res.history[-1]
    assert np.isfinite(h["train_expected_gaussian"]) and h["train_expected_gaussian"] > 0
    assert np.isfinite(h["train_loss"])
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        losses.ExpectedGaussianLoss(sigma=0.0)
    with pytest.raises(ValueError, match="choose one of"):
        losses.ExpectedGaussianLoss(sigma=0.1, method="exact")
    with pytest.raises(ValueError, match="not a ReLU site"):
        losses.ExpectedGaussianLoss(sigma=0.1, split_at="h9").check(
            js.split(make_mlp(8, (16,), 3)).structure)


def test_noisy_cross_entropy_in_chunks_equals_dense_output_moments(x64, make_mlp, monkeypatch):
    # A pair budget that makes lax.map take chunks of 3 examples: 7 = 2 * 3 + a remainder.
    pm = js.split(make_mlp(6, (8, 5), 4, seed=13))
    x = jnp.asarray(np.random.default_rng(14).standard_normal((7, 6)))
    y = jnp.arange(7) % 4
    p, d = 5, 6  # split-layer width, input size
    monkeypatch.setattr(jm._expected, "_PAIRS_PER_CHUNK", 3 * (p * p // 2 + p * d))
    got = jm.noisy_cross_entropy(pm, x, y, sigma=0.3)
    dense = jax.jit(jax.vmap(lambda x1, y1: jm.expected_cross_entropy(
        jm.output_moments(pm, x1, jnp.zeros(6), 0.09 * jnp.eye(6)), y1)))(x, y)
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense), rtol=1e-10)
