"""Cost of the weight-perturbation margin theory: the theory-driven training loss over plain
cross-entropy, and one bound evaluation over one forward pass.

MLP 784-256-256-256-10 (ReLU), batch 128, Adam.

1. **Train step, CE + λ·weight_margin + μ·linf_norm / CE** (target ≤ 1.3): the jitted step
   of :mod:`jaxsens.train` (parameters and optimizer state donated) on fixed random data,
   the two configurations timed in blocks of steps, interleaved within each repeat; the
   median block gives the step time. Also the hinge term alone, the ℓ∞-norm term alone and
   the full loss with the product form of Γ (no second pass over the hidden activations).
2. **weight_margin_bound / one jitted forward pass**: the bound on every layer jointly
   (data and product forms), each jitted with the model as an argument (what a repeated
   call on changing parameters sees), against the jitted forward pass on the same batch.

Prints ratios only (measured in one run, on this machine).

    python benchmarks/bench_margin.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx
from timing import interleaved

from jaxsens import bounds, losses, models, sites
from jaxsens import train as tr

WIDTHS = (256, 256, 256)


def configurations():
    ce = (1.0, losses.CrossEntropy())
    margin = (0.3, losses.WeightMarginLoss(eps=0.01))
    linf = (0.01, losses.LinfNormPenalty())
    product = (0.3, losses.WeightMarginLoss(eps=0.01, form="product"))
    return {
        "cross-entropy": (ce,),
        "+ λ·weight_margin": (ce, margin),
        "+ μ·linf_norm": (ce, linf),
        "+ λ·weight_margin + μ·linf_norm": (ce, margin, linf),
        "same, product-form Γ": (ce, product, linf),
        "theory (one term, one forward)": (
            (1.0, losses.TheoryLoss(eps=0.01, lam=0.3, mu=0.01)),),
    }


def _data(batch: int):
    kx, ky = jax.random.split(jax.random.key(0))
    return (jax.random.uniform(kx, (batch, 784)),
            jax.random.randint(ky, (batch,), 0, 10))


class _Runner:
    """One configuration's compiled step and its (donated) training state."""

    def __init__(self, terms, batch: int):
        model = models.MLP(784, WIDTHS, 10, rngs=nnx.Rngs(0))
        pm = sites.split(model)
        optimizer = tr.make_optimizer("adam", 1e-3)
        self.step = jax.jit(tr.make_train_step(pm.structure, optimizer, terms),
                            donate_argnums=(0, 1))
        self.rest = pm.rest
        self.params = jax.tree.map(jnp.array, pm.params)
        self.opt_state = optimizer.init(self.params)
        self.x, self.y = _data(batch)
        self.key = jax.random.key(1)

    def block(self, n: int) -> float:
        """Seconds per step over ``n`` steps."""
        t0 = time.perf_counter()
        params, opt_state = self.params, self.opt_state
        for s in range(n):
            params, opt_state, _, m = self.step(params, opt_state, self.rest, self.x, self.y,
                                                jax.random.fold_in(self.key, s))
        jax.block_until_ready((params, m))
        self.params, self.opt_state = params, opt_state
        return (time.perf_counter() - t0) / n


def train_steps(batch: int, steps: int, repeats: int) -> None:
    runners = {name: _Runner(terms, batch) for name, terms in configurations().items()}
    for runner in runners.values():
        runner.block(3)  # compile + warm up
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):  # interleaved, so that load drifts hit all alike
        for name, runner in runners.items():
            times[name].append(runner.block(steps))
    base = statistics.median(times["cross-entropy"])
    print("\n1. train step / cross-entropy step (target for the full loss <= 1.3)")
    for name, t in times.items():
        if name != "cross-entropy":
            print(f"   {name:<34} {statistics.median(t) / base:>6.2f}")


def bound_vs_forward(batch: int, repeats: int) -> None:
    model = models.MLP(784, WIDTHS, 10, rngs=nnx.Rngs(0))
    pm = sites.split(model)
    x, y = _data(batch)
    layers = tuple(range(len(WIDTHS) + 1))
    forward = jax.jit(lambda m, xb: m.apply(xb))
    calls = {"forward": (forward, (pm, x))}
    for form in bounds.FORMS:
        fn = jax.jit(lambda m, xb, yb, form=form: bounds.weight_margin_bound(
            m, xb, yb, eps=0.01, layers=layers, relative=True, form=form))
        calls[form] = (fn, (pm, x, y))
    t = interleaved(calls, repeats)
    print("\n2. weight_margin_bound (all layers) / one jitted forward pass")
    for form in bounds.FORMS:
        print(f"   {form + ' form':<34} {t[form] / t['forward']:>6.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (< 60 s)")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    steps, repeats = (20, 3) if args.quick else (100, 7)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"MLP 784-{'-'.join(map(str, WIDTHS))}-10, batch {args.batch}, "
          f"{repeats}x{steps} steps")
    train_steps(args.batch, steps, repeats)
    bound_vs_forward(args.batch, 50 if args.quick else 200)


if __name__ == "__main__":
    main()
