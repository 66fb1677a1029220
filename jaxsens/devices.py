"""Devices, meshes and processes: the parts of JAX's scale-out machinery jaxsens uses.

jaxsens scales out with JAX's own tools and nothing home-made:

* a :class:`jax.sharding.Mesh` names the devices; an array split along its leading (batch)
  axis with a :class:`~jax.sharding.NamedSharding` tells the estimators to split their
  work the same way (:func:`batch_axes`), and the training loop splits each batch over a
  mesh while the parameters stay replicated (data parallelism);
* many hosts are many processes joined by :func:`jax.distributed.initialize`
  (:func:`initialize`); every process runs the same program, feeds its own devices its
  own rows of each batch (:func:`host_rows`), and only process 0 writes files
  (:func:`is_primary`).

The meshes jaxsens makes (:func:`make_mesh`) have ``Auto`` axes: XLA's partitioner
places whatever a user's model computes, and jaxsens's own kernels say exactly how they
split (``jax.shard_map``). Nothing here runs at import, and nothing reads the environment
except :func:`initialize`, through JAX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "make_mesh",
    "auto_axes",
    "batch_axes",
    "batch_sharding",
    "replicated",
    "replicate",
    "local_copy",
    "host_rows",
    "describe",
    "initialize",
    "is_primary",
    "barrier",
]


def make_mesh(shape: Sequence[int] | str = "auto", axes: Sequence[str] = ("data",)) -> Mesh:
    """A mesh over the devices JAX sees (every process's, in a multi-process run).

    Args:
      shape: the number of devices along each axis, or ``"auto"``: every device on the
        first axis and 1 on the others.
      axes: the axis names, one per entry of ``shape``.

    Returns:
      A :class:`jax.sharding.Mesh` with ``Auto`` axis types over the first
      ``prod(shape)`` devices (``jax.make_mesh``'s order).

    Raises:
      ValueError: empty, repeated or non-string axis names, a shape of another length or
        with entries < 1, or more devices than there are.
    """
    names = tuple(axes)
    if not names or any(not isinstance(a, str) or not a for a in names) or \
            len(set(names)) != len(names):
        raise ValueError(f"mesh axes must be distinct non-empty names, got {list(names)}")
    count = jax.device_count()
    if isinstance(shape, str):
        if shape != "auto":
            raise ValueError(f"mesh shape must be 'auto' or a list of sizes, got {shape!r}")
        sizes = (count, *([1] * (len(names) - 1)))
    else:
        sizes = tuple(shape)
        if len(sizes) != len(names) or any(
                isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 1
                for s in sizes):
            raise ValueError(f"mesh shape must be one size >= 1 per axis {list(names)}, got "
                             f"{list(sizes)}")
    if math.prod(sizes) > count:
        raise ValueError(f"mesh shape {list(sizes)} needs {math.prod(sizes)} devices; JAX sees "
                         f"{count} ({jax.devices()[0].platform}); use 'auto' or a smaller shape")
    return jax.make_mesh(tuple(int(s) for s in sizes), names,
                         axis_types=(AxisType.Auto,) * len(names))


def auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis of type ``Auto`` (the same devices in the same places).

    Args:
      mesh: any mesh (``jax.make_mesh`` makes ``Explicit`` ones by default).

    Returns:
      ``mesh`` itself when all its axes are ``Auto``, else an equal-layout ``Auto`` mesh.
    """
    if mesh.are_all_axes_auto:
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def batch_axes(x: Any) -> tuple[Mesh, Any] | None:
    """How the leading axis of ``x`` is split over devices, read from its sharding.

    Args:
      x: any value; only a :class:`jax.Array` with a :class:`~jax.sharding.NamedSharding`
        whose spec splits axis 0 counts.

    Returns:
      ``(mesh, entry)``: the mesh and the spec entry of axis 0 (an axis name or a tuple
      of names, as the sharding has it), or ``None`` when axis 0 is not split (a NumPy
      array, one device, a replicated array ...).
    """
    if not isinstance(x, jax.Array) or getattr(x, "ndim", 0) < 1:
        return None
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding) or not sharding.spec:
        return None
    entry, mesh = sharding.spec[0], sharding.mesh
    if entry is None or entry == () or not isinstance(mesh, Mesh) or mesh.size == 1:
        return None
    return mesh, entry


def batch_sharding(mesh: Mesh, rows: int | None = None) -> NamedSharding:
    """The sharding that splits a leading (batch) axis over every axis of ``mesh``.

    Args:
      mesh: the mesh.
      rows: the batch size; when given and not a multiple of the mesh's size, the
        replicated sharding is returned instead (JAX splits only evenly).

    Returns:
      ``NamedSharding(mesh, P(mesh.axis_names))`` (or the replicated one, see ``rows``).
    """
    if rows is not None and rows % mesh.size:
        return replicated(mesh)
    names = mesh.axis_names
    return NamedSharding(mesh, P(names[0] if len(names) == 1 else tuple(names)))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that holds a whole copy on every device of ``mesh``.

    Args:
      mesh: the mesh.

    Returns:
      ``NamedSharding(mesh, P())``.
    """
    return NamedSharding(mesh, P())


def _is_key(a) -> bool:
    return isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of ``tree`` as one copy per device of ``mesh`` (every process's).

    Works in a multi-process run as long as every process holds the same values (the
    same seed and the same arithmetic give that); typed PRNG keys are kept typed.

    Args:
      tree: a pytree of arrays (JAX or NumPy).
      mesh: the mesh.

    Returns:
      The same pytree, each leaf a :class:`jax.Array` replicated over ``mesh``.
    """
    sharding = replicated(mesh)

    def put(a):
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        if _is_key(a):
            data = put(jax.random.key_data(a))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def local_copy(tree: Any) -> Any:
    """A replicated pytree as this process's own copy, on one device and uncommitted.

    Args:
      tree: a pytree of replicated :class:`jax.Array` (e.g. trained parameters).

    Returns:
      The same pytree as uncommitted single-device arrays: computations on them need no
      other process, run on the default device, and follow an input split over a mesh
      (JAX moves uncommitted arrays to where the other arguments live). Single-device
      leaves and non-arrays are returned as they are.

    Raises:
      ValueError: a leaf is split over devices rather than replicated.
    """
    def one(a):
        if not isinstance(a, jax.Array) or len(a.sharding.device_set) == 1:
            return a
        if not a.is_fully_replicated:
            raise ValueError(f"local_copy needs replicated arrays, got one split as "
                             f"{a.sharding}")
        if _is_key(a):
            return jax.random.wrap_key_data(one(jax.random.key_data(a)),
                                            impl=jax.random.key_impl(a))
        return jax.device_put(np.asarray(a.addressable_data(0)))

    return jax.tree.map(one, tree)


def host_rows(sharding: NamedSharding, data: np.ndarray, rows: np.ndarray | None = None
              ) -> jax.Array:
    """The global array ``data[rows]`` placed with ``sharding``, each process reading only
    the rows its own devices hold.

    Args:
      sharding: where the result lives (usually :func:`batch_sharding` or
        :func:`replicated`).
      data: the host array (the same on every process).
      rows: indices into ``data``'s leading axis (default: all rows, in order).

    Returns:
      A :class:`jax.Array` of shape ``(len(rows), *data.shape[1:])``.
    """
    data = np.asarray(data)
    idx = np.arange(data.shape[0]) if rows is None else np.asarray(rows)
    shape = (idx.shape[0], *data.shape[1:])

    def fetch(index):
        return data[idx[index[0]]][(slice(None), *index[1:])]

    return jax.make_array_from_callback(shape, sharding, fetch)


def describe(mesh: Mesh | None = None) -> dict:
    """The devices of this run, as plain data (for a run directory).

    Args:
      mesh: the mesh the run uses (``None``: one device, no mesh).

    Returns:
      ``{"platform", "device_kind", "device_count", "local_device_count",
      "process_count", "mesh": {"shape", "axes"} | None, "devices": [ids]}``: the
      devices JAX sees and, with a mesh, its shape, axis names and device ids.
    """
    devices = jax.devices()
    used = list(mesh.devices.flat) if mesh is not None else devices[:1]
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "mesh": None if mesh is None else {
            "shape": [int(s) for s in mesh.devices.shape], "axes": list(mesh.axis_names)},
        "devices": [int(d.id) for d in used],
    }


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join a multi-process run: :func:`jax.distributed.initialize`, before any computation.

    Arguments left ``None`` come from JAX's own sources: ``JAX_COORDINATOR_ADDRESS`` and
    the cluster it detects (SLURM, Open MPI, Kubernetes, Cloud TPU). On CPUs the
    processes exchange data with JAX's CPU collectives (gloo).

    Args:
      coordinator: ``host:port`` of process 0.
      num_processes: how many processes take part.
      process_id: this process's number, ``0 <= process_id < num_processes``.

    Raises:
      ValueError: JAX could not join the run (one line: what JAX said).
    """
    try:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
    except (RuntimeError, ValueError, TypeError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot join the multi-process run ({detail}); give --coordinator "
                         "HOST:PORT, --num-processes N and --process-id I, or run under a "
                         "cluster JAX detects") from None


def is_primary() -> bool:
    """Whether this process writes files (process 0; always true in a one-process run).

    Returns:
      ``jax.process_index() == 0``.
    """
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing in a one-process run).

    Args:
      name: the barrier's name, the same on every process.
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
