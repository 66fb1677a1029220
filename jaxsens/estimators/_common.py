"""What every estimator shares: input checks without a host sync, and small numerics."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import noise as noise_lib
from ..checks import positive_int as check_positive_int
from ..checks import safe_norm as safe_norm
from ..sites import Adapter, SiteInfo, Structure, adapt

__all__ = [
    "Prepared",
    "prepare",
    "check_inputs",
    "check_law",
    "check_positive_int",
    "check_key",
    "check_labels",
    "as_input",
    "input_dtype",
    "safe_norm",
    "memory_budget",
    "chunked_map",
    "compiled_kernel",
]


class Prepared(NamedTuple):
    """A validated call: the model's adapter and arrays, and the raw input batch."""

    adapter: Adapter
    arrays: Any
    x: Any

    @property
    def structure(self) -> Structure:
        return self.adapter.structure


def check_key(key) -> None:
    """Checks that ``key`` is a JAX PRNG key (typed or raw) without reading its value."""
    if not isinstance(key, jax.Array):
        raise ValueError("key must be a JAX PRNG key, e.g. jax.random.key(0)")


def check_law(structure: Structure, site: str, noise) -> SiteInfo:
    """The site's info, after checking that ``noise`` is a law that applies there."""
    info = structure.site(site)
    if not isinstance(noise, noise_lib.NoiseLaw):
        raise ValueError(
            f"noise must be a noise law from jaxsens.noise ({', '.join(noise_lib.LAWS)}), "
            f"got {type(noise).__name__}"
        )
    if info.kind not in noise.applies_to:
        raise ValueError(
            f"noise {type(noise).__name__} cannot be used at {info.kind} site {site!r}; it "
            f"applies to {', '.join(noise.applies_to)} sites"
        )
    noise.check_shape(info.shape)
    return info


def prepare(model, x) -> Prepared:
    """Validate ``x`` against the model and return the model's cached adapter.

    Nothing here reads array values on the device: shapes and dtypes are checked, and
    finiteness only for host (NumPy) inputs, where it costs no transfer. A device array
    with NaN gives NaN results.
    """
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise ValueError(f"x must be a real array, got dtype {x.dtype}")
        if x.size and not np.all(np.isfinite(x)):
            raise ValueError("x contains NaN or infinite values; inputs must be finite")
    elif not isinstance(x, jax.Array):
        raise ValueError(f"x must be an array of shape (batch, ...), got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a leading batch axis with at least one example, got "
                         f"shape {tuple(x.shape)}")
    adapter, arrays = adapt(model, x)
    want = adapter.structure.input_shape
    if tuple(x.shape[1:]) != want and math.prod(x.shape[1:]) != math.prod(want):
        raise ValueError(
            f"x has per-example shape {tuple(x.shape[1:])} but the model takes {want} "
            f"(x must be (batch, {', '.join(map(str, want))}))"
        )
    return Prepared(adapter, arrays, x)


def check_inputs(model, x, site: str, noise) -> Prepared:
    """:func:`prepare`, then check that ``site`` exists and ``noise`` applies there.

    Args:
      model: a Flax NNX module or a ``PureModel``.
      x: inputs ``(batch, *input_shape)`` (any layout with the same size per example).
      site: the site name.
      noise: the noise law.

    Returns:
      The :class:`Prepared` call: the model's cached adapter and arrays, and ``x``.

    Raises:
      ValueError: bad ``x``, unknown site, not a law, or a law that does not apply there.
    """
    p = prepare(model, x)
    check_law(p.structure, site, noise)
    return p


def as_input(structure: Structure, x) -> jax.Array:
    """``x`` as a floating ``(batch, *input_shape)`` array (inside a kernel: free)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x.reshape(x.shape[0], *structure.input_shape)


def input_dtype(x) -> jnp.dtype:
    """The floating dtype :func:`as_input` gives ``x`` (float32 for integer inputs)."""
    dtype = jnp.dtype(x.dtype) if hasattr(x, "dtype") else jnp.asarray(x).dtype
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(jnp.float32)


def check_labels(labels, batch: int):
    """Integer labels of shape ``(batch,)`` (shape and dtype only: no host sync)."""
    if labels is None:
        return None
    if not isinstance(labels, np.ndarray | jax.Array):
        labels = np.asarray(labels)
    if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be integers of shape ({batch},), got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    return labels


@functools.cache
def memory_budget() -> int:
    """Bytes of intermediates an estimator aims for per chunk on the default backend.

    256 MiB on a CPU; on an accelerator 1/16 of its memory (at most 4 GiB), so that
    large batches run in few chunks there.
    """
    device = jax.devices()[0]
    if device.platform == "cpu":
        return 256 * 2**20
    try:
        limit = int(device.memory_stats()["bytes_limit"])
    except (AttributeError, KeyError, TypeError, RuntimeError):
        return 256 * 2**20
    return int(min(4 * 2**30, max(256 * 2**20, limit // 16)))


def chunked_map(fn, x: jax.Array, chunk: int):
    """``fn`` on the batch ``x`` in chunks of ``chunk`` examples (``lax.map``); ``fn`` maps a
    ``(c, ...)`` batch to outputs with a leading axis ``c``. The last chunk is padded with
    copies of the first example, whose outputs are dropped."""
    batch = x.shape[0]
    if chunk >= batch:
        return fn(x)
    n = -(-batch // chunk)
    pad = n * chunk - batch
    if pad:
        x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad, *x.shape[1:]))], axis=0)
    out = jax.lax.map(fn, x.reshape(n, chunk, *x.shape[1:]))
    return jax.tree.map(lambda a: a.reshape(n * chunk, *a.shape[2:])[:batch], out)


def compiled_kernel(body, *, static: tuple[str, ...]):
    """The jitted public kernel of an estimator's traceable ``body``.

    ``kernel(adapter, arrays, x, *args, **options)`` unpacks the model's arrays (at trace
    time), shapes ``x`` for the model and returns ``body(structure, params, rest, x, *args,
    **options)``; the adapter and the ``static`` options are static arguments, so one
    compilation serves every call on the same architecture, input shape and options.
    """

    def kernel(adapter: Adapter, arrays, x, *args, **options):
        params, rest = adapter.unpack(arrays)
        struct = adapter.structure
        return body(struct, params, rest, as_input(struct, x), *args, **options)

    kernel.__name__ = kernel.__qualname__ = f"{body.__name__}_kernel"
    return jax.jit(kernel, static_argnames=("adapter", *static))
