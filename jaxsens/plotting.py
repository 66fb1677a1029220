"""Figures: the one place for figures that the library and the report share.

Plotting needs matplotlib, which stays optional at import: every function here imports it
when called, so ``import jaxsens`` (which re-exports :func:`sensitivity_map_figure` from
:mod:`jaxsens.moments`) does not import matplotlib. Only numpy and matplotlib are used
here, never the rest of :mod:`jaxsens`, so any module may import this one.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from jaxtyping import ArrayLike, Float

__all__ = ["sensitivity_map_figure", "as_picture", "figure_png"]


def _as_picture(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim == 1:
        side = math.isqrt(a.size)
        a = a.reshape(side, side) if side * side == a.size else a[None, :]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return a


def sensitivity_map_figure(
    smap: Float[ArrayLike, "*map_shape"],
    path_or_ax: str | os.PathLike | Any,
    image: Float[ArrayLike, "*input_shape"] | None = None,
    *,
    title: str | None = None,
    cmap: str = "inferno",
    alpha: float = 0.65,
    vmax: float | None = None,
    colorbar: bool = True,
):
    """Draw a :func:`~jaxsens.moments.sensitivity_map`, optionally over the image it was
    computed for.

    Channels of an ``(H, W, C)`` map are summed; a flat map whose size is a square is
    shown square. Block maps (``region > 1``) are stretched over the image. Uses
    matplotlib's object API (no pyplot, no global backend switch).

    Args:
      smap: the map.
      path_or_ax: a file path (a new figure is saved there as PNG and closed) or a
        matplotlib ``Axes`` to draw on.
      image: the clean input, shown in gray underneath (same layout rules as the map).
      title: axes title.
      cmap: colormap of the map.
      alpha: opacity of the map when drawn over an image.
      vmax: the top of the colour scale (its bottom is 0); give the same value to maps
        drawn side by side so that one colour means one value in all of them (default:
        this map's maximum).
      colorbar: draw a colorbar beside the axes (``False`` when one colorbar serves
        several maps; the drawn map is ``ax.images[-1]``).

    Returns:
      The matplotlib ``Figure`` drawn on.
    """
    from matplotlib.figure import Figure

    arr = _as_picture(np.asarray(smap))
    if arr.ndim == 3:
        arr = arr.sum(-1)
    to_file = isinstance(path_or_ax, str | os.PathLike)
    fig: Any
    ax: Any
    if to_file:
        fig = Figure(figsize=(4.2, 3.6))
        ax = fig.add_subplot()
    else:
        ax = path_or_ax
        fig = ax.figure
    scale = {"vmin": 0.0, "vmax": vmax} if vmax is not None else {}
    if image is not None:
        img = _as_picture(np.asarray(image))
        h, w = img.shape[:2]
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)
        ax.imshow(img, cmap="gray", extent=extent, interpolation="nearest")
        shown = ax.imshow(arr, cmap=cmap, alpha=alpha, extent=extent, interpolation="nearest",
                          **scale)
    else:
        shown = ax.imshow(arr, cmap=cmap, interpolation="nearest", **scale)
    if colorbar:
        fig.colorbar(shown, ax=ax, label="tr Cov F (noise on this pixel only)")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    if to_file:
        fig.savefig(os.fspath(path_or_ax), format="png", dpi=110, bbox_inches="tight")
    return fig


def as_picture(a: Float[ArrayLike, "*shape"]) -> np.ndarray:
    """An array as a 2-D picture when it is one: channels of ``(H, W, C)`` summed, a flat
    array of square size made square; anything else unchanged (float64).

    Args:
      a: an array-like: a map or image ``(H, W, C)``, ``(H, W)`` or flat ``(H·W,)``.

    Returns:
      A float64 NumPy array: ``(H, W)`` for a 3-D input (summed over the last axis) or
      for a flat input of square size ``s²`` (``(s, s)``); otherwise ``a`` with its shape
      unchanged.
    """
    arr = np.asarray(a, np.float64)
    if arr.ndim == 3:
        arr = arr.sum(-1)
    if arr.ndim == 1:
        side = math.isqrt(arr.size)
        if side * side == arr.size:
            arr = arr.reshape(side, side)
    return arr


def figure_png(fig, *, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes (tight bounding box), for atomic writes.

    Args:
      fig: a matplotlib ``Figure``; it is not closed.
      dpi: resolution in dots per inch.

    Returns:
      The PNG file contents, e.g. for :func:`jaxsens.io.atomic_write_bytes`.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()
