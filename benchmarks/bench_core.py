"""Core-engine performance against the hardware (DESIGN §4): ratios measured in one run.

1. all-site linearized (one reverse sweep over every activation site, what ``profile``
   runs) vs a per-site ``jax.jacrev`` loop computing the same J C Jᵀ; target: speedup
   ≥ 0.7 × number of sites;
2. the same all-site linearized call as a fraction of the matmul roofline: FLOPs of k
   backward sweeps through the layers after the first site, 2·k·B·Σ in·out, over the
   measured float32 matmul rate; target ≥ 60%;
3. ``js.sampled`` (the public call, default chunking) as a fraction of its limit:
   samples × suffix FLOPs at the matmul rate plus the normal draws at the measured
   ``jax.random.normal`` rate; target ≥ 50%; also with common random numbers (one
   direction per draw shared by the batch);
4. the certified bound's cost over one forward pass (ratio), the layers' Lipschitz
   constants cached as a public call on the same parameters has them.

Model: MLP 784 → 4×512 → 10 (ReLU), batch 256 (sampled: site h0). Every function is
jitted and warmed up (compilation excluded), timed with ``time.perf_counter`` around
``block_until_ready``; the median of the repeats is reported. Nothing is asserted.

    python benchmarks/bench_core.py [--quick]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
from flax import nnx
from timing import draw_rate, interleaved, matmul_rate, timeit

import jaxsens as js
from jaxsens.estimators import _bound, sandwiches

WIDTH, DEPTH, DIN, DOUT = 512, 4, 784, 10
def layer_sizes():
    sizes = [DIN, *([WIDTH] * DEPTH), DOUT]
    return list(zip(sizes[:-1], sizes[1:], strict=True))


def suffix_macs(site_index: int) -> int:
    """Σ in·out over the dense layers after hidden site ``h{site_index}``."""
    return sum(i * o for i, o in layer_sizes()[site_index + 1:])


def per_site_jacrev(pm, x, law, site):
    """Reference: jit(vmap(jacrev)) of the per-example function w.r.t. one site's delta,
    then the same J C Jᵀ reduction as the library."""
    struct, params, rest = pm.structure, pm.params, pm.rest
    shape = pm.site(site).shape

    def one(x1):
        def f(d):
            out, values = struct.apply_one_with_values(params, rest, x1, {site: d})
            return out.reshape(-1), values[site]

        jac, v = jax.jacrev(f, has_aux=True)(jnp.zeros(shape, x1.dtype))
        return law.covariance(v).sandwich(jac)

    return jax.jit(jax.vmap(one))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller sampled")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    batch = 256
    samples, sampled_batch = (32, 64) if args.quick else (128, 256)

    model = js.models.MLP(DIN, [WIDTH] * DEPTH, DOUT, rngs=nnx.Rngs(0))
    pm = js.split(model)
    struct, params, rest = pm.structure, pm.params, pm.rest
    x = jax.random.normal(jax.random.key(1), (batch, DIN), jnp.float32)
    law = js.noise.RelativeNorm(0.05)
    sites = pm.activation_sites
    k = DOUT

    print(f"jaxsens core benchmarks — {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
          f"MLP {DIN}-{'-'.join([str(WIDTH)] * DEPTH)}-{DOUT}, batch {batch}"
          f"{' (quick)' if args.quick else ''}")

    # Hardware limits, measured in this run.
    roof = matmul_rate(repeats)
    draws_per_s = draw_rate(repeats)

    # 1 + 2. All-site linearized vs per-site jacrev.
    laws = (law,) * len(sites)

    @jax.jit
    def all_sites(params, x):
        return sandwiches(struct, params, rest, x, laws, sites=sites, chunk=batch)

    loop_fns = [per_site_jacrev(pm, x, law, s) for s in sites]
    ref = all_sites(params, x)
    for f, (m, _, _) in zip(loop_fns, ref, strict=True):  # same numbers, or the race is moot
        assert jnp.allclose(f(x), m, rtol=1e-3, atol=1e-6 * float(jnp.max(jnp.abs(m))))

    def loop(x):
        return [f(x) for f in loop_fns]

    t = interleaved({"all": (all_sites, (params, x)), "loop": (loop, (x,))}, repeats)
    t_all, t_loop = t["all"], t["loop"]
    lin_flops = 2.0 * k * batch * suffix_macs(0)
    lin_frac = lin_flops / t_all / roof
    # FLOP-count speedup: the loop pays one forward and the backward to its site per site.
    fwd_flops = 2.0 * batch * sum(i * o for i, o in layer_sizes())
    loop_flops = sum(fwd_flops + 2.0 * k * batch * suffix_macs(i) for i in range(len(sites)))
    ideal = loop_flops / (fwd_flops + lin_flops)

    # 3. Sampled at h0 (suffix: the layers after h0), with and without common random numbers.
    xs = x[:sampled_batch]
    n_h0 = pm.site("h0").size
    sampled_flops = 2.0 * samples * sampled_batch * suffix_macs(0)

    def sampled_fn(crn):
        # The public call (validation included, default chunk size) as users run it.
        def run(x, key):
            return js.sampled(pm, x, site="h0", noise=law, key=key, num_samples=samples,
                              common_random_numbers=crn)
        return run

    sampled_rows = []
    for crn in (False, True):
        t = timeit(sampled_fn(crn), xs, jax.random.key(2), repeats=repeats)
        draws = samples * n_h0 * (1 if crn else sampled_batch)
        limit = sampled_flops / roof + draws / draws_per_s
        sampled_rows.append((crn, t, draws, limit))

    # 4. Bound vs one forward pass.
    forward = jax.jit(lambda params, x: struct.apply(params, rest, x))

    adapter, arrays = js.sites.adapt(pm)
    lips = _bound.lipschitz_constants(adapter, arrays)

    def bound(params, x):
        return _bound._kernel(adapter, (params, rest), x, law, lips, site="h0",
                              qlevels=js.estimators.DEFAULT_QUANTILES)

    t = interleaved({"fwd": (forward, (params, x)), "bound": (bound, (params, x))}, repeats)
    t_fwd, t_bound = t["fwd"], t["bound"]

    rows = [
        ("matmul roofline (f32, best of 1024³, 2048³)", f"{roof / 1e9:8.1f} GFLOP/s", "", ""),
        ("normal draws (jax.random, consumed)", f"{draws_per_s / 1e6:8.1f} M/s", "", ""),
        (f"linearized, {len(sites)} sites, one sweep", f"{1e3 * t_all:8.2f} ms", "", ""),
        (f"per-site jacrev loop ({len(sites)} sites)", f"{1e3 * t_loop:8.2f} ms", "", ""),
        ("  speedup one sweep / loop", f"{t_loop / t_all:8.2f} ×",
         f"≥ {0.7 * len(sites):.1f} ×", _verdict(t_loop / t_all, 0.7 * len(sites))),
        ("  (loop / one sweep by FLOP count)", f"{ideal:8.2f} ×", "", ""),
        (f"  linearized FLOP rate ({lin_flops / 1e9:.1f} GFLOP)",
         f"{lin_flops / t_all / 1e9:8.1f} GFLOP/s", "", ""),
        ("  linearized / roofline", f"{100 * lin_frac:8.1f} %", "≥ 60 %",
         _verdict(lin_frac, 0.6)),
    ]
    for crn, t, draws, limit in sampled_rows:
        tag = "crn" if crn else "iid"
        rows += [
            (f"sampled h0 {tag}: {samples} × {sampled_batch} ex., {draws / 1e6:.1f} M draws",
             f"{1e3 * t:8.2f} ms", "", ""),
            (f"  limit (flops {1e3 * sampled_flops / roof:.1f} ms + draws "
             f"{1e3 * draws / draws_per_s:.1f} ms) / achieved",
             f"{100 * limit / t:8.1f} %", "≥ 50 %", _verdict(limit / t, 0.5)),
        ]
    rows += [
        ("forward pass", f"{1e3 * t_fwd:8.2f} ms", "", ""),
        ("bound (h0)", f"{1e3 * t_bound:8.2f} ms", "", ""),
        ("  bound / forward", f"{t_bound / t_fwd:8.2f} ×", "", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':<{width}}  {'measured':>16}  {'target':>8}  ")
    print("-" * (width + 40))
    for name, value, target, verdict in rows:
        print(f"{name:<{width}}  {value:>16}  {target:>8}  {verdict}")


def _verdict(value: float, target: float) -> str:
    return "met" if value >= target else "below"


if __name__ == "__main__":
    main()
