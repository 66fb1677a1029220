"""``weight_norms``: the norms of every weight matrix, and the Lipschitz product they give.

The smallest experiment kind, and the template for a new one: a config class, ``run``,
``figures``, ``markdown`` and ``summary`` in one file, plus one line in
``jaxsens/analyses/__init__.py``. Per kernel: the Frobenius norm, a certified upper bound
on the spectral norm (Gram iteration) and the ℓ∞-operator norm (max row ℓ1 sum, the norm
of the weight-perturbation margin theory, Tsai et al. 2021).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib.figure import Figure

from ..linalg import spectral_norm_bound
from ..noise import linf_operator_norm
from ..sites import split
from ._base import AnalysisConfig, AnalysisKind, Context, summary_row
from ._report import num, save_figure, set_log_ticks, set_name_ticks, site_style

__all__ = ["WeightNorms", "KIND"]

_NORMS = (("frobenius", "Frobenius ‖W‖_F"), ("spectral", "spectral ‖W‖₂ (certified bound)"),
          ("linf_operator", "ℓ∞-operator ‖W‖_∞"))


class WeightNorms(AnalysisConfig):
    """Norms of the weight matrices (every parameter with at least two axes)."""

    kind: Literal["weight_norms"]


def run(cfg: WeightNorms, ctx: Context) -> list[dict]:
    pm = split(ctx.model, ctx.x)
    rows = []
    for path in pm.weight_sites:
        info = pm.site(path)
        if len(info.shape) < 2:
            continue
        w = pm.param(path)
        rows.append({
            "analysis": cfg.label, "estimator": "weight_norms", "site": path, "level": 0.0,
            "shape": list(info.shape),
            "frobenius": float(np.linalg.norm(np.asarray(w, np.float64))),
            "spectral": float(spectral_norm_bound(w)),
            "linf_operator": float(linf_operator_norm(w)),
        })
    return rows


def figures(run_dir: Path, analysis: dict) -> list[str]:
    """The three norms per weight matrix, bars side by side on a log axis."""
    recs = analysis["records"]
    if not recs:
        return []
    fig = Figure(figsize=(max(6.4, 1.1 * len(recs) + 2.0), 4.2), layout="constrained")
    ax = fig.add_subplot()
    pos = np.arange(len(recs))
    for i, (key, label) in enumerate(_NORMS):
        ax.bar(pos + (i - 1) * 0.27, [r[key] for r in recs], width=0.27, label=label,
               color=site_style(i)[0])
    names = [r["site"] for r in recs]
    set_name_ticks(ax, pos, names, fig.get_figwidth() - 1.0)
    set_log_ticks(ax, "y")
    ax.set_ylabel("norm of the weight matrix", fontsize=9)
    ax.set_title(f"{analysis['name']}: weight norms per layer", fontsize=10)
    ax.grid(alpha=0.3, axis="y", which="major")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8,
               frameon=False)
    return [save_figure(run_dir, f"{analysis['name']}_norms.png", fig)]


def markdown(analysis: dict, figs: list[str]) -> str:
    recs = analysis["records"]
    product = math.prod(r["spectral"] for r in recs) if recs else float("nan")
    lines = [f"## {analysis['name']} (weight norms)", "",
             "Per weight matrix: the Frobenius norm, a certified upper bound on the spectral "
             "norm (Gram iteration: never below the exact value) and the ℓ∞-operator norm. "
             f"The product of the spectral bounds, {num(product)}, bounds the network's "
             "Lipschitz constant for 1-Lipschitz activations.", "",
             "| weight | shape | " + " | ".join(lab for _, lab in _NORMS) + " |",
             "|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {r['site']} | {'×'.join(map(str, r['shape']))} | "
                     + " | ".join(num(r[k]) for k, _ in _NORMS) + " |")
    lines += ["", *[f"![{f}](figures/{f})" for f in figs], ""]
    return "\n".join(lines)


def summary(analysis: dict) -> list[str]:
    return [summary_row(analysis["name"], r["site"], "", num(r["frobenius"]),
                        num(r["spectral"]), num(r["linf_operator"]))
            for r in analysis["records"]]


KIND = AnalysisKind(WeightNorms, run, figures, markdown, summary,
                    ("weight", "", "‖W‖_F", "‖W‖₂ ≤", "‖W‖_∞"))
