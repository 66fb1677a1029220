"""The one Monte Carlo engine: draws vmapped in chunks, scanned, with explicit keys.

Everything in jaxsens that samples — the ``sampled`` estimator, the tightness study of the
analytic moments, the Monte Carlo check of a Gaussian noise attack — averages per-draw
statistics with :func:`average`. Memory is that of one chunk of draws whatever
``num_samples`` is, the draw with index ``i`` always uses the ``i``-th key of
``jax.random.split(key, ·)`` (so results do not depend on the chunk size beyond summation
order), and the whole estimate is one traceable computation (a ``lax.scan``).

Key derivation. With JAX's default partitionable Threefry (``jax_threefry_partitionable``)
``split(key, n)[i] == fold_in(key, i)`` for every ``n``: draw ``i``'s key depends on
``(key, i)`` only. That is what lets the draws of one estimate be split over devices
(``axes``) with the numbers of one device: each device evaluates the draws at its own
positions of every chunk, with the same keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Average", "average", "num_chunks"]


class Average(NamedTuple):
    """What :func:`average` returns.

    Attributes:
      mean: the pytree of per-draw statistics averaged over the ``num_samples`` draws.
      kept: the statistics selected by ``keep_fn`` of the first draws, stacked on a
        leading axis (``None`` without ``keep``): ``min(num_samples, c · chunk)`` rows,
        ``c`` the fewest whole chunks holding ``keep`` draws.
    """

    mean: Any
    kept: Any


def num_chunks(num_samples: int, chunk: int) -> int:
    """Scan steps for ``num_samples`` draws in chunks of ``chunk``.

    Args:
      num_samples: number of draws.
      chunk: draws per scan step, >= 1.

    Returns:
      ``⌈num_samples / chunk⌉``: the last chunk may be partly padding.
    """
    return -(-num_samples // chunk)


def average(
    draw: Callable[[jax.Array], Any],
    key: jax.Array,
    *,
    num_samples: int,
    chunk: int,
    keep: int = 0,
    keep_fn: Callable[[Any], Any] | None = None,
    reduce: Callable[[Any, jax.Array], Any] | None = None,
    axes: tuple[str, ...] = (),
) -> Average:
    """E[draw(k)] over ``num_samples`` keys split from ``key``, ``chunk`` draws at a time.

    Args:
      draw: one draw: a key in, a pytree of arrays (the statistics of that draw) out.
        It is vmapped over the keys of a chunk; arguments it closes over are not batched,
        so XLA computes what does not depend on the key once (prefix reuse).
      key: the PRNG key; draw ``i`` uses ``jax.random.split(key, n)[i]``.
      num_samples: number of draws (static).
      chunk: draws per scan step (static); the last chunk is padded and masked out.
      keep: also return the statistics ``keep_fn`` selects of (about) the first ``keep``
        draws, e.g. for quantiles; memory stays bounded whatever ``num_samples``.
      keep_fn: which statistics to keep (default: all of them).
      reduce: ``reduce(stats, weights) -> sums`` for one chunk, ``stats`` with a leading
        axis of ``chunk`` draws and ``weights`` 1 for real draws, 0 for padding (default:
        the weighted sum of every statistic). A custom one can avoid materializing a
        per-draw product, e.g. ``einsum("s,sbk,sbl->bkl", w, d, d)`` for Σ d dᵀ; the
        result is the sums divided by ``num_samples``.
      axes: mesh axes to split every chunk's draws over; only inside a ``jax.shard_map``
        in which they are manual. Device ``d`` of ``D`` evaluates positions
        ``[d·c, (d+1)·c)`` of each chunk, ``c = ⌈chunk / D⌉``, with the keys a single
        device would use; the sums are added over the devices (``psum``) and the kept
        draws gathered in order, so the result equals the one-device result up to the
        order of summation, on every device.

    Returns:
      An :class:`Average`.
    """
    steps = num_chunks(num_samples, chunk)
    keys = jax.random.split(key, steps * chunk)
    select = keep_fn if keep_fn is not None else (lambda s: s)
    shapes = jax.eval_shape(draw, keys[0])
    dtype = jnp.result_type(*[s.dtype for s in jax.tree.leaves(shapes)] or [jnp.float32])
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    width = chunk
    if axes:
        width = -(-chunk // jax.lax.axis_size(axes))  # this device's positions in a chunk
        first = jax.lax.axis_index(axes) * width
        column = first + jnp.arange(width)
        draw_index = jnp.arange(steps)[:, None] * chunk + column[None, :]
        mask = ((column < chunk)[None, :] & (draw_index < num_samples)).astype(dtype)
        # Positions past the chunk (when D does not divide it) get some key; masked out.
        keys = keys[jnp.minimum(draw_index, steps * chunk - 1)]
    else:
        keys = keys.reshape(steps, chunk, *keys.shape[1:])
        mask = (jnp.arange(steps * chunk) < num_samples).reshape(steps, chunk).astype(dtype)

    def weighted_sum(stats, w):
        return jax.tree.map(lambda v: jnp.tensordot(w, v.astype(dtype), axes=(0, 0)), stats)

    reducer = reduce if reduce is not None else weighted_sum
    chunk_shapes = jax.eval_shape(jax.vmap(draw), keys[0])
    total0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                          jax.eval_shape(reducer, chunk_shapes, mask[0]))
    keep_steps = min(steps, num_chunks(keep, chunk)) if keep else 0
    kept_shapes = jax.eval_shape(select, shapes) if keep_steps else None
    buf0 = (jax.tree.map(lambda s: jnp.zeros((keep_steps, width, *s.shape), s.dtype),
                         kept_shapes) if keep_steps else None)

    def body(carry, inp):
        total, buf = carry
        i, ks, m = inp
        stats = jax.vmap(draw)(ks)
        total = jax.tree.map(jnp.add, total, reducer(stats, m))
        if keep_steps:
            slot = jnp.minimum(i, keep_steps - 1)
            new = select(stats)
            buf = jax.tree.map(
                lambda b, v: b.at[slot].set(jnp.where(i < keep_steps, v, b[slot])), buf, new)
        return (total, buf), None

    (total, buf), _ = jax.lax.scan(body, (total0, buf0), (jnp.arange(steps), keys, mask))
    if axes:
        total = jax.lax.psum(total, axes)
        if keep_steps:  # every device's positions side by side: the one-device layout
            buf = jax.tree.map(lambda b: jax.lax.all_gather(b, axes, axis=1, tiled=True)
                               [:, :chunk], buf)
    mean = jax.tree.map(lambda t: t / num_samples, total)
    kept = None
    if keep_steps:
        rows = min(num_samples, keep_steps * chunk)
        kept = jax.tree.map(lambda b: b.reshape(keep_steps * chunk, *b.shape[2:])[:rows], buf)
    return Average(mean, kept)
