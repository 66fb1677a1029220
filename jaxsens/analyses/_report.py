"""Small helpers the kinds' tables and figures share: table cells, record lookups, and the
figure conventions (labels that name the noise, level ticks, legends outside the data,
per-site colours and markers, binomial intervals)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..io import atomic_write_bytes
from ..plotting import figure_png

__all__ = ["num", "by_site_level", "sites_in_order", "save_figure", "SITE_STYLES",
           "site_style", "level_symbol", "noise_label", "set_level_ticks", "short_number",
           "plain_formatter", "set_log_ticks", "binomial_halfwidth", "wrap_name",
           "set_name_ticks"]

# Distinct colour and marker per site (colour-blind-safe order of the tab10 cycle).
_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
           "#882255")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
SITE_STYLES = tuple(zip(_COLORS, _MARKERS, strict=True))
"""``(colour, marker)`` per site index (cycled)."""


def num(v, fmt: str = "{:.4g}") -> str:
    """A number for a table; an en dash for a missing or non-finite one."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


def by_site_level(records) -> dict:
    """``{(site, level): {estimator: record}}``."""
    table: dict = {}
    for r in records:
        table.setdefault((r["site"], r["level"]), {})[r["estimator"]] = r
    return table


def sites_in_order(records) -> list[str]:
    """The sites of ``records`` in the order they first appear."""
    seen: list[str] = []
    for r in records:
        if r["site"] not in seen:
            seen.append(r["site"])
    return seen


def save_figure(run_dir: Path, file_name: str, fig) -> str:
    """Write ``fig`` as ``figures/<file_name>`` atomically; return the file name."""
    path = run_dir / "figures" / file_name
    atomic_write_bytes(path, figure_png(fig))
    return path.name


def site_style(i: int) -> tuple[str, str]:
    """``(colour, marker)`` of the ``i``-th site."""
    return SITE_STYLES[i % len(SITE_STYLES)]


def level_symbol(law: str) -> str:
    """``"σ"`` for absolute Gaussian noise (a standard deviation), else ``"ε"``."""
    return "σ" if "σ=" in law or law.startswith("absolute") else "ε"


def noise_label(kind: str, law: str) -> str:
    """What the noise level means, for an axis label.

    Args:
      kind: the site kind: ``"activation"``, ``"weight"`` or ``"input"``.
      law: a record's law description (``"relative-norm(sphere) ε=0.05"``) or its name.

    Returns:
      E.g. ``"activation noise ε (‖η‖ = ε‖h‖)"`` or ``"input noise σ (η ~ N(0, σ²I))"``.
    """
    v = {"activation": "h", "input": "x", "weight": "W"}.get(kind, "v")
    if law.startswith("relative-norm(sphere)"):
        how = f"‖η‖ = ε‖{v}‖"
    elif law.startswith("relative-norm"):
        how = f"E‖η‖² = ε²‖{v}‖²"
    elif law.startswith("weight-relative"):
        norm = law[len("weight-relative("):].split(")")[0]
        sub = {"frobenius": "F", "spectral": "2", "linf": "∞"}.get(norm, norm)
        how = f"‖ΔW‖_{sub} = ε‖W‖_{sub}"
    elif law.startswith("absolute"):
        how = "η ~ N(0, σ²I), absolute"
    elif law.startswith("multiplicative"):
        how = f"η = ε·{v}⊙g"
    else:
        how = law.rsplit(" ", 1)[0]
    return f"{kind} noise {level_symbol(law)} ({how})"


def wrap_name(name: str, width: int = 22) -> str:
    """A long site name broken into lines of about ``width`` characters after ``/``.

    Args:
      name: e.g. ``"block0/dense_layer/layers/0/kernel"``.
      width: the longest line wanted (a single longer part stays whole).

    Returns:
      The name with newlines inserted after ``/`` separators.
    """
    lines: list[str] = []
    line = ""
    for part in name.split("/"):
        piece = part if not line else "/" + part
        if line and len(line) + len(piece) > width:
            lines.append(line + "/")
            line = part
        else:
            line += piece
    return "\n".join([*lines, line])


def set_name_ticks(ax, positions: Sequence[float] | np.ndarray, names: Sequence[str],
                   width_in: float, *, fontsize: float = 8) -> None:
    """Category names as x tick labels: horizontal when each fits its share of the axes
    width, else upright (rotated 90°, so that their boxes cannot collide).

    Args:
      ax: a matplotlib ``Axes``.
      positions: the tick positions.
      names: their labels.
      width_in: the axes' width in inches (an estimate is enough).
      fontsize: the labels' font size in points.
    """
    per_char = 0.62 * fontsize / 72  # inches per character of DejaVu Sans, roughly
    longest = max((len(n) for n in names), default=0)
    upright = longest * per_char > 0.85 * width_in / max(1, len(names))
    ax.set_xticks(list(positions), list(names), rotation=90 if upright else 0,
                  fontsize=fontsize)


def short_number(v: float) -> str:
    """A tick label: ``0.05``, ``2``, ``1e-04``, ``3e+03`` (at most 5 characters)."""
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e4:
        return f"{v:.3g}"
    return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")


def set_level_ticks(ax, levels: Sequence[float], *, min_gap: float = 0.14) -> None:
    """Noise levels on the x axis: log scale when all are positive, a tick at each level
    labelled plainly, no minor labels; labels closer than ``min_gap`` of the axis span
    (in log units) to the previous labelled one are left unlabelled so they never collide.

    Args:
      ax: a matplotlib ``Axes``.
      levels: the levels plotted.
      min_gap: the smallest gap between labelled ticks, as a fraction of the span.
    """
    lv = sorted({float(v) for v in levels})
    log = bool(lv) and lv[0] > 0
    if log:
        ax.set_xscale("log")
    pos = np.log10(lv) if log else np.asarray(lv, np.float64)
    span = float(pos[-1] - pos[0]) if len(lv) > 1 else 1.0
    labels, last = [], None
    for p, v in zip(pos, lv, strict=True):
        if last is None or p - last >= min_gap * span:
            labels.append(short_number(v))
            last = p
        else:
            labels.append("")
    ax.set_xticks(lv, labels)
    ax.xaxis.set_minor_formatter(NullFormatter())
    if log and len(lv) > 1:
        ax.set_xlim(lv[0] / 10 ** (0.06 * span), lv[-1] * 10 ** (0.06 * span))


def plain_formatter() -> FuncFormatter:
    """A tick formatter without offsets or superscripts (``0.05``, ``2``, ``1e-04``), for log
    axes and colorbars (an offset text such as ``1e−3`` above a colorbar collides with
    titles).

    Returns:
      A ``FuncFormatter`` using :func:`short_number`.
    """
    return FuncFormatter(lambda v, _pos: short_number(v))


def set_log_ticks(ax, which: str = "y") -> None:
    """Readable ticks on a log axis, after its data are drawn: plain labels (``0.05``,
    ``2``, ``1e-04``) at 1, 1.5, 2, 3, 5 and 7 per decade within one decade, at 1, 2 and 5
    on short spans, at powers of ten on long ones, and no minor labels (matplotlib's
    minor labels collide on short spans).

    Args:
      ax: a matplotlib ``Axes`` whose ``which`` axis is (or is made) logarithmic.
      which: ``"x"`` or ``"y"``.
    """
    axis = ax.yaxis if which == "y" else ax.xaxis
    if which == "y":
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
    else:
        ax.set_xscale("log")
        lo, hi = ax.get_xlim()
    span = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    subs = ((1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if span <= 1.0 else
            (1.0, 2.0, 5.0) if span <= 2.2 else (1.0,))
    axis.set_major_locator(LogLocator(10.0, subs=subs, numticks=12))
    axis.set_major_formatter(plain_formatter())
    axis.set_minor_formatter(NullFormatter())


def binomial_halfwidth(p: float, n: int) -> float:
    """Half-width of the normal-approximation 95% interval of an accuracy.

    Args:
      p: the observed accuracy.
      n: the number of examples it was measured on.

    Returns:
      1.96·√(p(1−p)/n) (0 for ``n`` < 1).
    """
    if n < 1:
        return 0.0
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n)
