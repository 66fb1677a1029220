"""``moments_tightness``: the analytic Gaussian-input moments against Monte Carlo.

Symmetric relative error per logit of the two-stage and layerwise means and variances,
and of the zero-mean (CVPR 2018) variance formula applied at the actual mean, over input
noise levels σ (Bibi et al. 2018).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from matplotlib.figure import Figure
from pydantic import Field

from ..moments import tightness_study
from ..sites import PureModel
from ._base import AnalysisKind, Context, WithLevels, check_moments_model, summary_row
from ._report import num, save_figure, set_level_ticks, set_log_ticks, site_style

__all__ = ["MomentsTightness", "KIND"]


class MomentsTightness(WithLevels):
    """Analytic moments vs Monte Carlo.

    Attributes:
      levels: input noise standard deviations σ.
      samples: Monte Carlo draws per example.
      split_at: the two-stage split site (default: the last ReLU site).
    """

    kind: Literal["moments_tightness"]
    samples: int = Field(256, ge=2)
    split_at: str | None = None

    def validate_model(self, where: str, model: PureModel) -> None:
        check_moments_model(where, model, "two_stage", self.split_at)


def run(cfg: MomentsTightness, ctx: Context) -> list[dict]:
    assert cfg.levels is not None
    try:
        rows = tightness_study(ctx.model, ctx.x, sigmas=cfg.levels, key=ctx.key,
                               num_samples=cfg.samples, split_at=cfg.split_at)
    except ValueError as err:
        raise ctx.error(err) from None
    for r in rows:
        r.update(analysis=cfg.label, estimator="tightness", site="input")
    return rows


_SRE_COLUMNS = [
    ("sre_mean", "mean (two-stage)"),
    ("sre_mean_layerwise", "mean (layerwise)"),
    ("sre_var", "variance (exact, general mean)"),
    ("sre_var_layerwise", "variance (layerwise)"),
    ("sre_var_zero_mean", "variance (zero-mean formula)"),
]


def figures(run_dir: Path, analysis: dict) -> list[str]:
    """Symmetric relative error of each analytic moment vs input noise σ (legend outside)."""
    recs = sorted(analysis["records"], key=lambda r: r["level"])
    if not recs:
        return []
    fig = Figure(figsize=(7.6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, (key, label) in enumerate(_SRE_COLUMNS):
        vals = [r.get(key) for r in recs]
        if all(v is not None for v in vals):
            color, marker = site_style(i)
            ax.plot([r["level"] for r in recs], vals, marker=marker, ms=5, color=color,
                    ls="--" if "zero-mean" in label else "-", label=label)
    set_level_ticks(ax, [r["level"] for r in recs])
    set_log_ticks(ax, "y")
    ax.set_xlabel("input noise σ (η ~ N(0, σ²I), absolute)", fontsize=9)
    ax.set_ylabel("symmetric relative error vs Monte Carlo", fontsize=9)
    ax.set_title(f"{analysis['name']}: analytic output moments vs Monte Carlo\n"
                 f"({recs[0]['num_samples']} draws per example, mean over logits)", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False,
              title="moment (method)", title_fontsize=8)
    ax.grid(alpha=0.3, which="major")
    return [save_figure(run_dir, f"{analysis['name']}_tightness.png", fig)]


def markdown(analysis: dict, figs: list[str]) -> str:
    recs = sorted(analysis["records"], key=lambda r: r["level"])
    cols = [(k, lab) for k, lab in _SRE_COLUMNS if all(k in r for r in recs)]
    lines = [f"## {analysis['name']} (analytic Gaussian-input moments vs Monte Carlo)", "",
             "Symmetric relative error 2|a−b|/(|a|+|b|) per logit, averaged over examples and "
             f"logits ({recs[0]['num_samples'] if recs else 0} Monte Carlo draws per example). "
             "The zero-mean (CVPR 2018) variance formula applied at the actual, non-zero mean "
             "is kept only to show how far off it is.", "",
             "| σ | " + " | ".join(lab for _, lab in cols) + " | MC/analytic mean | "
             "MC/analytic variance |",
             "|---|" + "---|" * (len(cols) + 2)]
    for r in recs:
        lines.append(f"| {r['level']:g} | " + " | ".join(num(r[k], "{:.3g}") for k, _ in cols)
                     + f" | {num(r.get('ratio_mean'), '{:.4f}')} | "
                     f"{num(r.get('ratio_var'), '{:.4f}')} |")
    lines += ["", *[f"![{f}](figures/{f})" for f in figs], ""]
    return "\n".join(lines)


def summary(analysis: dict) -> list[str]:
    return [summary_row(analysis["name"], "input", f"{r['level']:g}",
                        num(r.get("sre_mean"), "{:.3g}"), num(r.get("sre_var"), "{:.3g}"),
                        num(r.get("sre_var_zero_mean"), "{:.3g}"))
            for r in sorted(analysis["records"], key=lambda r: r["level"])]


KIND = AnalysisKind(MomentsTightness, run, figures, markdown, summary,
                    ("site", "σ", "SRE mean", "SRE var", "zero-mean"))
