"""Small helpers the kinds' tables and figures share."""

from __future__ import annotations

import math
from pathlib import Path

from ..io import atomic_write_bytes
from ..plotting import figure_png

__all__ = ["num", "by_site_level", "sites_in_order", "save_figure"]


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
