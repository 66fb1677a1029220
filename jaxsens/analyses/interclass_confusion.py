"""``interclass_confusion``: which class overtakes which under Gaussian input noise.

Under input noise ``N(0, σ² I)`` the logits have analytic moments (Bibi et al. 2018); with
them, logit ``j`` overtakes the true logit ``y`` with probability
``Φ((μ_j − μ_y) / σ_{j−y})``. Averaged over the examples of each true class this predicts a
``k × k`` confusion (flip) matrix, compared here with the Monte Carlo matrix of the true
network (the fraction of noisy draws in which logit ``j`` exceeds logit ``y``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from pydantic import Field

from ..moments import confusion_matrix, sampled_confusion_matrix
from ..schema import ConfigError
from ..sites import PureModel
from ._base import AnalysisKind, Context, WithMoments, check_moments_model, summary_row
from ._report import num, save_figure

__all__ = ["InterclassConfusion", "KIND"]

_TOP = 10  # rows of the table of the largest confusions


class InterclassConfusion(WithMoments):
    """Predicted (analytic moments) vs Monte Carlo interclass confusion matrices.

    Attributes:
      sigma: input noise standard deviation σ (> 0); required.
      samples: Monte Carlo draws per example.
      moments_method: the analytic moments' method.
      split_at: the two-stage split site.
    """

    kind: Literal["interclass_confusion"]
    sigma: float | None = Field(None, gt=0, allow_inf_nan=False)
    samples: int = Field(1000, ge=2)

    def check(self, where: str) -> None:
        if self.sigma is None:
            raise ConfigError(f"config error at {where}.sigma: an interclass_confusion "
                              "analysis needs the input noise standard deviation sigma (> 0)")

    def validate_model(self, where: str, model: PureModel) -> None:
        check_moments_model(where, model, self.moments_method, self.split_at)


def _off_diagonal(a: np.ndarray) -> np.ndarray:
    """Boolean mask of the off-diagonal cells of finite rows."""
    mask = ~np.eye(a.shape[0], dtype=bool)
    return mask & np.isfinite(a)


def _as_matrix(rows) -> np.ndarray:
    """A saved matrix (lists, ``None`` for NaN) as a float array."""
    return np.array([[np.nan if v is None else v for v in row] for row in rows], np.float64)


def run(cfg: InterclassConfusion, ctx: Context) -> list[dict]:
    assert cfg.sigma is not None
    try:
        pred = confusion_matrix(ctx.model, ctx.x, ctx.y, sigma=cfg.sigma,
                                method=cfg.moments_method, split_at=cfg.split_at)
        mc = sampled_confusion_matrix(ctx.model, ctx.x, ctx.y, sigma=cfg.sigma, key=ctx.key,
                                      num_samples=cfg.samples)
    except ValueError as err:
        raise ctx.error(err) from None
    p = np.asarray(pred.matrix, np.float64)
    s = np.asarray(mc.matrix, np.float64)
    assert mc.stderr is not None
    se = np.asarray(mc.stderr, np.float64)
    cells = _off_diagonal(p) & _off_diagonal(s)
    diff = np.abs(p - s)[cells]
    return [{
        "analysis": cfg.label, "estimator": "interclass_confusion", "site": "input",
        "level": float(cfg.sigma), "method": cfg.moments_method,
        "num_classes": int(p.shape[0]), "num_samples": int(cfg.samples),
        "counts": [int(c) for c in np.asarray(pred.counts)],
        "predicted": p.tolist(), "sampled": s.tolist(), "sampled_stderr": se.tolist(),
        "max_abs_diff": float(diff.max()) if diff.size else None,
        "mean_abs_diff": float(diff.mean()) if diff.size else None,
    }]


def _largest(r: dict, top: int = _TOP) -> list[tuple[int, int, float, float, float]]:
    """The ``top`` off-diagonal cells with the largest confusion (predicted or sampled)."""
    p, s, se = (_as_matrix(r[key]) for key in ("predicted", "sampled", "sampled_stderr"))
    cells = _off_diagonal(p) & _off_diagonal(s)
    ii, jj = np.nonzero(cells)
    order = np.argsort(-np.maximum(p[ii, jj], s[ii, jj]), kind="stable")[:top]
    return [(int(ii[o]), int(jj[o]), float(p[ii[o], jj[o]]), float(s[ii[o], jj[o]]),
             float(se[ii[o], jj[o]])) for o in order]


def _ticks(ax, k: int) -> None:
    step = max(1, -(-k // 20))
    ticks = np.arange(0, k, step)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("overtaking class j")
    ax.set_ylabel("true class y")


def figures(run_dir: Path, analysis: dict) -> list[str]:
    made = []
    for n, r in enumerate(analysis["records"]):
        tag = "" if n == 0 else f"_{n}"
        p, s, se = (_as_matrix(r[key]) for key in ("predicted", "sampled", "sampled_stderr"))
        k = p.shape[0]
        both = np.concatenate([p[np.isfinite(p)], s[np.isfinite(s)]])
        vmax = float(both.max()) if both.size and both.max() > 0 else 1.0
        fig = Figure(figsize=(9.6, 4.4), layout="constrained")
        axes = fig.subplots(1, 2)
        cmap = colormaps["magma"].with_extremes(bad="0.8")  # grey: no examples, or y = j
        im = None
        for ax, mat, title in ((axes[0], p, f"predicted ({r['method']} moments)"),
                               (axes[1], s, f"Monte Carlo ({r['num_samples']} draws)")):
            shown = np.where(np.eye(k, dtype=bool), np.nan, mat)  # grey diagonal: y = j
            im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=0.0, vmax=vmax,
                           interpolation="nearest")
            _ticks(ax, k)
            ax.set_title(title)
        assert im is not None
        fig.colorbar(im, ax=list(axes), shrink=0.9, label="P(logit j > logit y)")
        fig.suptitle(f"{analysis['name']}: interclass confusion, σ={r['level']:g}")
        made.append(save_figure(run_dir, f"{analysis['name']}_matrices{tag}.png", fig))

        cells = _off_diagonal(p) & _off_diagonal(s)
        fig = Figure(figsize=(4.8, 4.4), layout="constrained")
        ax = fig.add_subplot()
        ax.errorbar(p[cells], s[cells], yerr=2 * se[cells], fmt="o", ms=4, alpha=0.8)
        hi = max(vmax, 1e-3)
        ax.plot([0, hi], [0, hi], "k--", lw=1, label="y = x")
        ax.set_xlabel("predicted (analytic moments)")
        ax.set_ylabel("Monte Carlo (±2 se)")
        ax.set_title(f"{analysis['name']}: off-diagonal cells, σ={r['level']:g}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        made.append(save_figure(run_dir, f"{analysis['name']}_scatter{tag}.png", fig))
    return made


def markdown(analysis: dict, figs: list[str]) -> str:
    lines = [f"## {analysis['name']} (interclass confusion under Gaussian input noise)", "",
             "Cell (y, j): the probability that logit j exceeds the true logit y under input "
             "noise N(0, σ² I), averaged over the examples of class y. Predicted: "
             "Φ((μ_j − μ_y)/σ_{j−y}) from the analytic output moments (Bibi et al. 2018); "
             "sampled: the fraction of Monte Carlo draws on the true network, ± its binomial "
             "standard error. These are pairwise probabilities: a row does not sum to the "
             "probability of a misclassification.", ""]
    for r in analysis["records"]:
        empty = [c for c, n in enumerate(r["counts"]) if n == 0]
        lines += [f"σ = {r['level']:g}, {r['method']} moments, {r['num_samples']} draws per "
                  f"example: max |predicted − sampled| = {num(r['max_abs_diff'], '{:.3g}')}, "
                  f"mean = {num(r['mean_abs_diff'], '{:.3g}')} over the off-diagonal cells."
                  + (f" Classes without examples (empty rows): {empty}." if empty else ""), "",
                  "| true class | overtaking class | predicted | sampled ± se |",
                  "|---|---|---|---|"]
        for y, j, pv, sv, sev in _largest(r):
            lines.append(f"| {y} | {j} | {num(pv, '{:.4f}')} | {num(sv, '{:.4f}')} ± "
                         f"{num(sev, '{:.2g}')} |")
        lines.append("")
    lines += [*[f"![{f}](figures/{f})" for f in figs], ""]
    return "\n".join(lines)


def summary(analysis: dict) -> list[str]:
    rows = []
    for r in analysis["records"]:
        top = _largest(r, 1)
        pair, pv, sv = (f"{top[0][0]} → {top[0][1]}", top[0][2], top[0][3]) if top else (
            "–", None, None)
        rows.append(summary_row(analysis["name"], pair, f"{r['level']:g}",
                                num(pv, "{:.4f}"), num(sv, "{:.4f}"),
                                num(r["max_abs_diff"], "{:.3g}"),
                                num(r["mean_abs_diff"], "{:.3g}")))
    return rows


KIND = AnalysisKind(InterclassConfusion, run, figures, markdown, summary,
                    ("largest y → j", "σ", "predicted", "sampled", "max |Δ|", "mean |Δ|"))
