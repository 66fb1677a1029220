"""Private helpers shared by the uses of the moments (sensitivity maps, expected losses,
noise attacks): argument checks, sizes and the chunk budget of ``lax.map``.

Private to :mod:`jaxsens.moments`: other packages do not import it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ..sites import PureModel, Structure
from ._network import METHODS, split_sites

# Pairs of hidden units (times vmapped items) per chunk of relu_moments calls; about 12
# float64 intermediates per pair keeps a chunk near 100 MB.
_PAIRS_PER_CHUNK = 2**20


# --------------------------------------------------------------------------- helpers
def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a moments method; choose one of "
                         f"{list(METHODS)}")


def _concrete_float(name: str, value, *, positive: bool = True) -> None:
    """One-line ValueError for a concrete non-finite (or non-positive) scalar; traced values
    pass unchecked (the functions stay jit-able)."""
    try:
        v = float(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return
    except TypeError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")


def _float_input(pm: PureModel, x1) -> Array:
    x1 = jnp.asarray(x1)
    want = pm.input_shape
    if math.prod(x1.shape) != math.prod(want):
        raise ValueError(f"x1 must be one example of shape {want} (no batch axis), got shape "
                         f"{tuple(x1.shape)}")
    leaves = [a for a in jax.tree.leaves(pm.params) if jnp.issubdtype(a.dtype, jnp.floating)]
    dtype = jnp.result_type(*(a.dtype for a in leaves)) if leaves else jnp.float32
    if jnp.issubdtype(x1.dtype, jnp.floating):
        dtype = jnp.result_type(dtype, x1.dtype)
    return x1.reshape(want).astype(dtype)


def _num_outputs(struct: Structure) -> int:
    return math.prod(struct.output_shape)


def _hidden_width(struct: Structure, method: str, split_at: str | None) -> int:
    """Width of the widest hidden layer the moments are taken over (for chunk sizes)."""
    if method == "two_stage":
        sites = split_sites(PureModel(struct, None, None))
        if not sites:
            return 1
        name = sites[-1] if split_at is None or split_at not in sites else split_at
        return struct.site(name).size
    widths = [s.size for _, s in struct.sites if s.kind == "activation"]
    return max(widths + [1])


def _chunk(n: int, per_item: int, budget: int) -> int:
    return int(max(1, min(n, budget // max(per_item, 1))))
