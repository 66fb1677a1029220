"""Layer chains and parameter paths: the bottom layer that bounds and moments trust.

A *layer chain* describes a network as the ordered steps between its sites — linear maps
(dense or convolution), elementwise activations with their Lipschitz constants, and
parameter-free pooling — so that certified bounds and layerwise moments can walk it. The
built-in models give one (``layer_chain()``); ``tests/test_chain.py`` checks every built-in
chain against the model's own forward pass.

A parameter *path* is a tuple of keys into the model's parameter state
(``("layers", 0, "kernel")``); its name is the keys joined with ``/``
(``"layers/0/kernel"``), which is how sites are named. :func:`param` is the one accessor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax

__all__ = [
    "Path",
    "parse_path",
    "path_name",
    "param",
    "SiteStep",
    "LinearStep",
    "ActivationStep",
    "PoolStep",
    "ChainStep",
]

Path = tuple[str | int, ...]


def parse_path(name: str | Path) -> Path:
    """``"layers/0/kernel"`` → ``("layers", 0, "kernel")`` (a tuple is returned as is).

    Args:
      name: a ``/``-joined parameter name, or a path tuple.

    Returns:
      The path: the name split at ``/``, parts made of decimal digits as ``int`` (list
      indices), the others as ``str``; the inverse of :func:`path_name`.
    """
    if isinstance(name, tuple):
        return name
    return tuple(int(p) if p.isdigit() else p for p in name.split("/"))


def path_name(path: str | tuple[Any, ...]) -> str:
    """``("layers", 0, "kernel")`` → ``"layers/0/kernel"``.

    Args:
      path: a path tuple of keys, or a name (returned as is).

    Returns:
      The keys as strings joined with ``/``: the site name of the parameter.
    """
    if isinstance(path, str):
        return path
    return "/".join(str(p) for p in path)


def param(params: Any, path: str | Path) -> jax.Array:
    """The array at ``path`` in a parameter state (``nnx.State`` or nested mappings).

    Args:
      params: the parameter state: an ``nnx.State`` or nested mappings / sequences.
      path: a path tuple or its ``/``-joined name (see :func:`parse_path`).

    Returns:
      The value at ``path``, unwrapped from its ``nnx.Variable`` if it is one (the
      parameter's own shape, e.g. ``(in, out)`` for a dense kernel).

    Raises:
      KeyError: ``params`` has no entry at some key of ``path``.
    """
    node = params
    for key in parse_path(path):
        node = node[key]
    return node.get_value() if hasattr(node, "get_value") else node


@dataclasses.dataclass(frozen=True)
class SiteStep:
    """An activation site (or ``"input"``) in the layer chain."""

    name: str


@dataclasses.dataclass(frozen=True)
class LinearStep:
    """A linear map ``x @ kernel (+ bias)`` or a stride-1 'SAME' convolution.

    Attributes:
      kernel: path of the kernel (a tuple, or its ``/``-joined name).
      bias: path of the bias or ``None``.
      kind: ``"dense"`` (kernel ``(in, out)``) or ``"conv"`` (kernel ``(kh, kw, in, out)``).
    """

    kernel: Path
    bias: Path | None
    kind: Literal["dense", "conv"] = "dense"

    def __post_init__(self):
        object.__setattr__(self, "kernel", parse_path(self.kernel))
        if self.bias is not None:
            object.__setattr__(self, "bias", parse_path(self.bias))
        if self.kind not in ("dense", "conv"):
            raise ValueError(f"LinearStep kind must be 'dense' or 'conv', got {self.kind!r}")

    @property
    def kernel_name(self) -> str:
        return path_name(self.kernel)

    @property
    def bias_name(self) -> str | None:
        return None if self.bias is None else path_name(self.bias)


@dataclasses.dataclass(frozen=True)
class ActivationStep:
    """An elementwise activation with a Lipschitz constant (an upper bound on |σ'|)."""

    name: str
    lipschitz: float


@dataclasses.dataclass(frozen=True)
class PoolStep:
    """A parameter-free pooling or reshaping step with its ℓ2 Lipschitz constant."""

    name: str
    lipschitz: float


ChainStep = SiteStep | LinearStep | ActivationStep | PoolStep
