"""Timing helpers and hardware limits shared by the benchmark scripts.

Every function is warmed up (compilation excluded) and timed with ``time.perf_counter``
around ``block_until_ready``; medians are reported. Limits are measured in the same run
as the code they are compared with: figures quoted on paper go stale.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

WARMUP_S = 0.25


def interleaved(calls: dict, repeats: int) -> dict:
    """Median wall time of every ``name: (fn, args)``, the calls alternating within each
    repeat so that a slow phase of a shared machine hits all of them alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))  # compile
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < WARMUP_S:  # caches, clocks, thread pools
            jax.block_until_ready(fn(*args))
    times: dict = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def timeit(fn, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` in seconds, compilation and warm-up excluded."""
    return interleaved({"f": (fn, args)}, repeats)["f"]


def matmul_rate(repeats: int, sizes=(1024, 2048)) -> float:
    """Float32 matmul FLOP/s at the default precision: the best of n × n × n products."""
    rates = []
    for n in sizes:
        ka, kb = jax.random.split(jax.random.key(n))
        a = jax.random.normal(ka, (n, n), jnp.float32)
        b = jax.random.normal(kb, (n, n), jnp.float32)
        rates.append(2.0 * n**3 / timeit(jax.jit(jnp.matmul), a, b, repeats=repeats))
    return max(rates)


def draw_rate(repeats: int, sizes=(2**18, 2**20, 2**22)) -> float:
    """jax.random.normal float32 draws per second (default PRNG), consumed in place.

    The draws are reduced inside the program, as the sampled estimator consumes them (an
    array written to memory would measure memory bandwidth). The rate depends on the size
    and on how XLA splits the work over threads, so take the best of several sizes.
    """
    rates = []
    for n in sizes:
        f = jax.jit(lambda k, n=n: jnp.sum(jax.random.normal(k, (n // 512, 512)), axis=1))
        rates.append(n / timeit(f, jax.random.key(0), repeats=repeats))
    return max(rates)
