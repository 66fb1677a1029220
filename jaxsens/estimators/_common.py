"""What every estimator shares: input checks without a host sync, small numerics, and the
compiled kernel that splits its work over the devices the input is sharded on.

Devices. An input ``x`` split along its batch axis by a ``NamedSharding``
(:func:`jaxsens.devices.batch_axes`) makes a kernel run its body under ``jax.shard_map``:
each device gets its own examples (and a copy of the model), and every per-example result
comes back split the same way. The sampled estimator may also split its Monte Carlo draws
over mesh axes (:func:`plan`). A body is written for the examples it sees; while it is
traced under the map, :func:`example_index` gives their global numbers and
:func:`draw_axes` the axes the draws are split over, so per-example keys and draws are
those of one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import devices as devices_lib
from .. import noise as noise_lib
from ..checks import positive_int as check_positive_int
from ..checks import safe_norm as safe_norm
from ..sites import Adapter, SiteInfo, Structure, adapt
from ._deviation import DATA_FIELDS, DEFAULT_QUANTILES, Deviation

__all__ = [
    "Prepared",
    "prepare",
    "check_inputs",
    "check_law",
    "check_positive_int",
    "check_key",
    "quantile_levels",
    "check_labels",
    "as_input",
    "input_dtype",
    "safe_norm",
    "memory_budget",
    "chunked_map",
    "after",
    "compiled_kernel",
    "Shards",
    "plan",
    "example_index",
    "draw_axes",
    "sharded",
    "deviation_specs",
]


class Prepared(NamedTuple):
    """A validated call: the model's adapter and arrays, and the raw input batch."""

    adapter: Adapter
    arrays: Any
    x: Any

    @property
    def structure(self) -> Structure:
        return self.adapter.structure


def quantile_levels(quantiles) -> tuple[float, ...]:
    """The quantile levels as a tuple of floats in [0, 1] (a static kernel option).

    Raises:
      ValueError: not a sequence of numbers in [0, 1].
    """
    if quantiles is DEFAULT_QUANTILES:  # the common case: no conversion, ~4 µs saved
        return DEFAULT_QUANTILES
    try:
        levels = tuple(float(q) for q in quantiles)
    except (TypeError, ValueError):
        raise ValueError(f"quantiles must be a list of levels in [0, 1], got "
                         f"{quantiles!r}") from None
    if any(not 0.0 <= q <= 1.0 for q in levels):
        raise ValueError(f"quantiles must lie in [0, 1], got {list(quantiles)}")
    return levels


def check_key(key) -> None:
    """Checks that ``key`` is a JAX PRNG key (typed or raw) without reading its value."""
    if not isinstance(key, jax.Array):
        raise ValueError("key must be a JAX PRNG key, e.g. jax.random.key(0)")


# (structure, site, law type) → site info, for law types found valid there: a repeated
# call skips the protocol check (``isinstance`` on a runtime Protocol costs ~15 µs).
_VALID_LAWS: dict[tuple[Structure, str, type], SiteInfo] = {}


def check_law(structure: Structure, site: str, noise) -> SiteInfo:
    """The site's info, after checking that ``noise`` is a law that applies there."""
    known = _VALID_LAWS.get((structure, site, type(noise)))
    if known is not None:
        if type(noise).check_shape is not noise_lib.LawDefaults.check_shape:
            noise.check_shape(known.shape)
        return known
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
    if len(_VALID_LAWS) > 4096:
        _VALID_LAWS.clear()
    _VALID_LAWS[(structure, site, type(noise))] = info
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
    large batches run in few chunks there. Computed once per process.
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


def after(value, previous):
    """``value``, made available to what uses it only once ``previous`` is computed.

    XLA's CPU runtime (jaxlib 0.10) can deadlock when two batched LAPACK calls of one
    program (eigh, svd, cholesky ...) run at the same time: each splits its batch over
    the intra-op thread pool and blocks a pool thread until the parts are done, and with
    every pool thread so blocked nobody runs the parts. Computations that each contain
    such a call and would otherwise be independent are chained through this, so that
    they run one after the other; within one computation, batch the calls into one.

    The dependency is data: every floating leaf of ``value`` gets ``0 · s`` added, ``s``
    a finite scalar read off every leaf of ``previous`` (non-finite entries replaced by
    0), so the numbers do not change. (An ``optimization_barrier`` does not order XLA's
    CPU thunks: it is expanded away before they are scheduled.)

    Args:
      value: a pytree of arrays (the inputs of the next computation).
      previous: a pytree of arrays (the result of the one before), or ``None``.

    Returns:
      ``value``, numerically unchanged.
    """
    if previous is None:
        return value
    firsts = [jnp.ravel(a)[:1].astype(jnp.float32) for a in jax.tree.leaves(previous)
              if a.size and jnp.issubdtype(a.dtype, jnp.number)]
    if not firsts:
        return value
    s = jnp.sum(jnp.concatenate([jnp.where(jnp.isfinite(f), f, 0.0) for f in firsts]))
    zero = 0.0 * s  # XLA does not fold x·0 for floats (NaN and inf semantics)
    return jax.tree.map(lambda v: v + zero.astype(v.dtype)
                        if jnp.issubdtype(v.dtype, jnp.inexact) else v, value)


class Shards(NamedTuple):
    """How a kernel splits its work over a mesh (static: hashable, known before tracing).

    Attributes:
      mesh: the mesh.
      batch: the spec entry that splits the examples (an axis name, a tuple of names, or
        ``None`` when every device sees the whole batch).
      draws: mesh axes that split each chunk of Monte Carlo draws (``()``: none).
    """

    mesh: Mesh
    batch: Any
    draws: tuple[str, ...] = ()


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def plan(x, draw_sharding: NamedSharding | None = None) -> Shards | None:
    """The :class:`Shards` of a call on ``x``: its batch split, and the draws' axes.

    Args:
      x: the input batch; split along axis 0 by a ``NamedSharding``, its examples are
        split the same way.
      draw_sharding: a ``NamedSharding`` whose spec's first entry names the mesh axes that
        split every chunk of Monte Carlo draws (sampled), e.g.
        ``NamedSharding(mesh, P("data"))``; on the mesh of ``x`` when that is sharded, and
        on other axes than its batch.

    Returns:
      ``None`` for a call on one device (no split batch, no draw sharding), else the plan.

    Raises:
      ValueError: ``draw_sharding`` is not a ``NamedSharding`` naming mesh axes, lives on
        another mesh than ``x``, or reuses the batch's axes.
    """
    found = devices_lib.batch_axes(x)
    if draw_sharding is None:
        return None if found is None else Shards(found[0], found[1])
    if not isinstance(draw_sharding, NamedSharding) or not draw_sharding.spec or \
            draw_sharding.spec[0] is None or not isinstance(draw_sharding.mesh, Mesh):
        raise ValueError(f"draw_sharding must be a NamedSharding naming the mesh axes of the "
                         f"draws, e.g. NamedSharding(mesh, P('data')); got {draw_sharding!r}")
    mesh, draws = draw_sharding.mesh, _names(draw_sharding.spec[0])
    if found is None:
        return Shards(mesh, None, draws)
    if found[0] != mesh:
        raise ValueError(f"draw_sharding is on mesh {mesh.shape_tuple} but x is split over "
                         f"mesh {found[0].shape_tuple}; use one mesh for both")
    common = set(draws) & set(_names(found[1]))
    if common:
        raise ValueError(f"draw_sharding uses mesh axes {sorted(common)} that already split "
                         f"the batch of x; split the draws over other axes, e.g. "
                         f"{[a for a in mesh.axis_names if a not in _names(found[1])]}")
    return Shards(mesh, found[1], draws)


_CURRENT: contextvars.ContextVar[Shards | None] = contextvars.ContextVar(
    "jaxsens_shards", default=None)


@contextlib.contextmanager
def _tracing(shards: Shards) -> Iterator[None]:
    token = _CURRENT.set(shards)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def example_index(batch: int) -> jax.Array:
    """The global numbers of the ``batch`` examples a body sees (traceable).

    Args:
      batch: the number of examples the body sees.

    Returns:
      ``arange(batch)``, offset by this device's first example when the body is traced
      under a kernel that splits the batch (``d · batch`` on device ``d``).
    """
    shards = _CURRENT.get()
    index = jnp.arange(batch)
    if shards is None or shards.batch is None:
        return index
    return index + jax.lax.axis_index(_names(shards.batch)) * batch


def draw_axes() -> tuple[str, ...]:
    """The mesh axes the body being traced splits its Monte Carlo draws over.

    Returns:
      The axes (manual in the kernel's ``shard_map``), or ``()``.
    """
    shards = _CURRENT.get()
    return () if shards is None else shards.draws


def deviation_specs(shards: Shards, lead: int = 0) -> Deviation:
    """The ``PartitionSpec`` of every field of a kernel's :class:`Deviation`.

    Args:
      shards: the plan.
      lead: the number of axes before the batch axis (2 for a profile table).

    Returns:
      A Deviation of specs: per-example fields split like the batch after ``lead``
      unsplit axes, the others (levels, counts, flags) replicated.
    """
    split = P(*([None] * lead), shards.batch)
    every: dict[str, Any] = {
        f: P() if f in ("quantile_levels", "num_samples", "almost_sure", "mean_exact")
        else split for f in DATA_FIELDS}
    return Deviation(**every)


def sharded(local: Callable, shards: Shards | None, args: tuple, batched: tuple[bool, ...],
            out_specs) -> Any:
    """``local(*args)``, under ``jax.shard_map`` over ``shards.mesh`` when there is a plan.

    Args:
      local: a traceable function of ``args`` for the examples (and draws) one device
        sees.
      shards: the plan (``None``: call ``local`` as it is).
      args: the arguments.
      batched: per argument, whether its leading axis is the batch (split like it).
      out_specs: the ``PartitionSpec`` pytree (prefix) of the result.

    Returns:
      What ``local`` returns, assembled over the devices.
    """
    if shards is None:
        return local(*args)
    mesh = shards.mesh
    specs = tuple(P(shards.batch) if b else P() for b in batched)
    if mesh.explicit_axes:
        # Explicit axes are part of the arrays' types: move each input to its spec first.
        args = tuple(jax.tree.map(
            lambda a, spec=spec: jax.sharding.reshard(a, NamedSharding(mesh, spec)), arg)
            for arg, spec in zip(args, specs, strict=True))

    def inner(*a):
        with _tracing(shards):
            return local(*a)

    # check_vma=False: a user's model may carry unvarying scan state next to varying data.
    return jax.shard_map(inner, mesh=mesh, in_specs=specs, out_specs=out_specs,
                         check_vma=False)(*args)


class _Kernel:
    """A jitted estimator kernel that reads its device plan off ``x`` before the call.

    Calling it as ``kernel(adapter, arrays, x, *args, **options)`` adds the static
    ``shards=plan(x)`` unless given; other attributes (``lower``, ``_cache_size`` ...) are
    the jitted function's.
    """

    def __init__(self, jitted):
        self.jitted = jitted

    def __call__(self, adapter, arrays, x, *args, **options):
        if "shards" not in options:
            options["shards"] = plan(x)
        return self.jitted(adapter, arrays, x, *args, **options)

    def __getattr__(self, name: str):
        return getattr(self.jitted, name)


def compiled_kernel(body, *, static: tuple[str, ...], batched: tuple[int, ...] = ()):
    """The jitted public kernel of an estimator's traceable ``body``.

    ``kernel(adapter, arrays, x, *args, **options)`` unpacks the model's arrays (at trace
    time), shapes ``x`` for the model and returns ``body(structure, params, rest, x, *args,
    **options)``; the adapter and the ``static`` options are static arguments, so one
    compilation serves every call on the same architecture, input shape and options.
    When ``x`` is split along its batch over a mesh (or ``shards=`` says so), the body runs
    under ``jax.shard_map`` on each device's examples (:func:`sharded`).

    Args:
      body: the traceable estimate, returning a :class:`Deviation`.
      static: the names of its static (hashable) options.
      batched: the positions in ``args`` of further per-example arguments (labels).

    Returns:
      The kernel: a jitted function that reads its device plan off ``x`` (:func:`plan`)
      unless given ``shards=``.
    """

    def kernel(adapter: Adapter, arrays, x, *args, shards: Shards | None = None, **options):
        def local(arrays, x, *args):
            params, rest = adapter.unpack(arrays)
            struct = adapter.structure
            return body(struct, params, rest, as_input(struct, x), *args, **options)

        flags = (False, True, *(i in batched for i in range(len(args))))
        out = deviation_specs(shards) if shards is not None else None
        return sharded(local, shards, (arrays, x, *args), flags, out)

    kernel.__name__ = kernel.__qualname__ = f"{body.__name__}_kernel"
    return _Kernel(jax.jit(kernel, static_argnames=("adapter", "shards", *static)))
