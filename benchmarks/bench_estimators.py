"""The estimator protocol against its own kernels and the hardware: ratios in one run.

Runs on whatever backend JAX finds and sizes the problem to it:

* CPU: MLP 784 → 4×512 → 10 (ReLU), batch 256, 128 Monte Carlo draws on 64 examples;
* GPU/TPU: MLP 784 → 6×2048 → 10, batch 4096, 64 draws on the whole batch.

It prints, measured in the same run:

1. **public call / jitted kernel** for every registered estimator: the public function
   (a Flax module in, validation, the cached adapter, the compiled call, labels) against
   the same compiled kernel called directly with pre-split arrays; target ≤ 1.15. Also
   for the README's "library in ten lines" (MLP 784-256-256-10, batch 32).
2. **all-site linearized** (``profile(..., estimators=("linearized",))``, every
   activation site from one reverse sweep) and **sampled** as fractions of the matmul
   roofline measured in the same run at the precision in use (FLOPs: the forward pass,
   2·B·Σ in·out, and k backward sweeps through the layers after the first site,
   2·k·B·Σ in·out; sampled: draws × examples ×
   suffix FLOPs plus the normal draws at the measured draw rate); targets ≥ 60% on a CPU,
   ≥ 50% on a GPU.
3. **bound / one jitted forward pass**: the public bound with the model's Lipschitz
   constants cached (the same parameters as the call before), target ≤ 3; and once on
   fresh parameters, which adds the Gram iterations for every layer.
4. **first call on a new architecture** (README size): trace, compile and run, what a
   notebook user waits for once per model shape; no target, a guard against kernels that
   run fast but compile slowly.

Every function is warmed up (compilation excluded) and timed with ``time.perf_counter``
around ``block_until_ready``; the median of the repeats is reported (at least 15; for the
public/kernel pairs, as many as fill about half a second, up to 401); calls that are
compared alternate within each repeat. Nothing is asserted.

    python benchmarks/bench_estimators.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx
from timing import draw_rate, interleaved, matmul_rate

import jaxsens as js
from jaxsens.estimators import _attack, _bound, _linearized, _moments, _sampled
from jaxsens.estimators._linearized import example_chunk
from jaxsens.estimators._sampled import default_chunk


def mlp(din, widths, dout, seed=0):
    return js.models.MLP(din, widths, dout, rngs=nnx.Rngs(seed))


def suffix_macs(sizes, first: int) -> int:
    """Σ in·out over the dense layers after hidden site ``h{first}`` (``-1``: all of them)."""
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    return sum(i * o for i, o in pairs[first + 1:])


def public_vs_kernel(model, x, key, samples, repeats) -> list[tuple[str, float, float]]:
    """(estimator, public time, kernel time) for every registered estimator."""
    adapter, arrays = js.sites.adapt(model, x)
    struct = adapter.structure
    site = struct.activation_sites[-1]
    law = js.noise.RelativeNorm(0.05)
    gauss = js.noise.Absolute(0.05)
    q = js.estimators.DEFAULT_QUANTILES
    batch = x.shape[0]
    chunk_s = default_chunk(struct, batch, samples, 4)
    chunk_l = example_chunk(struct, (site,), batch, 4)
    lips = _bound.lipschitz_constants(adapter, arrays)
    pairs = {
        "sampled": (
            lambda: js.sampled(model, x, site=site, noise=law, key=key, num_samples=samples),
            lambda: _sampled._kernel(adapter, arrays, x, None, key, law, site=site,
                                     num_samples=samples, chunk=chunk_s, crn=False,
                                     qlevels=q)),
        "linearized": (
            lambda: js.linearized(model, x, site=site, noise=law),
            lambda: _linearized._kernel(adapter, arrays, x, law, site=site, chunk=chunk_l,
                                        qlevels=q)),
        "bound": (
            lambda: js.bound(model, x, site=site, noise=law),
            lambda: _bound._kernel(adapter, arrays, x, law, lips, site=site, qlevels=q)),
        "moments": (
            lambda: js.propagate_moments(model, x, noise=gauss),
            lambda: _moments._kernel(adapter, arrays, x, gauss, method="two_stage",
                                     split_at=None, qlevels=q)),
        "attack": (
            lambda: js.attack(model, x, site=site, noise=law, key=key),
            lambda: _attack._kernel(adapter, arrays, x, law, key, site=site,
                                    steps=_attack.DEFAULT_STEPS,
                                    restarts=_attack.DEFAULT_RESTARTS, qlevels=q)),
    }
    rows = []
    for name in js.ESTIMATORS:
        public, kernel = pairs[name]
        # Sub-millisecond calls move by ±20% from one repeat to the next on a shared
        # machine: give every pair about half a second of repeats.
        t0 = time.perf_counter()
        jax.block_until_ready(kernel())
        n = max(repeats, min(401, int(0.25 / max(time.perf_counter() - t0, 1e-6))))
        t = interleaved({"public": (public, ()), "kernel": (kernel, ())}, n)
        rows.append((name, t["public"], t["kernel"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    backend = jax.default_backend()
    accel = backend != "cpu"
    repeats = 5 if args.quick else 15
    if accel:
        din, widths, dout, batch = 784, [2048] * 6, 10, 4096
        samples, sampled_batch = 64, 4096
        mm_sizes, draw_sizes = (4096, 8192), (2**22, 2**24, 2**26)
    else:
        din, widths, dout, batch = 784, [512] * 4, 10, 256
        samples, sampled_batch = (32, 64) if args.quick else (128, 64)
        mm_sizes, draw_sizes = (1024, 2048), (2**18, 2**20, 2**22)
    sizes = [din, *widths, dout]
    precision = jax.config.jax_default_matmul_precision or "default"
    print(f"jaxsens estimator benchmarks — {backend}: {jax.devices()[0].device_kind} "
          f"({os.cpu_count()} host cores), matmul precision {precision}, "
          f"MLP {'-'.join(map(str, sizes))}, batch {batch}{' (quick)' if args.quick else ''}")

    roof = matmul_rate(repeats, mm_sizes)
    draws_per_s = draw_rate(repeats, draw_sizes)
    model = mlp(din, widths, dout)
    x = jax.random.normal(jax.random.key(1), (batch, din), jnp.float32)
    key = jax.random.key(2)
    law = js.noise.RelativeNorm(0.05)
    rows: list[tuple[str, str, str, str]] = [
        ("matmul roofline (f32, default precision)", f"{roof / 1e9:9.1f} GFLOP/s", "", ""),
        ("normal draws (jax.random, consumed)", f"{draws_per_s / 1e6:9.1f} M/s", "", ""),
    ]

    # 1. Public call over its jitted kernel, this size and the README's.
    readme = mlp(784, [256, 256], 10)
    xr = jax.random.normal(jax.random.key(1), (32, 784), jnp.float32)
    for label, (m, xx, n) in (("", (model, x[:sampled_batch], samples)),
                              ("README ", (readme, xr, 1000))):
        for name, t_pub, t_ker in public_vs_kernel(m, xx, key, n, repeats):
            ratio = t_pub / t_ker
            rows.append((f"{label}{name}: public {1e3 * t_pub:.3g} ms / kernel "
                         f"{1e3 * t_ker:.3g} ms", f"{ratio:9.3f} ×", "≤ 1.15",
                         "met" if ratio <= 1.15 else "above"))

    # 2. All-site linearized and sampled against the roofline.
    sites = js.activation_sites(model)
    k = dout

    def all_sites():
        return js.profile(model, x, noise=law, levels=[0.05], key=key, sites=sites,
                          estimators=("linearized",))

    t_lin = interleaved({"lin": (all_sites, ())}, repeats)["lin"]
    # The forward pass (activations and ReLU masks) plus k backward sweeps.
    lin_flops = 2.0 * batch * suffix_macs(sizes, -1) + 2.0 * k * batch * suffix_macs(sizes, 0)
    lin_frac = lin_flops / t_lin / roof
    rows.append((f"all-site linearized, {len(sites)} sites ({lin_flops / 1e9:.1f} GFLOP)",
                 f"{1e3 * t_lin:9.2f} ms", "", ""))
    target = 0.5 if accel else 0.6
    rows.append(("  linearized / roofline", f"{100 * lin_frac:9.1f} %",
                 f"≥ {100 * target:.0f} %", "met" if lin_frac >= target else "below"))

    xs = x[:sampled_batch]
    n_h0 = js.sites.split(model).site("h0").size
    sampled_flops = 2.0 * samples * sampled_batch * suffix_macs(sizes, 0)
    for crn in (False, True):
        def run(crn=crn):
            return js.sampled(model, xs, site="h0", noise=law, key=key, num_samples=samples,
                              common_random_numbers=crn)

        t = interleaved({"s": (run, ())}, repeats)["s"]
        draws = samples * n_h0 * (1 if crn else sampled_batch)
        limit = sampled_flops / roof + draws / draws_per_s
        tag = "crn" if crn else "iid"
        rows.append((f"sampled h0 {tag}: {samples} draws × {sampled_batch} ex.",
                     f"{1e3 * t:9.2f} ms", "", ""))
        rows.append((f"  limit (flops {1e3 * sampled_flops / roof:.2f} ms + draws "
                     f"{1e3 * draws / draws_per_s:.2f} ms) / achieved",
                     f"{100 * limit / t:9.1f} %", f"≥ {100 * target:.0f} %",
                     "met" if limit / t >= target else "below"))

    # 3. Bound over one forward pass (constants cached), and on fresh parameters.
    pm = js.split(model)
    forward = jax.jit(lambda params, x: pm.structure.apply(params, pm.rest, x))

    def bound_warm():
        return js.bound(model, x, site="h0", noise=law)

    def bound_cold():
        _bound._CACHE.clear()  # as if the parameters were new: the Gram iterations rerun
        return js.bound(model, x, site="h0", noise=law)

    t = interleaved({"fwd": (forward, (pm.params, x)), "warm": (bound_warm, ()),
                     "cold": (bound_cold, ())}, repeats)
    rows.append(("forward pass (jitted)", f"{1e3 * t['fwd']:9.2f} ms", "", ""))
    rows.append(("bound / forward (constants cached)", f"{t['warm'] / t['fwd']:9.2f} ×",
                 "≤ 3", "met" if t["warm"] / t["fwd"] <= 3 else "above"))
    rows.append(("bound / forward (new parameters: Gram iterations)",
                 f"{t['cold'] / t['fwd']:9.2f} ×", "", ""))

    # 4. First call on a new architecture (trace + compile + run), README size: what a
    # notebook user waits for once per model shape. No target; a regression guard.
    fresh = mlp(784, [256, 255], 10)  # an architecture no kernel has seen in this run
    js.sites.adapt(fresh, xr)  # site discovery, shared by every estimator
    first_calls = {
        "sampled": lambda: js.sampled(fresh, xr, site="h1", noise=law, key=key,
                                      num_samples=1000),
        "linearized": lambda: js.linearized(fresh, xr, site="h1", noise=law),
        "bound": lambda: js.bound(fresh, xr, site="h1", noise=law),
        "moments": lambda: js.propagate_moments(fresh, xr, noise=js.noise.Absolute(0.05)),
        "attack": lambda: js.attack(fresh, xr, site="h1", noise=law, key=key),
    }
    for name in js.ESTIMATORS:
        t0 = time.perf_counter()
        jax.block_until_ready(first_calls[name]())
        rows.append((f"first call, new architecture (README size): {name}",
                     f"{time.perf_counter() - t0:9.2f} s", "", ""))

    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':<{width}}  {'measured':>16}  {'target':>8}")
    print("-" * (width + 36))
    for name, value, tgt, verdict in rows:
        print(f"{name:<{width}}  {value:>16}  {tgt:>8}  {verdict}")


if __name__ == "__main__":
    main()
