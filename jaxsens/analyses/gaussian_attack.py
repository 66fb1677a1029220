"""``gaussian_attack``: Gaussian noise attacks through the differentiable analytic moments.

The attack optimizes the mean shift and per-pixel standard deviation of a Gaussian input
distribution within a budget on E‖x − x_clean‖²; each result is checked by Monte Carlo on
the true network and compared with isotropic noise of the same budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from pydantic import Field

from ..moments import OBJECTIVES, check_attack, gaussian_noise_attack
from ..plotting import as_picture
from ..schema import ConfigError, one_of
from ..sites import PureModel
from ._base import AnalysisKind, Context, WithMoments, check_moments_model, summary_row
from ._report import num, plain_formatter, save_figure, site_style

__all__ = ["GaussianAttack", "KIND"]


class GaussianAttack(WithMoments):
    """A Gaussian noise attack per example.

    Attributes:
      budget: (E‖x − x_clean‖²)^½ ≤ budget.
      target: the target class (untargeted if unset).
      objective: ``"margin"`` or ``"ce"``.
      steps: optimizer steps.
      learning_rate: the attack's learning rate.
      sparsity: L1 penalty on the noise std.
      smoothness: total-variation penalty on the noise std.
      optimize_mean: False for a pure noise attack (zero mean shift).
      samples: Monte Carlo draws of the check on the true network.
      moments_method: the analytic moments' method.
      split_at: the two-stage split site.
    """

    kind: Literal["gaussian_attack"]
    budget: float | None = Field(None, gt=0, allow_inf_nan=False)
    target: int | None = Field(None, ge=0)
    objective: Annotated[str, one_of(OBJECTIVES, "objective")] = "margin"
    steps: int = Field(200, ge=1)
    learning_rate: float = Field(0.01, gt=0, allow_inf_nan=False)
    sparsity: float = Field(0.0, ge=0, allow_inf_nan=False)
    smoothness: float = Field(0.0, ge=0, allow_inf_nan=False)
    optimize_mean: bool = True
    samples: int = Field(256, ge=2)

    def check(self, where: str) -> None:
        if self.budget is None:
            raise ConfigError(f"config error at {where}.budget: a gaussian_attack needs a budget "
                              "(> 0) on the root-mean-square input change")

    def validate_model(self, where: str, model: PureModel) -> None:
        check_moments_model(where, model, self.moments_method, self.split_at)
        k = int(np.prod(model.structure.output_shape))
        if self.target is not None and self.target >= k:
            raise ConfigError(f"config error at {where}.target: class {self.target} does not "
                              f"exist; the model has {k} outputs (0..{k - 1})")


def run(cfg: GaussianAttack, ctx: Context) -> list[dict]:
    assert cfg.budget is not None
    x, y, model = ctx.x, ctx.y, ctx.model
    rows = []
    for b in range(x.shape[0]):
        if cfg.target is not None and int(y[b]) == cfg.target:
            continue  # already of the target class: nothing to attack
        kb = jax.random.fold_in(ctx.key, b)
        try:
            res = gaussian_noise_attack(
                model, x[b], int(y[b]), budget=cfg.budget, target=cfg.target,
                objective=cfg.objective, steps=cfg.steps, learning_rate=cfg.learning_rate,
                sparsity=cfg.sparsity, smoothness=cfg.smoothness,
                optimize_mean=cfg.optimize_mean, method=cfg.moments_method,
                split_at=cfg.split_at,
                image_shape=tuple(x.shape[1:]) if x.ndim >= 3 else None,
                key=jax.random.fold_in(kb, 0))
        except ValueError as err:
            raise ctx.error(err) from None
        chk = check_attack(model, x[b], int(y[b]), res, key=jax.random.fold_in(kb, 1),
                           num_samples=cfg.samples)
        # Baseline: isotropic noise with the same budget and no mean shift.
        d = res.std.size
        iso = res._replace(mean_shift=jnp.zeros_like(res.mean_shift),
                           std=jnp.full_like(res.std, cfg.budget / np.sqrt(d)))
        base = check_attack(model, x[b], int(y[b]), iso, key=jax.random.fold_in(kb, 2),
                            num_samples=cfg.samples)
        rows.append({
            "analysis": cfg.label, "estimator": "gaussian_attack", "site": "input",
            "level": float(cfg.budget), "example": b, "label": int(y[b]),
            "target": cfg.target, "objective": cfg.objective,
            "predicted_objective": float(res.predicted_objective),
            "predicted_margin": float(res.predicted_margin),
            "mc_margin": float(chk.margin), "mc_margin_stderr": float(chk.margin_stderr),
            "success_rate": float(chk.success_rate),
            "success_stderr": float(chk.success_stderr),
            "baseline_success_rate": float(base.success_rate),
            "baseline_margin": float(base.margin),
            "mean_shift_norm": float(jnp.linalg.norm(res.mean_shift)),
            "noise_norm": float(jnp.linalg.norm(res.std)),
            "mean_shift": np.asarray(res.mean_shift, np.float64).reshape(-1).tolist(),
            "std": np.asarray(res.std, np.float64).reshape(-1).tolist(),
            "input_shape": list(x.shape[1:]),
        })
    return rows


def _picture(r: dict, key: str) -> np.ndarray:
    return as_picture(np.asarray(r[key]).reshape(r["input_shape"]))


_SHOWN = 16  # examples whose distributions are drawn


def figures(run_dir: Path, analysis: dict) -> list[str]:
    """Predicted vs Monte Carlo margins, and every example's optimized distribution (mean
    shift and noise std, each on one colour scale shared by all examples)."""
    recs = analysis["records"]
    if not recs:
        return []
    made = []
    fig = Figure(figsize=(5.2, 4.6), layout="constrained")
    ax = fig.add_subplot()
    pm = [r["predicted_margin"] for r in recs]
    mc = [r["mc_margin"] for r in recs]
    err = [1.96 * r["mc_margin_stderr"] for r in recs]
    lo, hi = min(pm + mc), max(pm + mc)
    ax.plot([lo, hi], [lo, hi], "--", color="0.4", lw=1, label="prediction = Monte Carlo")
    ax.errorbar(pm, mc, yerr=err, fmt="o", ms=4, color=site_style(0)[0], capsize=2,
                label="one example (95% interval)")
    ax.axhline(0.0, color="0.75", lw=0.8)
    ax.set_xlabel("expected margin predicted by the analytic moments", fontsize=9)
    ax.set_ylabel("Monte Carlo margin on the true network", fontsize=9)
    ax.set_title(f"{analysis['name']}: attack margin, prediction vs true network\n"
                 "(margin < 0: the attack succeeds on average)", fontsize=9.5)
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2,
               fontsize=8, frameon=False)
    made.append(save_figure(run_dir, f"{analysis['name']}_margins.png", fig))
    pictures = [r for r in recs if _picture(r, "std").ndim == 2]
    shown = pictures[:_SHOWN]
    if shown:
        cols = min(4, len(shown))
        rows = -(-len(shown) // cols)
        fig = Figure(figsize=(2.25 * cols + 1.6, 4.3 * rows + 0.6), layout="constrained")
        # Two colorbars of their own (top half: δ, bottom half: s) in a narrow last column.
        grid = fig.add_gridspec(2 * rows, cols + 1, width_ratios=[1.0] * cols + [0.07])
        shift = max(max(abs(v) for v in r["mean_shift"]) for r in shown) or 1.0
        top = max(max(r["std"]) for r in shown) or 1.0
        panels: dict[str, list] = {"mean_shift": [], "std": []}
        for i, r in enumerate(shown):
            row, col = 2 * (i // cols), i % cols
            for j, (key, label) in enumerate((("mean_shift", "mean shift δ"),
                                              ("std", "noise std s"))):
                ax = fig.add_subplot(grid[row + j, col])
                if key == "mean_shift":
                    ax.imshow(_picture(r, key), cmap="coolwarm", vmin=-shift, vmax=shift)
                    ax.set_title(f"example {r['example']} (label {r['label']})\n"
                                 f"success {r['success_rate']:.2f}", fontsize=8.5)
                else:
                    ax.imshow(_picture(r, key), cmap="viridis", vmin=0.0, vmax=top)
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(label, fontsize=9)
                panels[key].append(ax)
        for key, label, cax in (("mean_shift", "mean shift δ (all examples)", grid[:rows, cols]),
                                ("std", "noise std s (all examples)", grid[rows:, cols])):
            bar = fig.colorbar(panels[key][0].images[-1], cax=fig.add_subplot(cax),
                               format=plain_formatter())
            bar.set_label(label, fontsize=8)
            bar.ax.tick_params(labelsize=8)
        which = ("every attacked example" if len(shown) == len(pictures) else
                 f"the first {len(shown)} of {len(pictures)} attacked examples")
        fig.suptitle(f"{analysis['name']}: the optimized input distribution of {which} "
                     f"(budget {recs[0]['level']:g})", fontsize=10)
        made.append(save_figure(run_dir, f"{analysis['name']}_distributions.png", fig))
    return made


def markdown(analysis: dict, figs: list[str]) -> str:
    recs = analysis["records"]
    target = recs[0]["target"] if recs else None
    kind = "untargeted" if target is None else f"targeted at class {target}"
    lines = [f"## {analysis['name']} (Gaussian noise attack, {kind})", "",
             "The attack optimizes the mean shift and per-pixel standard deviation of a Gaussian "
             "input distribution, within E‖x − x_clean‖² ≤ budget², through the differentiable "
             "analytic moments; each result is then checked by Monte Carlo on the true network "
             "and compared with isotropic noise of the same budget.", "",
             "| example | label | budget | predicted margin | MC margin ± se | success rate ± se "
             "| isotropic baseline success |", "|---|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(
            f"| {r['example']} | {r['label']} | {r['level']:g} | {num(r['predicted_margin'])} | "
            f"{num(r['mc_margin'])} ± {num(r['mc_margin_stderr'], '{:.2g}')} | "
            f"{num(r['success_rate'], '{:.3f}')} ± {num(r['success_stderr'], '{:.2g}')} | "
            f"{num(r['baseline_success_rate'], '{:.3f}')} |")
    if recs:
        mean_s = sum(r["success_rate"] for r in recs) / len(recs)
        mean_b = sum(r["baseline_success_rate"] for r in recs) / len(recs)
        lines += ["", f"Mean success rate {mean_s:.3f} with the optimized distribution vs "
                  f"{mean_b:.3f} with isotropic noise of the same budget."]
    lines += ["", *[f"![{f}](figures/{f})" for f in figs], ""]
    return "\n".join(lines)


def summary(analysis: dict) -> list[str]:
    return [summary_row(analysis["name"], f"example {r['example']}", f"{r['level']:g}",
                        num(r["success_rate"], "{:.3f}"),
                        num(r["baseline_success_rate"], "{:.3f}"), num(r["mc_margin"]))
            for r in analysis["records"]]


KIND = AnalysisKind(GaussianAttack, run, figures, markdown, summary,
                    ("example", "budget", "success", "isotropic", "MC margin"))
