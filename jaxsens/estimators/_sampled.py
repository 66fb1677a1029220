"""The sampled estimator: Monte Carlo, vmapped over draws, scanned in chunks."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jaxtyping import Array, Float, Int

from .. import montecarlo
from .. import noise as noise_lib
from ..paths import param
from ..sites import PureModel, Structure
from ._common import (
    check_inputs,
    check_key,
    check_labels,
    check_positive_int,
    compiled_kernel,
    draw_axes,
    example_index,
    memory_budget,
    plan,
    quantile_levels,
    safe_norm,
)
from ._deviation import DEFAULT_QUANTILES, Deviation, deviation

__all__ = ["sampled", "sampled_body", "default_chunk", "QUANTILE_DRAWS"]

QUANTILE_DRAWS = 10_000  # draws per example kept for the quantiles


def _cross_entropy(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]


def default_chunk(struct: Structure, batch: int, num_samples: int, itemsize: int) -> int:
    """Draws per scan step so that one step's intermediates fit the memory budget.

    The draws are spread evenly over the fewest steps that fit: 128 draws with room for
    88 per step run as 2 × 64, not 88 + 40 padded to 88 (37% of the work wasted).
    """
    total = sum(s.size for _, s in struct.sites if s.kind != "weight")
    per_sample = max(1, batch * total * itemsize * 4)
    largest = int(max(1, min(num_samples, memory_budget() // per_sample)))
    steps = -(-num_samples // largest)
    return -(-num_samples // steps)


def sampled_body(struct: Structure, params, rest, x, labels, key, law, *, site: str,
                 num_samples: int, chunk: int, crn: bool, qlevels: tuple[float, ...]
                 ) -> Deviation:
    """The traceable Monte Carlo estimate (see :func:`sampled`); ``x`` is the batch.

    Example ``i`` of the whole batch draws with ``fold_in(k, i)`` from draw key ``k``
    (:func:`~jaxsens.estimators._common.example_index` gives ``i`` on a device that sees
    part of the batch), and the draws are split over the kernel's draw axes, if any.
    """
    info = struct.site(site)
    out0, values = struct.apply_with_values(params, rest, x)
    batch = x.shape[0]
    out0f = out0.reshape(batch, -1)
    k_out = out0f.shape[-1]
    classify = len(struct.output_shape) == 1 and k_out >= 2
    if classify:
        pred0 = jnp.argmax(out0f, axis=-1)
        lab = pred0 if labels is None else labels
        loss0 = _cross_entropy(out0f, lab)

    ex_index = example_index(batch)
    dtype = out0f.dtype

    if info.kind == "weight":
        w = param(params, info.path)

        def one_draw(k):
            d = law.sample(k, w)
            return struct.apply(params, rest, x, {site: d})
    else:
        h = x if info.kind == "input" else values[site]

        def one_draw(k):
            if crn:
                # Same direction for every example, rescaled per example by the law.
                eta = jax.vmap(lambda hb: law.sample(k, hb))(h)
            else:
                eta = jax.vmap(lambda i, hb: law.sample(jax.random.fold_in(k, i), hb))(
                    ex_index, h)
            return struct.apply(params, rest, x, {site: eta})

    def draw(k):
        outs = one_draw(k).reshape(batch, -1)
        d = outs - out0f
        stats = {"d": d, "norm": safe_norm(d, axis=-1)}
        if classify:
            stats["flip"] = (jnp.argmax(outs, -1) != pred0).astype(dtype)
            stats["dloss"] = _cross_entropy(outs, lab) - loss0
            stats["hit"] = (jnp.argmax(outs, -1) == lab).astype(dtype)
        return stats

    def reduce(st, wt):
        # Σ over the draws of a chunk, without materializing per-draw outer products.
        sums = {
            "s1": wt @ st["norm"], "s2": wt @ jnp.square(st["norm"]),
            "sd": jnp.einsum("s,sbk->bk", wt, st["d"]),
            "sdd": jnp.einsum("s,sbk,sbl->bkl", wt, st["d"], st["d"]),
        }
        if classify:
            sums.update(flips=wt @ st["flip"], dloss=wt @ st["dloss"], correct=wt @ st["hit"])
        return sums

    # Quantiles come from the first draws (iid, so an unbiased subsample): a bounded
    # buffer keeps memory fixed for any num_samples.
    est = montecarlo.average(draw, key, num_samples=num_samples, chunk=chunk,
                             keep=QUANTILE_DRAWS if qlevels else 0,
                             keep_fn=lambda st: st["norm"], reduce=reduce, axes=draw_axes())
    n = num_samples
    avg = est.mean
    mean = avg["s1"]
    var = jnp.maximum(n * avg["s2"] - n * mean**2, 0.0) / max(n - 1, 1)
    dmean = avg["sd"]
    return deviation(
        batch, k_out, dtype, quantile_levels=qlevels, num_samples=n, mean_exact=False,
        mean=mean,
        rms=jnp.sqrt(avg["s2"]),
        stderr=jnp.sqrt(var / n),
        quantiles=jnp.quantile(est.kept, jnp.asarray(qlevels, dtype), axis=0).T
        if qlevels else None,
        delta_mean=dmean,
        delta_cov=avg["sdd"] - dmean[:, :, None] * dmean[:, None, :],
        flip_rate=avg["flips"] if classify else None,
        loss_change=avg["dloss"] if classify else None,
        accuracy=avg["correct"] if classify and labels is not None else None,
    )


_kernel = compiled_kernel(sampled_body,
                          static=("site", "num_samples", "chunk", "crn", "qlevels"),
                          batched=(0,))


def check_options(struct: Structure, batch: int, itemsize: int, *, num_samples, chunk_size,
                  quantiles) -> tuple[int, int, tuple[float, ...]]:
    """Validated ``(num_samples, chunk, quantile levels)``."""
    num_samples = check_positive_int("num_samples", num_samples, 2)
    if chunk_size is None:
        chunk_size = default_chunk(struct, batch, num_samples, itemsize)
    chunk = min(check_positive_int("chunk_size", chunk_size), num_samples)
    return num_samples, chunk, quantile_levels(quantiles)


def _itemsize(x) -> int:
    dtype = jnp.dtype(x.dtype)
    return dtype.itemsize if jnp.issubdtype(dtype, jnp.floating) else 4


def sampled(
    model: nnx.Module | PureModel,
    x: Float[Array, "batch ..."],
    *,
    site: str,
    noise: noise_lib.NoiseLaw,
    key: jax.Array,
    num_samples: int = 1000,
    chunk_size: int | None = None,
    labels: Int[Array, " batch"] | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    common_random_numbers: bool = False,
    draw_sharding: NamedSharding | None = None,
) -> Deviation:
    """Monte Carlo estimate of the output deviation ‖F(x; site + η) − F(x)‖ per example.

    Draws are vmapped and processed ``chunk_size`` at a time in a ``lax.scan``, so memory
    stays bounded for any ``num_samples``. Parameters and inputs are not batched over
    draws, so XLA computes the layers before the site once (prefix reuse). The whole
    estimate, quantiles and flip rates included, is one compiled call.

    For activation and input sites each example gets its own draws (or, with
    ``common_random_numbers``, one direction per draw shared by the batch and rescaled
    per example: every example's estimate stays unbiased, examples become correlated).
    For weight sites one Δ per draw perturbs the network for the whole batch.

    Devices: with ``x`` split along its batch by a ``NamedSharding`` each device draws
    for its own examples and the result is split the same way; ``draw_sharding`` also
    splits every chunk of draws over mesh axes (for a batch too small to split). Draw
    ``j`` uses ``split(key, ·)[j] = fold_in(key, j)`` and example ``i`` ``fold_in(·, i)``
    wherever they run, so the numbers are those of one device (sums up to their order).

    Args:
      model: an NNX module (sites marked with ``perturb``) or a ``PureModel``.
      x: inputs ``(batch, *input_shape)``.
      site: ``"input"``, an activation site or a weight path.
      noise: a law from :mod:`jaxsens.noise`.
      key: a JAX PRNG key; same key, same numbers.
      num_samples: number of draws per example.
      chunk_size: draws per scan step (default: sized for the memory budget of the
        backend, 256 MiB of intermediates on a CPU).
      labels: ``(batch,)`` integer labels for the loss change and accuracy (default:
        the clean predictions).
      quantiles: levels of the reported quantiles of ‖ΔF‖ (from the first 10,000 draws
        when there are more, so memory stays bounded).
      common_random_numbers: share noise directions across the batch.
      draw_sharding: split the draws over the mesh axes named by this sharding's first
        spec entry, e.g. ``NamedSharding(mesh, P("data"))`` (other axes than those that
        split ``x``); ``None`` keeps them on the devices of the batch.

    Returns:
      A :class:`Deviation` with mean, rms, stderr, quantiles, delta_mean, delta_cov and,
      for vector outputs, flip_rate and loss_change (and accuracy when labels are given).

    Raises:
      ValueError: unknown site, bad noise level, input shape mismatch, non-finite input,
        bad sample counts, a bad ``draw_sharding``.
    """
    p = check_inputs(model, x, site, noise)
    shards = plan(x, draw_sharding)
    batch = x.shape[0]
    num_samples, chunk, qlevels = check_options(
        p.structure, batch, _itemsize(x), num_samples=num_samples, chunk_size=chunk_size,
        quantiles=quantiles)
    labels = check_labels(labels, batch)
    check_key(key)
    res = _kernel(p.adapter, p.arrays, p.x, labels, key, noise, site=site,
                  num_samples=num_samples, chunk=chunk, crn=bool(common_random_numbers),
                  qlevels=qlevels, shards=shards)
    return res.labelled(estimator="sampled", site=site, law=noise.describe())


def sampled_table(struct: Structure, params, rest, x, laws, levels, key, labels, *,
                  sites: tuple[str, ...], num_samples: int, chunk: int, crn: bool,
                  qlevels: tuple[float, ...]) -> tuple[Deviation, tuple[bool, ...]]:
    """Every site × level: ``(Deviation with leading axes (site, level), present)``.

    Site ``i`` at level index ``j`` draws with ``fold_in(fold_in(key, i), j)``: the
    numbers equal those of :func:`sampled` called with that key. Levels run one after
    the other (``lax.map``), so memory is that of one call.
    """
    out = []
    for i, (site, law) in enumerate(zip(sites, laws, strict=True)):
        site_key = jax.random.fold_in(key, i)

        def one(args, site=site, law=law, site_key=site_key):
            level, j = args
            return sampled_body(struct, params, rest, x, labels,
                                jax.random.fold_in(site_key, j), law.with_level(level),
                                site=site, num_samples=num_samples, chunk=chunk, crn=crn,
                                qlevels=qlevels)

        out.append(jax.lax.map(one, (levels, jnp.arange(levels.shape[0]))))
    return jax.tree.map(lambda *a: jnp.stack(a), *out), (True,) * len(sites)
