"""Argument checks and safe numerics that every layer shares (one home each)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["positive_int", "safe_norm"]


def positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an ``int`` of at least ``minimum``; a one-line ValueError otherwise.

    Args:
      name: how the error names the argument.
      value: the value given (``bool`` is refused although it is an ``int``).
      minimum: the smallest allowed value.

    Returns:
      ``int(value)``.

    Raises:
      ValueError: not an integer, a bool, or below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def safe_norm(v: jax.Array, axis=None) -> jax.Array:
    """‖v‖₂ (over ``axis``, default all) with a finite, zero gradient at v = 0.

    The plain ``sqrt(sum(v²))`` has an infinite derivative at 0 (e.g. a dead ReLU layer);
    taking the root of a placeholder where the sum is 0 keeps gradients finite.

    Args:
      v: an array.
      axis: the axes to reduce (default: all).

    Returns:
      The norm(s).
    """
    sq = jnp.sum(jnp.square(v), axis=axis)
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)
