"""The Optax training loop: one jitted step, per-epoch metrics, resumable orbax checkpoints.

:func:`train` splits a Flax NNX module once into a pure function (:func:`jaxsens.sites.split`)
and trains its parameters with any Optax optimizer on a weighted sum of loss terms from
:mod:`jaxsens.losses`. Training is a pure function of ``(model, data, optimizer, loss terms,
batch size, key)``:

* epoch ``e`` (0-based) uses ``epoch_key = fold_in(key, e)``; its data order comes from the
  first half of ``split(epoch_key)`` and step ``s`` uses ``fold_in(second half, s)``, so no
  RNG state is carried between epochs;
* with ``checkpoint_dir`` the parameters, optimizer state, epoch, key data and history are
  saved after every ``checkpoint_every`` epochs (and after the last); a later call with the
  same directory resumes from the latest checkpoint and gives bitwise the same result as an
  uninterrupted run.

:func:`make_optimizer` builds any allow-listed Optax optimizer with a learning-rate schedule
and optional gradient clipping by name (for configs).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from . import data as data_lib
from .losses import CrossEntropy, LossTerm, _normalize_terms, term_names, total_loss
from .sites import PureModel, Structure, split

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "TIME_KEYS",
    "TrainResult",
    "Checkpoint",
    "TrainingDiverged",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "make_eval_fn",
    "train",
    "load_checkpoint",
]

_log = logging.getLogger(__name__)

_CHECKPOINT_FORMAT = 1
TIME_KEYS = ("epoch_time", "steps_per_second")
"""History entries that measure wall time (differ between otherwise identical runs)."""


class TrainingDiverged(RuntimeError):
    """The training loss or gradient became NaN or infinite."""


class TrainResult(NamedTuple):
    """The result of :func:`train`.

    Attributes:
      model: a new NNX module holding the trained parameters (the input module is left as
        it was).
      history: one dict of metrics per epoch (including epochs restored from a checkpoint).
    """

    model: nnx.Module
    history: list[dict]


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


# --------------------------------------------------------------------------- optimizers
# Explicit allow-list: name -> Optax constructor (never getattr on a string). Every entry
# takes `learning_rate` (a number or a schedule) and works with the plain
# `update(grads, state, params)` call. Left out: sm3 and rprop (no schedules), noisy_sgd
# (its own RNG stream), polyak_sgd / lbfgs (need the loss value in `update`).
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "adam": optax.adam,
    "adamw": optax.adamw,
    "amsgrad": optax.amsgrad,
    "adamax": optax.adamax,
    "adamaxw": optax.adamaxw,
    "nadam": optax.nadam,
    "nadamw": optax.nadamw,
    "radam": optax.radam,
    "rmsprop": optax.rmsprop,
    "lion": optax.lion,
    "adagrad": optax.adagrad,
    "adadelta": optax.adadelta,
    "adafactor": optax.adafactor,
    "adabelief": optax.adabelief,
    "adan": optax.adan,
    "lamb": optax.lamb,
    "lars": optax.lars,
    "novograd": optax.novograd,
    "yogi": optax.yogi,
    "fromage": optax.fromage,
    "sign_sgd": optax.sign_sgd,
    "optimistic_gradient_descent": optax.optimistic_gradient_descent,
    "optimistic_adam": optax.optimistic_adam_v2,
}


def _need_steps(name: str, total_steps: int | None) -> int:
    if total_steps is None or isinstance(total_steps, bool) or int(total_steps) < 1:
        raise ValueError(f"schedule {name!r} needs total_steps >= 1, got {total_steps!r}")
    return int(total_steps)


def _constant(lr, total_steps):
    return optax.constant_schedule(lr)


def _cosine_decay(lr, total_steps, *, alpha=0.0, exponent=1.0):
    return optax.cosine_decay_schedule(lr, _need_steps("cosine_decay", total_steps),
                                       alpha=alpha, exponent=exponent)


def _warmup_cosine_decay(lr, total_steps, *, warmup_steps=None, warmup_fraction=0.05,
                         init_value=0.0, end_value=0.0):
    n = _need_steps("warmup_cosine_decay", total_steps)
    w = int(round(warmup_fraction * n)) if warmup_steps is None else int(warmup_steps)
    return optax.warmup_cosine_decay_schedule(init_value, lr, warmup_steps=w, decay_steps=n,
                                              end_value=end_value)


def _exponential_decay(lr, total_steps, *, decay_rate, transition_steps=1, staircase=False,
                       transition_begin=0, end_value=None):
    return optax.exponential_decay(lr, transition_steps, decay_rate,
                                   transition_begin=transition_begin, staircase=staircase,
                                   end_value=end_value)


def _linear(lr, total_steps, *, end_value=0.0, transition_begin=0):
    return optax.linear_schedule(lr, end_value, _need_steps("linear", total_steps),
                                 transition_begin=transition_begin)


def _warmup_linear(lr, total_steps, *, warmup_steps=None, warmup_fraction=0.05,
                   init_value=0.0, end_value=0.0):
    n = _need_steps("warmup_linear", total_steps)
    w = int(round(warmup_fraction * n)) if warmup_steps is None else int(warmup_steps)
    return optax.join_schedules(
        [optax.linear_schedule(init_value, lr, w),
         optax.linear_schedule(lr, end_value, max(n - w, 1))], [w])


def _warmup_constant(lr, total_steps, *, warmup_steps, init_value=0.0):
    return optax.join_schedules(
        [optax.linear_schedule(init_value, lr, int(warmup_steps)), optax.constant_schedule(lr)],
        [int(warmup_steps)])


def _piecewise_constant(lr, total_steps, *, boundaries_and_scales):
    # Config files give mapping keys as strings; the schedule wants integer steps.
    table = {int(k): float(v) for k, v in dict(boundaries_and_scales).items()}
    return optax.piecewise_constant_schedule(lr, table)


def _polynomial(lr, total_steps, *, end_value=0.0, power=1.0, transition_begin=0):
    return optax.polynomial_schedule(lr, end_value, power,
                                     _need_steps("polynomial", total_steps),
                                     transition_begin=transition_begin)


def _one_cycle(lr, total_steps, *, pct_start=0.3, div_factor=25.0, final_div_factor=1e4):
    return optax.cosine_onecycle_schedule(_need_steps("one_cycle", total_steps), lr,
                                          pct_start=pct_start, div_factor=div_factor,
                                          final_div_factor=final_div_factor)


# name -> builder(learning_rate, total_steps, **kwargs) -> optax schedule.
SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
    "constant": _constant,
    "cosine_decay": _cosine_decay,
    "warmup_cosine_decay": _warmup_cosine_decay,
    "exponential_decay": _exponential_decay,
    "linear": _linear,
    "warmup_linear": _warmup_linear,
    "warmup_constant": _warmup_constant,
    "piecewise_constant": _piecewise_constant,
    "polynomial": _polynomial,
    "one_cycle": _one_cycle,
}


def _kwarg_names(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _call_checked(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; unknown/missing keyword arguments as one-line ValueErrors."""
    valid = _kwarg_names(fn)
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        raise ValueError(f"{what} got unknown argument(s) {bad}; valid: {valid[len(args):]}")
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as err:
        raise ValueError(f"{what}: {err}; valid arguments: {valid[len(args):]}") from None
    return fn(*args, **kwargs)


def make_schedule(name: str | None, learning_rate: float, *,
                  total_steps: int | None = None, **kwargs: Any) -> optax.Schedule:
    """A learning-rate schedule by name (``None`` = constant).

    Args:
      name: a key of :data:`SCHEDULES`.
      learning_rate: the peak / initial learning rate.
      total_steps: total optimizer steps (needed by decaying schedules).
      **kwargs: the schedule's own options (e.g. ``warmup_steps``, ``decay_rate``).

    Raises:
      ValueError: unknown schedule or options (message lists the valid ones).
    """
    name = "constant" if name is None else name
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return _call_checked(f"schedule {name!r}", SCHEDULES[name], learning_rate, total_steps,
                         **kwargs)


def make_optimizer(
    name: str,
    learning_rate: float,
    schedule: str | None = None,
    schedule_kwargs: Mapping[str, Any] | None = None,
    total_steps: int | None = None,
    *,
    clip_norm: float | None = None,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """An Optax optimizer by name, with a learning-rate schedule and optional clipping.

    Args:
      name: a key of :data:`OPTIMIZERS` (sgd, adam, adamw, rmsprop, lion, ...).
      learning_rate: the (peak) learning rate, > 0.
      schedule: a key of :data:`SCHEDULES` or ``None`` for a constant rate.
      schedule_kwargs: options of the schedule.
      total_steps: total optimizer steps, needed by decaying schedules.
      clip_norm: clip gradients to this global ℓ2 norm first (``optax.clip_by_global_norm``).
      **kwargs: options of the Optax constructor (``momentum=0.9``, ``weight_decay=1e-4`` ...).

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: unknown optimizer, schedule or options, or a bad learning rate / clip norm.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, int | float) or not (
            math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}")
    if schedule is None and not schedule_kwargs:
        lr = float(learning_rate)  # a plain number: no schedule step counter in the state
    else:
        lr = make_schedule(schedule, float(learning_rate), total_steps=total_steps,
                           **dict(schedule_kwargs or {}))
    opt = _call_checked(f"optimizer {name!r}", OPTIMIZERS[name], lr, **kwargs)
    if clip_norm is not None:
        if isinstance(clip_norm, bool) or not (isinstance(clip_norm, int | float)
                                               and clip_norm > 0):
            raise ValueError(f"clip_norm must be a number > 0 or None, got {clip_norm!r}")
        opt = optax.chain(optax.clip_by_global_norm(float(clip_norm)), opt)
    return opt


# --------------------------------------------------------------------------- step / eval
def make_train_step(
    struct: Structure,
    optimizer: optax.GradientTransformation,
    loss_terms,
) -> Callable:
    """The (unjitted) train step ``(params, opt_state, rest, x, y, key) -> (params, opt_state,
    metrics)``.

    ``metrics`` holds the total ``loss``, each term's batch mean (by
    :func:`jaxsens.losses.term_names`), ``correct`` (number of correct argmax predictions of
    the clean forward pass) and ``grad_norm`` (global ℓ2 norm of the gradient).
    """
    terms = _normalize_terms(loss_terms)

    def step(params, opt_state, rest, x, y, key):
        def objective(p):
            loss, parts = total_loss(terms, struct, p, rest, x, y, key)
            # The clean logits for the accuracy; XLA merges this forward pass with the
            # cross-entropy term's identical one.
            logits = struct.apply(p, rest, x)
            return loss, (parts, logits)

        (loss, (parts, logits)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        pred = jnp.argmax(logits.reshape(logits.shape[0], -1), axis=-1)
        metrics = {
            "loss": loss,
            **parts,
            "correct": jnp.sum(pred == y),
            "grad_norm": optax.tree.norm(grads),
        }
        return params, opt_state, metrics

    return step


@functools.lru_cache(maxsize=8)
def make_eval_fn(struct: Structure) -> Callable:
    """Jitted ``(params, rest, x, y) -> (sum of cross-entropy, number correct)`` on a batch."""

    @jax.jit
    def evaluate(params, rest, x, y):
        logits = struct.apply(params, rest, x)
        logits = logits.reshape(logits.shape[0], -1)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(ce), jnp.sum(jnp.argmax(logits, axis=-1) == y)

    return evaluate


def _evaluate(evaluate, params, rest, x, y, batch_size: int) -> tuple[float, float]:
    n = x.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    ce, correct = 0.0, 0
    for start in range(0, n, batch_size):
        c, k = evaluate(params, rest, x[start:start + batch_size], y[start:start + batch_size])
        ce += float(c)
        correct += int(k)
    return ce / n, correct / n


# --------------------------------------------------------------------------- checkpoints
def _key_data(key: jax.Array) -> list[int]:
    return [int(v) for v in np.asarray(jax.random.key_data(key)).reshape(-1)]


def _leaf_dict(tree) -> dict[str, jax.Array]:
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


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
                                 item_names=("params", "opt_state", "meta"))


def _save(mgr, epoch: int, params, opt_state, meta: dict) -> None:
    import orbax.checkpoint as ocp

    items = {"params": ocp.args.StandardSave(_leaf_dict(params)),
             "meta": ocp.args.JsonSave(meta)}
    opt_leaves = _leaf_dict(opt_state)
    if opt_leaves:  # orbax refuses empty items (e.g. plain SGD has no state)
        items["opt_state"] = ocp.args.StandardSave(opt_leaves)
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


def _restore(mgr, step: int, params, opt_state):
    import orbax.checkpoint as ocp

    items = {"params": ocp.args.StandardRestore(_abstract(params))}
    want_opt = opt_state is not None and jax.tree.leaves(opt_state)
    if want_opt:
        items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
    out = mgr.restore(step, args=ocp.args.Composite(**items))
    new_params = _from_leaf_dict(params, out["params"])
    new_opt = _from_leaf_dict(opt_state, out["opt_state"]) if want_opt else opt_state
    return new_params, new_opt


def _restore_latest(mgr, directory: Path, params, opt_state, *, max_epoch: int | None = None,
                    signature: Mapping | None = None, steps: Sequence[int] | None = None):
    """The newest readable checkpoint (epoch <= max_epoch) as (params, opt_state, meta).

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
        try:
            return (*_restore(mgr, step, params, opt_state), meta)
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

    Raises:
      ValueError: no (readable) checkpoint for this model / optimizer in the directory.
    """
    directory = Path(checkpoint_dir)
    pm = split(model)
    opt_state = optimizer.init(pm.params) if optimizer is not None else None
    if not directory.is_dir():
        raise ValueError(f"checkpoint_dir {directory} does not exist")
    mgr = _manager(directory, create=False)
    try:
        if epoch is not None and epoch not in mgr.all_steps():
            raise ValueError(f"no checkpoint for epoch {epoch} in {directory}; have "
                             f"{sorted(mgr.all_steps())}")
        res = _restore_latest(mgr, directory, pm.params, opt_state,
                              steps=None if epoch is None else [epoch])
    finally:
        mgr.close()
    if res is None:
        raise ValueError(f"no checkpoint in {directory}")
    params, opt_state, meta = res
    return Checkpoint(nnx.merge(pm.structure.graphdef, params, pm.rest),
                      opt_state if optimizer is not None else None,
                      int(meta["epoch"]), list(meta["history"]))


# --------------------------------------------------------------------------- train
def _prepare_key(key) -> jax.Array:
    if not isinstance(key, jax.Array):
        raise ValueError("key must be a JAX PRNG key, e.g. jax.random.key(0)")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key must be a single PRNG key, got a key array {key.shape}")
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise ValueError(f"key must be a JAX PRNG key, got an array {key.dtype} {key.shape}")


def _float_dtype(params):
    dts = [a.dtype for a in jax.tree.leaves(params) if jnp.issubdtype(a.dtype, jnp.floating)]
    return jnp.result_type(*dts) if dts else jnp.float32


def _device_data(struct: Structure, x: np.ndarray, y: np.ndarray, dtype, part: str):
    want = struct.input_shape
    if x.shape[0] and math.prod(x.shape[1:]) != math.prod(want):
        raise ValueError(
            f"x_{part} has per-example shape {tuple(x.shape[1:])} but the model takes {want}"
        )
    x = np.asarray(x).reshape(x.shape[0], *want)
    return jnp.asarray(x, dtype), jnp.asarray(y, jnp.int32)


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _diverged(epoch: int, step: int, loss: float, grad_norm: float, directory) -> TrainingDiverged:
    what = (f"loss = {loss}" if not math.isfinite(loss)
            else f"gradient norm = {grad_norm} (loss = {loss})")
    where = f"; the last good checkpoint stays in {directory}" if directory else ""
    return TrainingDiverged(
        f"training diverged at epoch {epoch}, step {step}: {what}; try a lower learning rate "
        f"(or gradient clipping){where}"
    )


def _jitted_step(step: Callable) -> Callable:
    """Jit ``step`` with the minibatch gathered on device from the full arrays by index."""

    def gathered(params, opt_state, rest, x_all, y_all, idx, key):
        return step(params, opt_state, rest, x_all[idx], y_all[idx], key)

    return jax.jit(gathered, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def _cached_step(struct: Structure, optimizer, terms) -> Callable:
    return _jitted_step(make_train_step(struct, optimizer, terms))


def _step_for(struct: Structure, optimizer, terms) -> Callable:
    """The jitted step, shared by calls with the same structure, optimizer and terms.

    Repeated runs (resuming, seeds, sweeps over data) then compile once. Terms holding
    arrays (unhashable) get a fresh jitted step.
    """
    try:
        hash((struct, optimizer, terms))
    except TypeError:
        return _jitted_step(make_train_step(struct, optimizer, terms))
    return _cached_step(struct, optimizer, terms)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


class _EpochSums:
    """Host-side running sums of one epoch's step metrics; raises on a non-finite step."""

    def __init__(self, keys, epoch: int, directory):
        self.sums = dict.fromkeys(keys, 0.0)
        self.seen = 0
        self.epoch = epoch
        self.directory = directory

    def add(self, step: int, n: int, metrics) -> None:
        m = jax.device_get(metrics)
        loss, gnorm = float(m["loss"]), float(m["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            raise _diverged(self.epoch, step, loss, gnorm, self.directory)
        for k in self.sums:
            # "correct" is a count; the others are batch means, weighted by the batch size.
            self.sums[k] += float(m[k]) if k == "correct" else float(m[k]) * n
        self.seen += n


def train(
    model: nnx.Module,
    data: data_lib.Dataset,
    *,
    optimizer: optax.GradientTransformation,
    loss_terms: Sequence[tuple[float, LossTerm]] | Sequence[LossTerm] | None = None,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    checkpoint_dir: Path | str | None = None,
    checkpoint_every: int = 1,
    eval_batch_size: int = 1024,
    drop_last: bool = False,
    on_epoch: Callable[[dict], Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on ``data`` with ``optimizer`` on a weighted sum of loss terms.

    One jitted step (parameters and optimizer state donated) per minibatch; the test set is
    evaluated after every epoch. Epoch ``e`` draws its data order and its step keys from
    ``fold_in(key, e)`` only, so results depend on nothing but the arguments, and a run
    resumed from a checkpoint is bitwise identical to an uninterrupted one.

    Args:
      model: a Flax NNX module (e.g. :class:`jaxsens.models.MLP`, :class:`~jaxsens.models.LeNet`);
        not modified.
      data: the dataset; inputs are reshaped to the model's input shape and cast to the
        parameters' float dtype (float64 parameters train in float64).
      optimizer: an Optax optimizer (see :func:`make_optimizer`).
      loss_terms: ``[(weight, term), ...]`` from :mod:`jaxsens.losses` (a bare term has
        weight 1); default ``[(1.0, CrossEntropy())]``.
      epochs: total number of epochs (including any restored from ``checkpoint_dir``).
      batch_size: examples per step.
      key: JAX PRNG key.
      checkpoint_dir: save checkpoints here and resume from the latest one; ``None`` writes
        nothing.
      checkpoint_every: save after every this many epochs (and always after the last); the
        two most recent checkpoints are kept.
      eval_batch_size: examples per evaluation batch.
      drop_last: drop each epoch's last incomplete batch.
      on_epoch: called with each epoch's metrics dict after it is recorded (and saved).
      progress: show a tqdm progress bar over epochs (only on a terminal).

    Returns:
      :class:`TrainResult` ``(model, history)``. Each history entry has ``epoch`` (1-based),
      ``train_loss`` (example-weighted mean of the total loss over the epoch's steps),
      ``train_<term>`` for each term (unweighted means), ``train_accuracy`` (of the clean
      forward pass during the epoch), ``grad_norm`` (mean global gradient norm),
      ``test_loss`` (cross-entropy), ``test_accuracy``, ``steps``, ``epoch_time`` (seconds,
      training and evaluation) and ``steps_per_second`` (training steps only).

    Raises:
      TrainingDiverged: the loss or gradient became non-finite (nothing is saved for that
        epoch; earlier checkpoints stay intact).
      ValueError: bad arguments, or a checkpoint directory written by a different run.
    """
    terms = _normalize_terms([(1.0, CrossEntropy())] if loss_terms is None else loss_terms)
    names = term_names(terms)
    epochs = _check_int("epochs", epochs, 0)
    batch_size = _check_int("batch_size", batch_size)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every)
    eval_batch_size = _check_int("eval_batch_size", eval_batch_size)
    key = _prepare_key(key)
    if not isinstance(data, data_lib.Dataset):
        raise ValueError(f"data must be a jaxsens.data.Dataset, got {type(data).__name__}")
    if isinstance(model, PureModel) or not isinstance(model, nnx.Module):
        raise ValueError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    pm = split(model, None if hasattr(model, "input_shape") else jnp.asarray(data.x_train[:1]))
    struct, rest = pm.structure, pm.rest
    for _, term in terms:
        term.check(struct)
    # Fresh buffers: the step donates params / opt_state, which must not be the module's own.
    params = jax.tree.map(jnp.array, pm.params)
    opt_state = optimizer.init(params)
    dtype = _float_dtype(params)
    x_train, y_train = _device_data(struct, data.x_train, data.y_train, dtype, "train")
    x_test, y_test = _device_data(struct, data.x_test, data.y_test, dtype, "test")
    n_train = x_train.shape[0]
    steps_per_epoch = data_lib.num_batches(n_train, batch_size, drop_last=drop_last)
    if steps_per_epoch == 0:
        raise ValueError(f"no training steps: {n_train} examples, batch_size={batch_size} and "
                         f"drop_last={drop_last}")

    signature = _run_signature(struct, key, batch_size, drop_last, terms, n_train)
    history: list[dict] = []
    start = 0
    mgr = None
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)
    if directory is not None:
        mgr = _manager(directory, create=True)
        res = _restore_latest(mgr, directory, params, opt_state, max_epoch=epochs,
                              signature=signature)
        if res is not None:
            params, opt_state, meta = res
            start = int(meta["epoch"])
            history = list(meta["history"])

    # Fresh and restored state alike committed to their device: one jit cache entry for both.
    params, opt_state = jax.tree.map(lambda a: jax.device_put(a, a.sharding),
                                     (params, opt_state))
    step = _step_for(struct, optimizer, terms)
    evaluate = make_eval_fn(struct)
    index = np.arange(n_train)

    from tqdm import tqdm

    bar = tqdm(total=epochs, initial=start, desc="train", unit="epoch",
               disable=None if progress else True, leave=False)
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            shuffle_key, step_root = jax.random.split(jax.random.fold_in(key, epoch))
            order = data_lib.batches(index, index, batch_size, key=shuffle_key,
                                     drop_last=drop_last)
            acc = _EpochSums(("loss", *names, "correct", "grad_norm"), epoch + 1, directory)
            pending = None
            for s, (idx, _) in enumerate(order):
                params, opt_state, m = step(params, opt_state, rest, x_train, y_train,
                                            jnp.asarray(idx), jax.random.fold_in(step_root, s))
                # Check the previous step while this one runs (keeps the device busy).
                if pending is not None:
                    acc.add(*pending)
                pending = (s, len(idx), m)
            acc.add(*pending)
            sums, seen = acc.sums, acc.seen
            t_train = time.perf_counter() - t0
            if not bool(_all_finite(params)):
                raise _diverged(epoch + 1, steps_per_epoch - 1, float("nan"), float("nan"),
                                directory)
            test_loss, test_acc = _evaluate(evaluate, params, rest, x_test, y_test,
                                            eval_batch_size)
            record = {
                "epoch": epoch + 1,
                "train_loss": sums["loss"] / seen,
                **{f"train_{n}": sums[n] / seen for n in names},
                "train_accuracy": sums["correct"] / seen,
                "grad_norm": sums["grad_norm"] / seen,
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "steps": steps_per_epoch,
                "epoch_time": time.perf_counter() - t0,
                "steps_per_second": steps_per_epoch / t_train,
            }
            history.append(record)
            if mgr is not None and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs):
                meta = {"format": _CHECKPOINT_FORMAT, "epoch": epoch + 1, "history": history,
                        "signature": signature, "params_spec": _spec(params),
                        "opt_state_spec": _spec(opt_state)}
                _save(mgr, epoch + 1, params, opt_state, meta)
            if on_epoch is not None:
                on_epoch(dict(record))
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.4g}",
                            test_acc=f"{record['test_accuracy']:.3f}")
    finally:
        bar.close()
        if mgr is not None:
            mgr.close()
    trained = nnx.merge(struct.graphdef, params, rest)
    return TrainResult(trained, history)
