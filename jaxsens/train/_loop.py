"""The training loop of :mod:`jaxsens.train`: :func:`train`, its jitted step, the per-epoch
evaluation and the types of its results.

Optimizers by name are in ``_optimizers``, the orbax checkpoints in ``_checkpoints``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from .. import data as data_lib
from .. import devices as devices_lib
from ..checks import positive_int
from ..losses import CrossEntropy, LossTerm, normalize_terms, term_names, total_loss
from ..sites import PureModel, Structure, inference_structure, split
from ._checkpoints import (
    _CHECKPOINT_FORMAT,
    _manager,
    _restore_latest,
    _run_signature,
    _save,
    _spec,
)

__all__ = [
    "TIME_KEYS",
    "TrainResult",
    "TrainingDiverged",
    "make_train_step",
    "make_eval_fn",
    "train",
]

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


# --------------------------------------------------------------------------- step / eval
def make_train_step(
    struct: Structure,
    optimizer: optax.GradientTransformation,
    loss_terms: LossTerm | Sequence[tuple[float, LossTerm] | LossTerm],
) -> Callable:
    """The (unjitted) train step ``(params, opt_state, rest, x, y, key, count=None) ->
    (params, opt_state, rest, metrics)``.

    One optimizer step on the objective of :func:`jaxsens.losses.total_loss`,

        L(θ) = Σ_i w_i · mean_b term_i(θ; x_b, y_b),

    with scheduled weights (:class:`jaxsens.losses.Warmup`) taken at ``count``, the
    0-based number of this optimizer step over the whole training,

    with the gradient ∇_θ L from ``jax.value_and_grad`` and the update
    ``optimizer.update(grads, opt_state, params)`` applied by ``optax.apply_updates``.

    ``metrics`` holds the total ``loss``, each term's batch mean (by
    :func:`jaxsens.losses.term_names`), ``correct`` (number of correct argmax predictions of
    the clean forward pass) and ``grad_norm`` (global ℓ2 norm of the gradient); all are
    taken at the parameters before the update. The model's other state (BatchNorm running
    statistics, dropout RNG counters ...) comes out of the clean forward pass and is
    carried to the next step; every loss term of a step sees the state it started with.

    Args:
      struct: the model structure (:attr:`jaxsens.sites.PureModel.structure`).
      optimizer: an Optax optimizer (see :func:`make_optimizer`).
      loss_terms: a loss term, or ``[(weight, term), ...]`` from :mod:`jaxsens.losses` (a
        bare term has weight 1).

    Returns:
      The pure function ``step(params, opt_state, rest, x, y, key, count=None)``: ``x``
      inputs ``(batch, *input_shape)``, ``y`` integer labels ``(batch,)``, ``key`` the PRNG
      key of the step (loss term ``i`` gets ``fold_in(key, i)``), ``count`` the step's
      number (an integer scalar; needed when a weight is a schedule); it returns the new
      ``params``,
      the new ``opt_state``, the new ``rest`` and the ``metrics`` dict of scalar arrays. Wrap it in
      ``jax.jit`` to compile it.

    Raises:
      ValueError: ``loss_terms`` holds an entry that is neither a term nor a
        ``(weight, term)`` pair, or no term at all.
    """
    terms = normalize_terms(loss_terms)

    def step(params, opt_state, rest, x, y, key, count=None):
        def objective(p):
            loss, parts = total_loss(terms, struct, p, rest, x, y, key, step=count)
            # The clean logits for the accuracy; XLA merges this forward pass with the
            # cross-entropy term's identical one.
            logits, new_rest = struct.apply_with_state(p, rest, x)
            return loss, (parts, logits, new_rest)

        (loss, (parts, logits, new_rest)), grads = jax.value_and_grad(
            objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        pred = jnp.argmax(logits.reshape(logits.shape[0], -1), axis=-1)
        metrics = {
            "loss": loss,
            **parts,
            "correct": jnp.sum(pred == y),
            "grad_norm": optax.tree.norm(grads),
        }
        return params, opt_state, new_rest, metrics

    return step


@functools.lru_cache(maxsize=8)
def make_eval_fn(struct: Structure) -> Callable:
    """Jitted ``(params, rest, x, y) -> (sum of cross-entropy, number correct)`` on a batch.

    Cached per structure (the 8 most recent), so repeated evaluations compile once.

    Args:
      struct: the model structure (:attr:`jaxsens.sites.PureModel.structure`).

    Returns:
      The jitted ``evaluate(params, rest, x, y)``: with ``x`` inputs
      ``(batch, *input_shape)`` and ``y`` integer labels ``(batch,)``, the scalar
      Σ_b CE(F(x_b), y_b) of the softmax cross-entropy of the clean logits and the number
      of examples whose argmax prediction equals the label.
    """

    @jax.jit
    def evaluate(params, rest, x, y):
        logits = struct.apply(params, rest, x)
        logits = logits.reshape(logits.shape[0], -1)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(ce), jnp.sum(jnp.argmax(logits, axis=-1) == y)

    return evaluate


def _evaluate(evaluate, params, rest, test: Callable, n: int, batch_size: int
              ) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    ce, correct = 0.0, 0
    for start in range(0, n, batch_size):
        c, k = evaluate(params, rest, *test(start, min(n, start + batch_size)))
        ce += float(c)
        correct += int(k)
    return ce / n, correct / n


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


def _host_data(struct: Structure, x: np.ndarray, y: np.ndarray, dtype, part: str):
    """:func:`_device_data` kept on the host (NumPy), for feeding a mesh."""
    want = struct.input_shape
    if x.shape[0] and math.prod(x.shape[1:]) != math.prod(want):
        raise ValueError(
            f"x_{part} has per-example shape {tuple(x.shape[1:])} but the model takes {want}"
        )
    x = np.asarray(x).reshape(x.shape[0], *want)
    return x.astype(np.dtype(dtype)), np.asarray(y).astype(np.int32)


def _diverged(epoch: int, step: int, loss: float, grad_norm: float, directory) -> TrainingDiverged:
    what = (f"loss = {loss}" if not math.isfinite(loss)
            else f"gradient norm = {grad_norm} (loss = {loss})")
    where = f"; the last good checkpoint stays in {directory}" if directory else ""
    return TrainingDiverged(
        f"training diverged at epoch {epoch}, step {step}: {what}; try a lower learning rate "
        f"(or gradient clipping){where}"
    )


def _jitted_step(step: Callable, mesh: Mesh | None = None) -> Callable:
    """Jit ``step``: on one device with the minibatch gathered on device from the full
    arrays by index; on a mesh with the minibatch given (split over the mesh) and every
    output replicated."""
    if mesh is not None:
        return jax.jit(step, donate_argnums=(0, 1), out_shardings=devices_lib.replicated(mesh))

    def gathered(params, opt_state, rest, x_all, y_all, idx, key, count):
        return step(params, opt_state, rest, x_all[idx], y_all[idx], key, count)

    return jax.jit(gathered, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def _cached_step(struct: Structure, optimizer, terms, mesh: Mesh | None) -> Callable:
    return _jitted_step(make_train_step(struct, optimizer, terms), mesh)


def _step_for(struct: Structure, optimizer, terms, mesh: Mesh | None = None) -> Callable:
    """The jitted step, shared by calls with the same structure, optimizer, terms and mesh.

    Repeated runs (resuming, seeds, sweeps over data) then compile once. Terms holding
    arrays (unhashable) get a fresh jitted step.
    """
    try:
        hash((struct, optimizer, terms))
    except TypeError:
        return _jitted_step(make_train_step(struct, optimizer, terms), mesh)
    return _cached_step(struct, optimizer, terms, mesh)


class _Feed(NamedTuple):
    """Where the batches come from: ``step(params, opt_state, rest, rows, key, count)`` and
    ``test(start, stop) -> (x, y)``."""

    step: Callable
    test: Callable


def _device_feed(struct: Structure, data: data_lib.Dataset, dtype, step_fn) -> _Feed:
    """One device: the whole data on the device, each minibatch gathered there."""
    x_train, y_train = _device_data(struct, data.x_train, data.y_train, dtype, "train")
    x_test, y_test = _device_data(struct, data.x_test, data.y_test, dtype, "test")

    def step(params, opt_state, rest, rows, key, count):
        return step_fn(params, opt_state, rest, x_train, y_train, jnp.asarray(rows), key,
                       count)

    return _Feed(step, lambda a, b: (x_test[a:b], y_test[a:b]))


def _mesh_feed(struct: Structure, data: data_lib.Dataset, dtype, step_fn, mesh: Mesh) -> _Feed:
    """A mesh: each process puts the rows of each batch its own devices hold on them."""
    x_train, y_train = _host_data(struct, data.x_train, data.y_train, dtype, "train")
    x_test, y_test = _host_data(struct, data.x_test, data.y_test, dtype, "test")

    def rows_of(x, y, rows):
        # A batch that does not divide over the mesh (the last one) is replicated.
        sharding = devices_lib.batch_sharding(mesh, len(rows))
        return devices_lib.host_rows(sharding, x, rows), devices_lib.host_rows(sharding, y, rows)

    def step(params, opt_state, rest, rows, key, count):
        return step_fn(params, opt_state, rest, *rows_of(x_train, y_train, rows), key, count)

    return _Feed(step, lambda a, b: rows_of(x_test, y_test, np.arange(a, b)))


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
    mesh: Mesh | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` with ``optimizer`` on a weighted sum of loss terms.

    One jitted step (parameters and optimizer state donated) per minibatch; the test set is
    evaluated after every epoch. Epoch ``e`` draws its data order and its step keys from
    ``fold_in(key, e)`` only, so results depend on nothing but the arguments, and a run
    resumed from a checkpoint is bitwise identical to an uninterrupted one.

    With a ``mesh`` training is data-parallel: every batch is split over all the mesh's
    axes and the parameters, optimizer state and model state are replicated. XLA's
    partitioner turns every batch mean of the loss terms (the robustness terms are
    per-example too) into a sum across devices, so the metrics equal one device's up to
    the order of summation; a batch that does not divide over the mesh (the last one) runs
    replicated. In a multi-process run (:func:`jax.distributed.initialize`) every process
    calls ``train`` alike and puts only the rows of each batch its own devices hold on
    them; checkpoints are written and read by all processes together (orbax), and a
    checkpoint restores on any number of devices.

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
      mesh: train data-parallel over this :class:`jax.sharding.Mesh` (see above);
        ``None`` or a one-device mesh trains on one device as always.

    Returns:
      :class:`TrainResult` ``(model, history)`` (with a mesh, the model's arrays are
      replicated over it). Each history entry has ``epoch`` (1-based),
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
    terms = normalize_terms([(1.0, CrossEntropy())] if loss_terms is None else loss_terms)
    names = term_names(terms)
    epochs = positive_int("epochs", epochs, 0)
    batch_size = positive_int("batch_size", batch_size)
    checkpoint_every = positive_int("checkpoint_every", checkpoint_every)
    eval_batch_size = positive_int("eval_batch_size", eval_batch_size)
    key = _prepare_key(key)
    if not isinstance(data, data_lib.Dataset):
        raise ValueError(f"data must be a jaxsens.data.Dataset, got {type(data).__name__}")
    if isinstance(model, PureModel) or not isinstance(model, nnx.Module):
        raise ValueError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    example = None if hasattr(model, "input_shape") else jnp.asarray(data.x_train[:1])
    # Train the module as it is (batch statistics, dropout); evaluate it in inference mode.
    pm = split(model, example, inference=False)
    struct, rest = pm.structure, pm.rest
    eval_struct = inference_structure(model, example)
    for _, term in terms:
        term.check(struct)
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    # A mesh of one device is one device: the same program and numbers as without a mesh.
    mesh = None if mesh is None or mesh.size == 1 else devices_lib.auto_axes(mesh)
    # Fresh buffers: the step donates params / opt_state, which must not be the module's own.
    params = jax.tree.map(jnp.array, pm.params)
    opt_state = optimizer.init(params)
    if mesh is not None:  # one copy per device, every process's (restored into the same)
        params, opt_state, rest = devices_lib.replicate((params, opt_state, rest), mesh)
    dtype = _float_dtype(params)
    step_fn = _step_for(struct, optimizer, terms, mesh)
    feed = (_device_feed(struct, data, dtype, step_fn) if mesh is None
            else _mesh_feed(struct, data, dtype, step_fn, mesh))
    n_train, n_test = data.x_train.shape[0], data.x_test.shape[0]
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
        res = _restore_latest(mgr, directory, params, opt_state, rest, max_epoch=epochs,
                              signature=signature)
        if res is not None:
            params, opt_state, rest, meta = res
            start = int(meta["epoch"])
            history = list(meta["history"])

    # Fresh and restored state alike committed to their device: one jit cache entry for both.
    params, opt_state = jax.tree.map(lambda a: jax.device_put(a, a.sharding),
                                     (params, opt_state))
    evaluate = make_eval_fn(eval_struct)
    index = np.arange(n_train)

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
                params, opt_state, rest, m = feed.step(
                    params, opt_state, rest, idx, jax.random.fold_in(step_root, s),
                    np.int32(epoch * steps_per_epoch + s))
                # Check the previous step while this one runs (keeps the device busy).
                if pending is not None:
                    acc.add(*pending)
                pending = (s, len(idx), m)
            assert pending is not None  # at least one step per epoch
            acc.add(*pending)
            sums, seen = acc.sums, acc.seen
            t_train = time.perf_counter() - t0
            if not bool(_all_finite(params)):
                raise _diverged(epoch + 1, steps_per_epoch - 1, float("nan"), float("nan"),
                                directory)
            test_loss, test_acc = _evaluate(evaluate, params, rest, feed.test, n_test,
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
                        "opt_state_spec": _spec(opt_state),
                        "state_spec": _spec(rest) if jax.tree.leaves(rest) else None}
                _save(mgr, epoch + 1, params, opt_state, meta, rest)
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
