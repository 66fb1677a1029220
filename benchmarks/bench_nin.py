"""A NIN phase-diagram sweep as one vmapped program against a Python loop of single runs.

The linear two-layer problem of :func:`jaxsens.nin.linear_problem`, trained by SGD for every
(σ, seed) pair: :func:`jaxsens.nin.sweep` (one compiled ``vmap`` of the ``lax.scan``
program) against a Python loop calling :func:`jaxsens.nin.train_dynamics` once per pair
(the same compiled single-run program, dispatched S × R times). Both are compiled and warmed
up first; the median of the repeats is reported. A second configuration measures only
every 10th step (``record_every=10``). Prints ratios (the numbers to compare across
machines) and, for context, milliseconds.

    python benchmarks/bench_nin.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsens import nin


def _median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark and print the speed-up of the vmapped sweep over the loop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller, faster version")
    args = parser.parse_args()
    n_sigma, n_seed, steps, repeats = (8, 2, 200, 3) if args.quick else (24, 4, 1000, 5)
    prob = nin.linear_problem(jax.random.key(0), input_dim=16, width=16, n=256)
    sigmas = np.geomspace(0.01, 3.0, n_sigma)
    keys = jax.random.split(jax.random.key(1), n_seed)
    print(f"backend {jax.default_backend()}; linear problem 16-16-1, n = 256 (full batch); "
          f"{n_sigma} σ × {n_seed} seeds = {n_sigma * n_seed} runs of {steps} SGD steps")
    for record_every in (1, 10):
        schedule = nin.Schedule(steps=steps, learning_rate=0.5, record_every=record_every)

        def swept(schedule=schedule):
            return nin.sweep(prob.model, prob.x, prob.y, sigmas=sigmas, keys=keys,
                             schedule=schedule)

        def looped(schedule=schedule):
            return [nin.train_dynamics(prob.model, prob.x, prob.y, key=k, schedule=schedule,
                                       sigma=float(s)) for s in sigmas for k in keys]

        a, b = swept(), looped()
        diff = max(float(jnp.nanmax(jnp.abs(jnp.asarray(a.trace.theta_norm)[i, r]
                                            - b[i * n_seed + r].trace.theta_norm)))
                   for i in range(n_sigma) for r in range(n_seed))
        t_sweep, t_loop = _median_time(swept, repeats), _median_time(looped, repeats)
        print(f"record_every={record_every:>2}: vmapped sweep {1e3 * t_sweep:9.1f} ms, "
              f"Python loop {1e3 * t_loop:9.1f} ms  ->  speed-up {t_loop / t_sweep:6.2f}x "
              f"(max |Δ‖θ‖| between them {diff:.1e})")


if __name__ == "__main__":
    main()
