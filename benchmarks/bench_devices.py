"""Many devices: the estimators and the training step on a batch split over a mesh,
against the same work on one device.

With D >= 2 devices (forced host devices on a CPU) it prints correctness and how the work
is split, not speed (forced host devices share the same cores): the largest difference
from the one-device result, and the FLOPs one device runs (XLA's cost analysis of the
compiled per-device program) over those of the one-device program, 1/D for an even split.

On one device (a single GPU is the case that matters) it prints the throughput of the
sharded code path (the same computation on a mesh of that one device, as a multi-device
run compiles it) over the plain path: target >= 0.95.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/bench_devices.py --quick
    python benchmarks/bench_devices.py [--quick]      # one device: the sharded path's cost
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from timing import interleaved

import jaxsens as js
from jaxsens import devices
from jaxsens.estimators import _common, _linearized, _profile, _sampled
from jaxsens.train import _loop


def _setup(gpu: bool, quick: bool):
    widths, batch, samples = ((2048,) * 6, 4096, 64) if gpu else ((256,) * 4, 256, 64)
    if quick:
        widths, batch, samples = widths[:2], batch // 2, samples // 2
    model = js.models.MLP(784, widths, 10, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (batch, 784))
    return model, x, samples


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def _diff(a, b) -> float:
    worst = 0.0
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        if u.size and not np.all(np.isnan(u)):
            worst = max(worst, float(np.nanmax(np.abs(u - v))))
    return worst


class _Case:
    """One estimator kernel: its call with or without a device plan (``shards``)."""

    def __init__(self, kernel, args, options):
        self.kernel, self.args, self.options = kernel, args, options

    def call(self, x, shards):
        return self.kernel(*self.args[:2], x, *self.args[2:], shards=shards, **self.options)

    def flops(self, x, shards) -> float:
        return _flops(self.kernel.lower(*self.args[:2], x, *self.args[2:], shards=shards,
                                        **self.options).compile())


def _cases(model, x, samples) -> dict[str, _Case]:
    eta = js.noise.RelativeNorm(0.05)
    key = jax.random.key(0)
    p = _common.prepare(model, x)
    sites = p.structure.activation_sites
    chunk = _sampled.default_chunk(p.structure, x.shape[0], samples, 4)
    q = (0.05, 0.5, 0.95)
    table = _profile.TableOptions(sites=sites, qlevels=q, num_samples=samples,
                                  sample_chunk=chunk, crn=False, example_chunk=x.shape[0],
                                  method="two_stage", split_at=None)
    laws = tuple(eta for _ in sites)
    levels = np.asarray([0.05], np.float32)
    return {
        "sampled (h0)": _Case(_sampled._kernel, (p.adapter, p.arrays, None, key, eta),
                              dict(site=sites[0], num_samples=samples, chunk=chunk, crn=False,
                                   qlevels=q)),
        "linearized (last site)": _Case(
            _linearized._kernel, (p.adapter, p.arrays, eta),
            dict(site=sites[-1], chunk=x.shape[0], qlevels=q)),
        "profile, linearized, all sites": _Case(
            _profile._table_kernel, (p.adapter, p.arrays, laws, levels, key, None, None),
            dict(estimator="linearized", options=table)),
    }


def _train_step(model, mesh):
    terms = ((1.0, js.losses.CrossEntropy()),
             (1.0, js.losses.NoiseLoss(site="h0", noise=js.noise.RelativeNorm(0.05))))
    pm = js.split(model)
    opt = js.train.make_optimizer("adam", 1e-3)
    step = _loop.make_train_step(pm.structure, opt, terms)
    return pm, opt, _loop._jitted_step(step, mesh), _loop._jitted_step(step)


def split_report(model, x, samples) -> None:
    """D >= 2 devices: correctness and the per-device share of the FLOPs."""
    mesh = devices.make_mesh("auto")
    d = mesh.size
    batch = x.shape[0] - x.shape[0] % d
    x = x[:batch]
    xs = jax.device_put(x, devices.batch_sharding(mesh))
    plan = _common.plan(xs)
    print(f"{d} devices ({jax.devices()[0].platform}), mesh {dict(mesh.shape)}, batch {batch}; "
          f"FLOPs per device / one-device FLOPs (even split: {1 / d:.3f})")
    print(f"{'computation':<34} {'max |diff|':>11} {'FLOPs share':>12}")
    for name, case in _cases(model, x, samples).items():
        err = _diff(case.call(x, None), case.call(xs, plan))
        share = case.flops(xs, plan) / case.flops(x, None)
        print(f"{name:<34} {err:>11.2e} {share:>12.3f}")
    # Draws split over the devices, for a batch too small to split.
    small = x[:max(1, d - 1)]
    draws = _common.plan(small, NamedSharding(mesh, P(mesh.axis_names[0])))
    case = _cases(model, small, samples * d)["sampled (h0)"]
    err = _diff(case.call(small, None), case.call(small, draws))
    share = case.flops(small, draws) / case.flops(small, None)
    print(f"{f'sampled, {small.shape[0]} examples, draws split':<34} {err:>11.2e} "
          f"{share:>12.3f}")
    # The data-parallel training step.
    pm, opt, mesh_step, one_step = _train_step(model, mesh)
    params = jax.tree.map(jnp.array, pm.params)
    state = opt.init(params)
    y = jnp.arange(batch) % 10
    key = jax.random.key(2)
    rep = devices.replicate((params, state, pm.rest), mesh)
    ys = jax.device_put(y, devices.batch_sharding(mesh))
    out_one = one_step(*jax.tree.map(jnp.array, (params, state)), pm.rest, x, y,
                       jnp.arange(batch), key)
    out_many = mesh_step(*jax.tree.map(jnp.array, rep[:2]), rep[2], xs, ys, key)
    err = _diff(out_one[3], out_many[3])
    share = (_flops(mesh_step.lower(*rep, xs, ys, key).compile())
             / _flops(one_step.lower(params, state, pm.rest, x, y, jnp.arange(batch),
                                     key).compile()))
    print(f"{'train step (CE + noise loss)':<34} {err:>11.2e} {share:>12.3f}")


def _train_block(step, params, state, rest, feed, n: int, key) -> tuple[float, tuple]:
    t0 = time.perf_counter()
    for s in range(n):
        params, state, rest, m = step(params, state, rest, *feed(s), jax.random.fold_in(key, s))
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / n, (params, state, rest)


def throughput_report(model, x, samples, repeats: int, steps: int) -> None:
    """One device: plain kernels against the same kernels on a one-device mesh."""
    mesh = devices.make_mesh([1])
    xs = jax.device_put(x, devices.batch_sharding(mesh))
    forced = _common.Shards(mesh, mesh.axis_names[0])  # a 1-device plan is never automatic
    print(f"one device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch "
          f"{x.shape[0]}; throughput of the sharded path / the plain path (target >= 0.95)")
    print(f"{'computation':<34} {'plain ms':>9} {'sharded ms':>11} {'ratio':>7}")
    for name, case in _cases(model, x, samples).items():
        t = interleaved({"plain": (lambda v, c=case: c.call(v, None), (x,)),
                         "sharded": (lambda v, c=case: c.call(v, forced), (xs,))}, repeats)
        print(f"{name:<34} {1e3 * t['plain']:>9.3f} {1e3 * t['sharded']:>11.3f} "
              f"{t['plain'] / t['sharded']:>7.3f}")
    # Training: the batch gathered on the device (one device) against the batch put from
    # the host by each process (a mesh), the path multi-device runs take.
    pm, opt, mesh_step, one_step = _train_step(model, mesh)
    rng = np.random.default_rng(0)
    n_data, batch = 16 * x.shape[0], x.shape[0]
    x_host = rng.standard_normal((n_data, 784), np.float32)
    y_host = rng.integers(0, 10, n_data).astype(np.int32)
    x_dev, y_dev = jnp.asarray(x_host), jnp.asarray(y_host)
    order = [rng.permutation(n_data)[:batch] for _ in range(steps)]
    sharding = devices.batch_sharding(mesh, batch)
    feeds = {
        "plain": (one_step, lambda s: (x_dev, y_dev, jnp.asarray(order[s]))),
        "sharded": (mesh_step, lambda s: (devices.host_rows(sharding, x_host, order[s]),
                                          devices.host_rows(sharding, y_host, order[s]))),
    }
    states = {}
    for name in feeds:
        params = jax.tree.map(jnp.array, pm.params)
        st = (params, opt.init(params), pm.rest)
        states[name] = devices.replicate(st, mesh) if name == "sharded" else st
    times: dict[str, list[float]] = {name: [] for name in feeds}
    for r in range(repeats + 1):  # the first round compiles and warms up
        for name, (step, feed) in feeds.items():
            t, states[name] = _train_block(step, *states[name], feed, steps, jax.random.key(r))
            if r:
                times[name].append(t)
    plain, sharded = (statistics.median(times[k]) for k in ("plain", "sharded"))
    print(f"{'train step (CE + noise loss)':<34} {1e3 * plain:>9.3f} {1e3 * sharded:>11.3f} "
          f"{plain / sharded:>7.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller and fewer (< 60 s)")
    args = parser.parse_args(argv)
    gpu = jax.default_backend() != "cpu"
    model, x, samples = _setup(gpu, args.quick)
    if jax.device_count() >= 2:
        split_report(model, x, samples)
    else:
        throughput_report(model, x, samples, repeats=5 if args.quick else 15,
                          steps=10 if args.quick else 50)


if __name__ == "__main__":
    main()
