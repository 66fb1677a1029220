"""Orbax checkpoints of a training run: save after an epoch, resume, load.

A checkpoint holds the parameters, the optimizer state, the model's other state
(BatchNorm running statistics, RNG counters and keys; when there is any) and a JSON
``meta`` item (epoch, history, run signature and array specs); :func:`load_checkpoint`
reads one back.

Arrays are read back with the shardings of the arrays they replace (:func:`_abstract`):
replicated over the mesh of a data-parallel run, on one device otherwise. A checkpoint
holds no device layout of its own, so one written on any number of devices (or processes,
which save and restore it together through orbax) restores on any other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

from ..sites import Structure, split

__all__ = [
    "Checkpoint",
    "load_checkpoint",
    "latest_epoch",
]

# The package's logger (the name it had before the loop and the checkpoints were split).
_log = logging.getLogger("jaxsens.train")

_CHECKPOINT_FORMAT = 1


class Checkpoint(NamedTuple):
    """A checkpoint read by :func:`load_checkpoint`.

    Attributes:
      model: a new NNX module with the saved parameters.
      opt_state: the saved optimizer state (``None`` unless an optimizer was given).
      epoch: number of completed epochs.
      history: the metrics of those epochs.
    """

    model: nnx.Module
    opt_state: Any
    epoch: int
    history: list[dict]


# --------------------------------------------------------------------------- checkpoints
def _key_data(key: jax.Array) -> list[int]:
    return [int(v) for v in np.asarray(jax.random.key_data(key)).reshape(-1)]


def _leaf_dict(tree) -> dict[str, jax.Array]:
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _is_key(leaf) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _storable(tree):
    """``tree`` with typed PRNG keys as their raw key data (what orbax can write)."""
    return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else a, tree)


def _from_storable(like, stored):
    """Inverse of :func:`_storable`, the key implementations taken from ``like``."""
    return jax.tree.map(
        lambda ref, a: jax.random.wrap_key_data(a, impl=jax.random.key_impl(ref))
        if _is_key(ref) else a, like, stored)


def _abstract(tree) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
            for k, a in _leaf_dict(tree).items()}


def _from_leaf_dict(like, restored: Mapping[str, jax.Array]):
    leaves = [restored[k] for k in sorted(restored)]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _manager(directory: Path, *, create: bool):
    import orbax.checkpoint as ocp  # heavy import, only when checkpointing

    options = ocp.CheckpointManagerOptions(
        max_to_keep=2,
        create=create,
        # Synchronous saves: an epoch's checkpoint is complete before the next epoch runs.
        enable_async_checkpointing=False,
        # Leftovers of a save killed midway (`<step>.orbax-checkpoint-tmp-*`) are never
        # listed as steps; remove them.
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(directory.absolute(), options=options,
                                 item_names=("params", "opt_state", "state", "meta"))


def _save(mgr, epoch: int, params, opt_state, meta: dict, state=None) -> None:
    import orbax.checkpoint as ocp

    items = {"params": ocp.args.StandardSave(_leaf_dict(params)),
             "meta": ocp.args.JsonSave(meta)}
    opt_leaves = _leaf_dict(opt_state)
    if opt_leaves:  # orbax refuses empty items (e.g. plain SGD has no state)
        items["opt_state"] = ocp.args.StandardSave(opt_leaves)
    state_leaves = _leaf_dict(_storable(state)) if state is not None else {}
    if state_leaves:
        items["state"] = ocp.args.StandardSave(state_leaves)
    if epoch in mgr.all_steps():
        # Only an unreadable checkpoint we fell back from can sit at a step we train again.
        mgr.delete(epoch)
    mgr.save(epoch, args=ocp.args.Composite(**items))
    mgr.wait_until_finished()


def _spec(tree) -> list[str]:
    """``"path shape dtype"`` per leaf: what a checkpoint must match to be restored."""
    return [f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {leaf.dtype}"
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _read_meta(mgr, step: int) -> dict:
    import orbax.checkpoint as ocp

    out = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])


def _check_spec(directory: Path, what: str, saved: list | None, tree) -> None:
    # Checked before orbax reads any array: a mismatched restore fails deep inside orbax.
    if saved is None:
        return
    current = _spec(tree)
    if saved != current:
        diff = next(((a, b) for a, b in zip(saved, current, strict=False) if a != b),
                    (f"{len(saved)} arrays", f"{len(current)} arrays"))
        raise ValueError(
            f"checkpoint_dir {directory} holds a different {what}: saved {diff[0]!r}, this run "
            f"{diff[1]!r}; use the {what} that wrote it or a new directory"
        )


def _restore(mgr, step: int, params, opt_state, state=None, *, saved_state: bool = False):
    import orbax.checkpoint as ocp

    items = {"params": ocp.args.StandardRestore(_abstract(params))}
    want_opt = opt_state is not None and jax.tree.leaves(opt_state)
    if want_opt:
        items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
    want_state = saved_state and state is not None and jax.tree.leaves(state)
    if want_state:
        items["state"] = ocp.args.StandardRestore(_abstract(_storable(state)))
    out = mgr.restore(step, args=ocp.args.Composite(**items))
    new_params = _from_leaf_dict(params, out["params"])
    new_opt = _from_leaf_dict(opt_state, out["opt_state"]) if want_opt else opt_state
    new_state = (_from_storable(state, _from_leaf_dict(state, out["state"])) if want_state
                 else state)
    return new_params, new_opt, new_state


def _restore_latest(mgr, directory: Path, params, opt_state, state=None, *,
                    max_epoch: int | None = None, signature: Mapping | None = None,
                    steps: Sequence[int] | None = None):
    """The newest readable checkpoint (epoch <= max_epoch) as (params, opt_state, state,
    meta); ``state`` stays as given where the checkpoint has none.

    ``None`` if the directory holds no checkpoint. A checkpoint that cannot be read (damaged
    after it was written) is skipped for the previous one; one written by a different run
    (signature, parameter or optimizer-state shapes) is a ValueError.
    """
    steps = sorted(mgr.all_steps() if steps is None else steps, reverse=True)
    if max_epoch is not None:
        later = [s for s in steps if s > max_epoch]
        steps = [s for s in steps if s <= max_epoch]
        if later and not steps:
            raise ValueError(
                f"checkpoint_dir {directory} holds a run trained for {max(later)} epochs, more "
                f"than epochs={max_epoch}; ask for epochs >= {max(later)} or use a new directory"
            )
    errors = []
    for step in steps:
        try:
            meta = _read_meta(mgr, step)
        except Exception as err:  # damaged outside orbax: try the previous one
            errors.append(f"epoch {step}: {type(err).__name__}: {err}".splitlines()[0])
            _log.warning("jaxsens.train: cannot read checkpoint %s/%d (%s); trying an older one",
                         directory, step, errors[-1])
            continue
        if signature is not None:
            _check_signature(directory, meta.get("signature", {}), signature)
        _check_spec(directory, "model", meta.get("params_spec"), params)
        if opt_state is not None:
            _check_spec(directory, "optimizer", meta.get("opt_state_spec"), opt_state)
        saved_state = meta.get("state_spec") is not None
        if saved_state and state is not None:
            _check_spec(directory, "model state", meta.get("state_spec"), state)
        try:
            return (*_restore(mgr, step, params, opt_state, state, saved_state=saved_state),
                    meta)
        except Exception as err:  # damaged outside orbax: try the previous one
            errors.append(f"epoch {step}: {type(err).__name__}: {err}".splitlines()[0])
            _log.warning("jaxsens.train: cannot read checkpoint %s/%d (%s); trying an older one",
                         directory, step, errors[-1])
    if errors:
        raise ValueError(f"no readable checkpoint in {directory} ({errors[0]}); use a new "
                         "directory")
    return None


def _run_signature(struct: Structure, key, batch_size, drop_last, terms, n_train) -> dict:
    return {
        "key_data": _key_data(key),
        "batch_size": int(batch_size),
        "drop_last": bool(drop_last),
        "loss_terms": repr(terms),
        "n_train": int(n_train),
        "input_shape": list(struct.input_shape),
    }


def _check_signature(directory: Path, saved: Mapping, current: Mapping) -> None:
    for field, value in current.items():
        if saved.get(field) != value:
            raise ValueError(
                f"checkpoint_dir {directory} was written by a run with a different {field} "
                f"({saved.get(field)!r} != {value!r}); resume with the same settings or use a "
                "new directory"
            )


def latest_epoch(checkpoint_dir: Path | str) -> int | None:
    """The newest epoch saved in ``checkpoint_dir``, without reading any array.

    Args:
      checkpoint_dir: a directory given to :func:`train`.

    Returns:
      The largest saved epoch, or ``None`` if the directory holds no checkpoint.
    """
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return None
    mgr = _manager(directory, create=False)
    try:
        steps = list(mgr.all_steps())
    finally:
        mgr.close()
    return max(steps) if steps else None


def load_checkpoint(
    checkpoint_dir: Path | str,
    model: nnx.Module,
    *,
    optimizer: optax.GradientTransformation | None = None,
    epoch: int | None = None,
) -> Checkpoint:
    """Read a checkpoint written by :func:`train`.

    Args:
      checkpoint_dir: the directory given to :func:`train`.
      model: a module of the same architecture (its parameters are not modified).
      optimizer: the optimizer of the run, to restore its state too.
      epoch: which checkpoint (default: the latest readable one).

    Returns:
      A :class:`Checkpoint` ``(model, opt_state, epoch, history)``: a new module of
      ``model``'s architecture holding the saved parameters and other state (``model``'s
      own state where the checkpoint has none),
      the saved optimizer state (``None`` without ``optimizer``), the number of completed
      epochs and their metrics.

    Raises:
      ValueError: no (readable) checkpoint for this model / optimizer in the directory.
    """
    directory = Path(checkpoint_dir)
    pm = split(model, inference=False)
    opt_state = optimizer.init(pm.params) if optimizer is not None else None
    if not directory.is_dir():
        raise ValueError(f"checkpoint_dir {directory} does not exist")
    mgr = _manager(directory, create=False)
    try:
        if epoch is not None and epoch not in mgr.all_steps():
            raise ValueError(f"no checkpoint for epoch {epoch} in {directory}; have "
                             f"{sorted(mgr.all_steps())}")
        res = _restore_latest(mgr, directory, pm.params, opt_state, pm.rest,
                              steps=None if epoch is None else [epoch])
    finally:
        mgr.close()
    if res is None:
        raise ValueError(f"no checkpoint in {directory}")
    params, opt_state, state, meta = res
    return Checkpoint(nnx.merge(pm.structure.graphdef, params, state),
                      opt_state if optimizer is not None else None,
                      int(meta["epoch"]), list(meta["history"]))
