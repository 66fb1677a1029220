"""Optax optimizers and learning-rate schedules by name (for configs).

:func:`make_optimizer` builds any allow-listed Optax optimizer with a learning-rate schedule
and optional gradient clipping by name (for configs).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import optax

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "make_optimizer",
    "make_schedule",
]


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
      name: a key of :data:`SCHEDULES`, or ``None`` for ``"constant"``.
      learning_rate: the peak / initial learning rate.
      total_steps: total optimizer steps (needed by decaying schedules).
      **kwargs: the schedule's own options (e.g. ``warmup_steps``, ``decay_rate``).

    Returns:
      An ``optax.Schedule``: a function of the step count giving the learning rate.

    Raises:
      ValueError: unknown schedule or options (message lists the valid ones), or a
        schedule that needs ``total_steps`` (``cosine_decay``, ``warmup_cosine_decay``,
        ``linear``, ``warmup_linear``, ``polynomial``, ``one_cycle``) without
        ``total_steps >= 1``.
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
