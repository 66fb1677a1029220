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

Layout: ``_optimizers`` (the optimizer and schedule registries), ``_checkpoints`` (orbax
save / restore) and ``_loop`` (the training loop and its evaluation); every public name is
re-exported here.
"""

from ._checkpoints import Checkpoint as Checkpoint
from ._checkpoints import latest_epoch as latest_epoch
from ._checkpoints import load_checkpoint as load_checkpoint
from ._loop import TIME_KEYS as TIME_KEYS
from ._loop import TrainingDiverged as TrainingDiverged
from ._loop import TrainResult as TrainResult
from ._loop import make_eval_fn as make_eval_fn
from ._loop import make_train_step as make_train_step
from ._loop import train as train
from ._optimizers import OPTIMIZERS as OPTIMIZERS
from ._optimizers import SCHEDULES as SCHEDULES
from ._optimizers import make_optimizer as make_optimizer
from ._optimizers import make_schedule as make_schedule

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
    "latest_epoch",
]
