"""A wide random He-initialised ReLU MLP against the mean-field recursion (DESIGN §3.5).

W ~ N(0, σ_w²/fan_in), b ~ N(0, σ_b²). Pre-activations of layer l have, for two inputs,
second moments (q11, q22, q12) following

    q^1_ab = σ_w² x_a·x_b/d + σ_b²,
    q^l_aa = σ_w² q^{l−1}_aa/2 + σ_b²,
    q^l_12 = σ_w² k(q^{l−1}) + σ_b²,   k = √(q11q22)/(2π) (sin θ + (π−θ) cos θ),

θ = arccos(q12/√(q11q22)), k = E[relu(u) relu(v)]. Predictions: at the (linear) output
E‖F(x) − F(x')‖²/N = q11 + q22 − 2q12; at the hidden site after layer l (post-ReLU)
E‖h(x) − h(x')‖²/N = (q11 + q22)/2 − 2k.

Tolerance. At width N each layer's empirical second moments fluctuate by ~√(2/N) ≈ 3%
relative, and L = 5 layers compound that; averaging over P = 32 input pairs and S = 8
networks brings the standard error of the mean to ~1.5%. The test asserts agreement within
4 standard errors measured across the networks, and that this resolution is a few percent.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsens as js

WIDTH, DEPTH, DIN = 2048, 5, 256  # DEPTH linear layers: 4 hidden ReLU layers + the output
SIGMA_W2, SIGMA_B = 2.0, 0.2
PAIRS, NETWORKS = 32, 8
NORMS2, RHO = (1.0, 2.0), 0.5  # ‖x‖²/d, ‖x'‖²/d and the cosine between x and x'


def _predictions():
    """Mean-field E‖·(x) − ·(x')‖²/N at each hidden site and at the output."""
    q11, q22 = (SIGMA_W2 * n + SIGMA_B**2 for n in NORMS2)
    q12 = SIGMA_W2 * RHO * math.sqrt(NORMS2[0] * NORMS2[1]) + SIGMA_B**2
    hidden = []
    for _ in range(DEPTH - 1):
        theta = math.acos(q12 / math.sqrt(q11 * q22))
        k = math.sqrt(q11 * q22) / (2 * math.pi) * (
            math.sin(theta) + (math.pi - theta) * math.cos(theta))
        hidden.append((q11 + q22) / 2 - 2 * k)
        q11, q22 = (SIGMA_W2 * q / 2 + SIGMA_B**2 for q in (q11, q22))
        q12 = SIGMA_W2 * k + SIGMA_B**2
    return np.array(hidden), q11 + q22 - 2 * q12


def _input_pairs(rng):
    """PAIRS random pairs with ‖x‖²/d, ‖x'‖²/d = NORMS2 and cosine RHO, stacked (x…, x'…)."""
    g = rng.standard_normal((PAIRS, 2, DIN))
    a = g[:, 0] / np.linalg.norm(g[:, 0], axis=1, keepdims=True)
    b = g[:, 1] - np.sum(g[:, 1] * a, axis=1, keepdims=True) * a
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    x1 = math.sqrt(DIN * NORMS2[0]) * a
    x2 = math.sqrt(DIN * NORMS2[1]) * (RHO * a + math.sqrt(1 - RHO**2) * b)
    return jnp.asarray(np.concatenate([x1, x2]), jnp.float32)


@pytest.mark.slow
def test_wide_random_relu_mlp_matches_mean_field_recursion():
    abstract = nnx.eval_shape(lambda: js.models.MLP(
        DIN, [WIDTH] * (DEPTH - 1), WIDTH, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(2024)
    x = _input_pairs(rng)

    @jax.jit
    def distances(state):
        # The sites go through jaxsens (split + activations), the output too.
        out, values = js.split(nnx.merge(graphdef, state)).apply_with_values(x)
        feats = [values[f"h{i}"] for i in range(DEPTH - 1)] + [out]
        return jnp.stack([jnp.mean(jnp.sum((f[:PAIRS] - f[PAIRS:]) ** 2, axis=1)) / f.shape[1]
                          for f in feats])

    per_net = []
    for _ in range(NETWORKS):
        # He initialisation, variance_scaling(2, "fan_in", "normal"), and normal biases,
        # drawn with NumPy (sixteen million numbers per network).
        def draw(leaf):
            if leaf.ndim == 1:
                return jnp.asarray(SIGMA_B * rng.standard_normal(leaf.shape, np.float32))
            std = math.sqrt(SIGMA_W2 / leaf.shape[0])
            return jnp.asarray(std * rng.standard_normal(leaf.shape, np.float32))

        per_net.append(np.asarray(distances(jax.tree.map(draw, state))))
    per_net = np.array(per_net)
    mean = per_net.mean(axis=0)
    se = per_net.std(axis=0, ddof=1) / math.sqrt(NETWORKS)

    hidden, output = _predictions()
    pred = np.append(hidden, output)
    assert np.all(se / pred < 0.025), f"relative standard errors {se / pred}"
    rel = (mean - pred) / pred
    np.testing.assert_array_less(np.abs(mean - pred), 4 * se,
                                 err_msg=f"relative errors {rel}, predictions {pred}")
    # He initialisation: perturbations neither grow nor shrink much with depth (χ₁ = 1).
    assert 0.5 < output / hidden[0] < 2.0
