"""Deep-network moments estimator (js.propagate_moments) and sensitivity maps: ratios.

1. propagate_moments (two_stage, layerwise_diag, layerwise_full) against Monte Carlo
   (js.sampled at the input) with 1,000 draws per example, same inputs and law.
2. sensitivity_map (rank-one closed form per pixel) against the naive way: one
   output_moments call per pixel with Σ = σ² e_i e_iᵀ (timed on a subsample of pixels and
   extrapolated).

    python benchmarks/bench_propagate.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import jaxsens as js
from jaxsens.moments import output_moments, sensitivity_map


def _time(fn, repeats):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    repeats = 3 if args.quick else 7
    batch = 8 if args.quick else 32
    model = js.models.MLP(784, [256, 256], 10, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (batch, 784))
    law = js.noise.Absolute(0.1)

    t_mc = _time(lambda: js.sampled(model, x, site="input", noise=law, key=jax.random.key(0),
                                    num_samples=1000).rms, repeats)
    print(f"MLP 784-256-256-10, batch {batch}, input noise N(0, 0.1² I), float32")
    print(f"{'estimator':<28}{'time':>12}{'vs MC (1000 draws)':>22}")
    print(f"{'sampled, 1000 draws':<28}{t_mc * 1e3:>10.1f}ms{1.0:>21.2f}x")
    for method in ("two_stage", "layerwise_diag", "layerwise_full"):
        t = _time(lambda m=method: js.propagate_moments(model, x, noise=law, method=m).rms,
                  repeats)
        print(f"{'moments, ' + method:<28}{t * 1e3:>10.1f}ms{t_mc / t:>20.2f}x faster")

    x1 = x[0]
    t_map = _time(lambda: sensitivity_map(model, x1, sigma=0.1), repeats)
    pm = js.split(model)
    naive = jax.jit(lambda i: output_moments(
        pm, x1, jnp.zeros(784), 0.01 * jnp.zeros((784, 784)).at[i, i].set(1.0)).cov.trace())
    n_sub = 4 if args.quick else 16
    t_naive = _time(lambda: [naive(i) for i in range(n_sub)], 1) / n_sub * 784
    print(f"\nsensitivity map, 784 pixels: closed form {t_map * 1e3:.1f} ms, naive per-pixel "
          f"output_moments {t_naive:.1f} s (extrapolated from {n_sub} pixels): "
          f"{t_naive / t_map:.0f}x faster")


if __name__ == "__main__":
    main()
