"""Train-step cost of each robustness loss over plain cross-entropy (DESIGN §4).

MLP 784-256-256-10, batch 128, Adam; the jitted step of :mod:`jaxsens.train` (parameters and
optimizer state donated) on fixed random data. Every configuration is compiled and warmed up,
then timed in blocks of steps, the configurations interleaved within each repeat; the median
block gives the step time.
Prints ratios (the numbers to compare across machines) and, for context, milliseconds.

    python benchmarks/bench_train.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsens import losses, models, sites
from jaxsens import noise as nz
from jaxsens import train as tr


def configurations():
    ce = (1.0, losses.CrossEntropy())
    return {
        "cross-entropy": (ce,),
        "+ noise (h0, 1 sample)": (
            ce, (1.0, losses.NoiseLoss(site="h0", noise=nz.RelativeNorm(0.05)))),
        "+ jacobian (input, 1 proj.)": (ce, (0.01, losses.JacobianPenalty())),
        "+ linearized (h0)": (
            ce, (1.0, losses.LinearizedPenalty(site="h0", noise=nz.RelativeNorm(0.05)))),
    }


class _Runner:
    """One configuration's compiled step and its (donated) training state."""

    def __init__(self, terms, batch: int):
        model = models.MLP(784, (256, 256), 10, rngs=nnx.Rngs(0))
        pm = sites.split(model)
        optimizer = tr.make_optimizer("adam", 1e-3)
        self.step = jax.jit(tr.make_train_step(pm.structure, optimizer, terms),
                            donate_argnums=(0, 1))
        self.rest = pm.rest
        self.params = jax.tree.map(jnp.array, pm.params)
        self.opt_state = optimizer.init(self.params)
        kx, ky = jax.random.split(jax.random.key(0))
        self.x = jax.random.normal(kx, (batch, 784))
        self.y = jax.random.randint(ky, (batch,), 0, 10)
        self.key = jax.random.key(1)

    def block(self, n: int) -> float:
        """Seconds per step over ``n`` steps."""
        t0 = time.perf_counter()
        params, opt_state = self.params, self.opt_state
        for s in range(n):
            params, opt_state, m = self.step(params, opt_state, self.rest, self.x, self.y,
                                             jax.random.fold_in(self.key, s))
        jax.block_until_ready((params, m))
        self.params, self.opt_state = params, opt_state
        return (time.perf_counter() - t0) / n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (< 60 s)")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    steps, repeats = (20, 3) if args.quick else (100, 7)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"MLP 784-256-256-10, batch {args.batch}, {repeats}x{steps} steps")
    runners = {name: _Runner(terms, args.batch) for name, terms in configurations().items()}
    for runner in runners.values():
        runner.block(3)  # compile + warm up
    times: dict[str, list[float]] = {name: [] for name in runners}
    # Configurations interleaved within each repeat, so that load drifts hit all alike.
    for _ in range(repeats):
        for name, runner in runners.items():
            times[name].append(runner.block(steps))
    results = {name: statistics.median(t) for name, t in times.items()}
    base = results["cross-entropy"]
    print(f"{'loss':<30} {'ms/step':>9} {'ratio over CE':>14}")
    for name, t in results.items():
        print(f"{name:<30} {1e3 * t:>9.3f} {t / base:>14.2f}")


if __name__ == "__main__":
    main()
