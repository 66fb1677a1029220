"""``sensitivity_map``: pixel-level noise-sensitivity maps from the analytic moments.

Each map entry is tr Cov F when Gaussian noise of standard deviation σ enters only that
pixel (or block), from the exact moments of the two-stage linearized network (Bibi et
al. 2018).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib.figure import Figure
from pydantic import Field

from ..moments import sensitivity_map
from ..plotting import as_picture, sensitivity_map_figure
from ..sites import PureModel
from ._base import (
    AnalysisKind,
    Context,
    WithLevels,
    WithMoments,
    check_moments_model,
    summary_row,
)
from ._report import num, plain_formatter, save_figure

__all__ = ["SensitivityMap", "KIND"]


class SensitivityMap(WithLevels, WithMoments):
    """Noise-sensitivity maps.

    Attributes:
      levels: noise standard deviations σ per coordinate.
      region: block size of the regions (1: single pixels).
      moments_method: the analytic moments' method.
      split_at: the two-stage split site.
    """

    kind: Literal["sensitivity_map"]
    region: int = Field(1, ge=1)

    def validate_model(self, where: str, model: PureModel) -> None:
        check_moments_model(where, model, self.moments_method, self.split_at)


def run(cfg: SensitivityMap, ctx: Context) -> list[dict]:
    assert cfg.levels is not None
    x = ctx.x
    rows = []
    for sigma in cfg.levels:
        for b in range(x.shape[0]):
            try:
                smap = sensitivity_map(ctx.model, x[b], sigma=sigma, region=cfg.region,
                                       method=cfg.moments_method, split_at=cfg.split_at,
                                       image_shape=tuple(x.shape[1:]) if x.ndim >= 3 else None)
            except ValueError as err:
                raise ctx.error(err) from None
            flat = np.sort(np.asarray(smap, dtype=np.float64).reshape(-1))[::-1]
            top = max(1, len(flat) // 10)
            rows.append({"analysis": cfg.label, "estimator": "sensitivity_map", "site": "input",
                         "level": float(sigma), "example": b, "map_shape": list(smap.shape),
                         "total": float(flat.sum()), "top10_fraction": float(
                             flat[:top].sum() / flat.sum()) if flat.sum() > 0 else None,
                         "map": np.asarray(smap, dtype=np.float64).reshape(-1).tolist(),
                         "input_shape": list(x.shape[1:]),
                         "image": np.asarray(x[b], dtype=np.float64).reshape(-1).tolist()})
    return rows


_SHOWN = 8  # examples drawn per noise level


def figures(run_dir: Path, analysis: dict) -> list[str]:
    """The maps over their images, one row block per σ with one colour scale (and one
    colorbar) for all its maps, so that colours compare across examples."""
    recs = analysis["records"]
    if not recs:
        return []
    levels = sorted({r["level"] for r in recs})
    groups = [[r for r in recs if r["level"] == lv][:_SHOWN] for lv in levels]
    cols = min(4, max(len(g) for g in groups))
    rows = [-(-len(g) // cols) for g in groups]
    fig = Figure(figsize=(2.3 * cols + 1.3, 2.25 * sum(rows) + 0.7), layout="constrained")
    grid = fig.add_gridspec(sum(rows), cols)
    region = np.prod(recs[0]["map_shape"]) != np.prod(recs[0]["input_shape"])
    where = "one block" if region else "one pixel"
    top = 0
    for lv, group, nrow in zip(levels, groups, rows, strict=True):
        vmax = max(max(r["map"]) for r in group) or 1.0
        axes = []
        for i, r in enumerate(group):
            ax = fig.add_subplot(grid[top + i // cols, i % cols])
            smap = as_picture(np.asarray(r["map"]).reshape(r["map_shape"]))
            image = as_picture(np.asarray(r["image"]).reshape(r["input_shape"]))
            sensitivity_map_figure(smap, ax, image=image if image.ndim == 2 else None,
                                   title=f"example {r['example']}, σ={lv:g}", vmax=vmax,
                                   colorbar=False)
            ax.title.set_fontsize(9)
            axes.append(ax)
        bar = fig.colorbar(axes[-1].images[-1], ax=axes, shrink=0.9, format=plain_formatter())
        bar.set_label(f"tr Cov F (σ={lv:g},\nnoise on {where} only)", fontsize=8)
        bar.ax.tick_params(labelsize=8)
        top += nrow
    total = len([r for r in recs if r["level"] == levels[0]])
    more = f" (first {_SHOWN} of {total})" if total > _SHOWN else ""
    fig.suptitle(f"{analysis['name']}: output variance from Gaussian noise on {where} at a "
                 f"time{more}", fontsize=10)
    return [save_figure(run_dir, f"{analysis['name']}_maps.png", fig)]


def markdown(analysis: dict, figs: list[str]) -> str:
    lines = [f"## {analysis['name']} (pixel-level noise-sensitivity maps)", "",
             "Each map entry is tr Cov F when Gaussian noise of standard deviation σ enters only "
             "that pixel (or block), from the exact moments of the two-stage linearized network "
             "(Bibi et al. 2018). The top-10% column says how concentrated the sensitivity is.",
             "", "| example | σ | total variance | share of the top 10% of pixels |",
             "|---|---|---|---|"]
    for r in analysis["records"]:
        lines.append(f"| {r['example']} | {r['level']:g} | {num(r['total'])} | "
                     f"{num(r.get('top10_fraction'), '{:.2f}')} |")
    lines += ["", *[f"![{f}](figures/{f})" for f in figs], ""]
    return "\n".join(lines)


def summary(analysis: dict) -> list[str]:
    return [summary_row(analysis["name"], f"example {r['example']}", f"{r['level']:g}",
                        num(r["total"]), num(r.get("top10_fraction"), "{:.2f}"))
            for r in analysis["records"]]


KIND = AnalysisKind(SensitivityMap, run, figures, markdown, summary,
                    ("example", "σ", "total var", "top-10%"))
