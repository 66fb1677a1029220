"""The matmul-precision policy.

On recent NVIDIA GPUs (and TPUs) float32 matrix products run by default at reduced
internal precision (TF32: a 10-bit mantissa, relative error ~1e-3; bf16 passes on
TPUs). jaxsens separates two kinds of work:

* **Closed forms and certificates it computes itself** — the Gaussian moments
  (Bibi et al.), the covariance sandwiches J C Jᵀ, the E‖z‖ quadrature, layerwise
  moment propagation, Gram-iteration norm bounds — claim exactness (to the working
  dtype). They run under :func:`exact`, which sets the matmul precision to
  ``"highest"`` while they are traced, whatever the user's default.
* **The user's network** (its forward and backward passes inside every estimator)
  runs at the user's default: ``jax.default_matmul_precision`` or the
  ``JAX_DEFAULT_MATMUL_PRECISION`` environment variable. :func:`describe` names what
  was in use; results record it (``Deviation.precision``, ``results.json``).

To make a whole analysis exact on an accelerator, run it under
``jax.default_matmul_precision("highest")``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

import jax

__all__ = ["exact", "describe"]

P = ParamSpec("P")
R = TypeVar("R")


def exact(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with matmuls at ``"highest"`` precision (applied when it is traced).

    The precision of a matmul is fixed when the operation is traced, so wrapping the
    Python function is enough: inside ``jax.jit`` it holds for the compiled program.

    Args:
      fn: the function to run at full precision (usable as a decorator).

    Returns:
      A wrapper with ``fn``'s signature and metadata that calls ``fn`` inside
      ``jax.default_matmul_precision("highest")`` and returns its result.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapper


def describe() -> str:
    """The matmul precision in use for the user's network, e.g. ``"default (gpu)"``.

    ``"default"`` means the backend's own choice for float32: full precision on CPUs,
    TF32 on recent NVIDIA GPUs.

    Returns:
      ``"<precision> (<backend>)"``: the ``jax_default_matmul_precision`` setting (or
      ``"default"`` when unset) and ``jax.default_backend()``, e.g. ``"highest (gpu)"``.
    """
    value = cast(Any, jax.config).jax_default_matmul_precision  # (not in the stubs)
    return _describe(value, _backend())


@functools.cache
def _backend() -> str:
    # Fixed once JAX has initialised its backends; looking it up costs ~10 µs per result.
    return jax.default_backend()


@functools.lru_cache(maxsize=16)
def _describe(value, backend: str) -> str:
    return f"{value or 'default'} ({backend})"
