"""Parameter paths: how weight sites are named and found.

A parameter *path* is a tuple of keys into the model's parameter state
(``("layers", 0, "kernel")``); its name is the keys joined with ``/``
(``"layers/0/kernel"``), which is how sites are named. :func:`param` is the one accessor.
"""

from __future__ import annotations

from typing import Any

import jax

__all__ = [
    "Path",
    "parse_path",
    "path_name",
    "param",
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
