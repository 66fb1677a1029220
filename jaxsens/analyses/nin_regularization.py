"""``nin_regularization``: NIN-regularized training against plain, dropout and L2 training,
under Gaussian input noise of several strengths.

Every method trains the same initial MLP on the digits with the same SGD schedule, data
order and seeds (one compiled program per method, vmapped over seeds,
:func:`jaxsens.nin.sweep`); only the regularizer differs: Noise Injection Nodes feeding
chosen layers (NINR, Levi et al. 2022: a large initial coupling that the noise then
decays), inverted dropout on every hidden layer, or an L2 penalty on the kernels. Each
trained network is then profiled under input noise η ~ N(0, σ² I) with the library's
estimators: Monte Carlo accuracy and deviation (:func:`jaxsens.sampled`) and the
linearized prediction (:func:`jaxsens.linearized`), whose E‖Jη‖² = σ²‖J‖_F² names the
input-output Jacobian as the quantity that sets the robustness.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from pydantic import Field

from .. import nin
from .. import noise as noise_lib
from ..estimators import profile
from ..models import MLP
from ..schema import ConfigError, one_of
from ._base import AnalysisConfig, AnalysisKind, Context, summary_row
from ._report import num, save_figure
from .nin_phases import load_digits_arrays

__all__ = ["NINRegularization", "KIND", "METHODS"]

METHODS = ("plain", "nin", "dropout", "l2")
"""The compared trainings."""

_COLORS = {"plain": "#000000", "nin": "#D55E00", "dropout": "#0072B2", "l2": "#009E73"}
_LABELS = {"plain": "plain", "nin": "NIN-regularized", "dropout": "dropout", "l2": "L2"}


class NINRegularization(AnalysisConfig):
    """NIN regularization against plain training, dropout and L2, under input noise.

    Attributes:
      dataset: ``"digits"`` (28×28) or ``"digits8x8"``.
      n_train: training examples.
      examples: test examples the trained networks are evaluated on.
      widths: hidden widths of the MLP.
      methods: which trainings to compare.
      steps: SGD steps.
      batch_size: examples per step.
      learning_rate: η.
      momentum: heavy-ball momentum.
      seeds: independent runs per method (data order, noise and dropout draws).
      record_every: how often the NIN's coupling is recorded.
      nin_sigma: the NINs' noise scale σ.
      nin_theta_scale: ‖θ₀‖ of each NIN (large: noise-dominated at the start).
      nin_layers: indices of the dense layers whose weight matrix gets NIN columns.
      nin_count: noise nodes per such layer (columns of θ; many nodes with random
        directions penalize every direction of the layer's pre-activation, one node
        only its own).
      resample: when the NINs' noise is redrawn.
      distribution: its law.
      dropout: the dropout rate on every hidden layer.
      weight_decay: the L2 coefficient μ (loss + μ/2 Σ‖W‖²).
      input_sigmas: the input noise standard deviations evaluated (inputs in [0, 1]).
      samples: Monte Carlo draws per example.
    """

    kind: Literal["nin_regularization"]
    dataset: Literal["digits", "digits8x8"] = "digits"
    n_train: int = Field(1000, ge=1)
    widths: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [64, 64])
    methods: list[Annotated[str, one_of(METHODS, "method")]] = Field(
        default_factory=lambda: list(METHODS), min_length=1)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(0.05, gt=0, allow_inf_nan=False)
    momentum: float = Field(0.9, ge=0, lt=1)
    seeds: int = Field(2, ge=1)
    record_every: int = Field(50, ge=1)
    nin_sigma: float = Field(3.0, gt=0, allow_inf_nan=False)
    nin_theta_scale: float = Field(8.0, gt=0, allow_inf_nan=False)
    nin_layers: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0],
                                                          min_length=1)
    nin_count: int = Field(64, ge=1)
    resample: Annotated[str, one_of(nin.RESAMPLE, "resampling policy")] = "step"
    distribution: Annotated[str, one_of(nin.DISTRIBUTIONS, "noise distribution")] = "gaussian"
    dropout: float = Field(0.2, gt=0, lt=1)
    weight_decay: float = Field(1e-3, gt=0, allow_inf_nan=False)
    input_sigmas: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.5], min_length=1)
    samples: int = Field(32, ge=1)

    def check(self, where: str) -> None:
        if self.steps % self.record_every:
            raise ConfigError(f"config error at {where}.record_every: must divide steps="
                              f"{self.steps}; got {self.record_every}")
        if self.batch_size > self.n_train:
            raise ConfigError(f"config error at {where}.batch_size: exceeds n_train="
                              f"{self.n_train}; got {self.batch_size}")
        bad = [i for i in self.nin_layers if i > len(self.widths)]
        if bad:
            raise ConfigError(f"config error at {where}.nin_layers: the MLP has dense layers "
                              f"0..{len(self.widths)}; got {bad[0]}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"config error at {where}.methods: each method at most once; "
                              f"got {self.methods}")


def _variant(cfg: NINRegularization, method: str, base: nnx.Module, key: jax.Array
             ) -> nnx.Module:
    model = base
    if method == "nin":
        for j in sorted(set(cfg.nin_layers)):
            model = nin.attach(model, f"layers/{j}", key=jax.random.fold_in(key, j),
                               sigma=cfg.nin_sigma, theta_scale=cfg.nin_theta_scale,
                               count=cfg.nin_count, distribution=cfg.distribution,
                               resample=cfg.resample)
    elif method == "dropout":
        for j in range(len(cfg.widths)):
            model = nin.attach_dropout(model, f"layers/{j}", rate=cfg.dropout)
    return model


def _evaluate(model: nnx.Module, x: jax.Array, y: jax.Array, levels: list[float],
              key: jax.Array, samples: int) -> dict:
    """Clean accuracy and, per level, sampled accuracy / deviation and what the linearized
    estimator predicts: E‖Jη‖, ‖J‖_F, and the accuracy and robustness radius it implies."""
    model.eval()
    logits = model(x)
    clean = float(jnp.mean(jnp.argmax(logits, axis=-1) == y))
    table = profile(model, x, noise=noise_lib.Absolute(1.0), levels=levels, key=key,
                    sites=["input"], estimators=("sampled", "linearized"), labels=y,
                    num_samples=samples)
    order = jnp.argsort(logits, axis=-1)
    correct = order[:, -1] == y
    runner_up = order[:, -2]
    batch = jnp.arange(x.shape[0])
    margin = logits[batch, y] - logits[batch, runner_up]
    out: dict = {"clean": clean, "levels": {}}
    for level in levels:
        smp = table.select(site="input", level=level, estimator="sampled")
        lin = table.select(site="input", level=level, estimator="linearized")
        c = lin.delta_cov
        # Linearized, the logit gap y − j* is Gaussian with variance C_yy + C_jj − 2C_yj;
        # P(it stays > 0) = Φ(margin / its std) counts only the runner-up j* as a rival.
        var = c[batch, y, y] + c[batch, runner_up, runner_up] - 2 * c[batch, y, runner_up]
        std = jnp.sqrt(jnp.maximum(var, jnp.finfo(var.dtype).tiny))
        keep = jnp.where(correct, jax.scipy.stats.norm.cdf(margin / std), 0.0)
        radius = jnp.where(correct, margin / std * level, jnp.nan)
        out["levels"][level] = {
            "accuracy": float(jnp.mean(smp.accuracy)),
            "flip_rate": float(jnp.mean(smp.flip_rate)),
            "sampled_deviation": float(jnp.mean(smp.mean)),
            "predicted_deviation": float(jnp.mean(lin.mean)),
            # E‖Jη‖² = σ²‖J‖_F² for η ~ N(0, σ²I): the rms over σ is ‖J‖_F per example.
            "jacobian_norm": float(jnp.mean(lin.rms) / level),
            "linearized_accuracy": float(jnp.mean(keep)),
            "robust_radius": float(jnp.nanmedian(radius)),
        }
    return out


def _stat(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def run(cfg: NINRegularization, ctx: Context) -> list[dict]:
    dtype = jnp.float64 if ctx.x.dtype == jnp.float64 else jnp.float32
    arrays = load_digits_arrays(cfg.dataset, cfg.n_train, cfg.examples, seed=0, dtype=dtype)
    x, y, x_test, y_test = (jnp.asarray(a) for a in arrays)
    base = MLP(x.shape[1], cfg.widths, 10, param_dtype=dtype,
               rngs=nnx.Rngs(params=jax.random.fold_in(ctx.key, 1)))
    keys = jax.random.split(jax.random.fold_in(ctx.key, 2), cfg.seeds)
    levels = sorted(set(cfg.input_sigmas))
    records = []
    for m, method in enumerate(cfg.methods):
        model = _variant(cfg, method, base, jax.random.fold_in(ctx.key, 3))
        schedule = nin.Schedule(steps=cfg.steps, learning_rate=cfg.learning_rate,
                                batch_size=cfg.batch_size, loss="cross_entropy",
                                momentum=cfg.momentum, record_every=cfg.record_every,
                                probe=False,
                                weight_decay=cfg.weight_decay if method == "l2" else 0.0)
        try:
            dyn = nin.sweep(model, x, y, sigmas=[cfg.nin_sigma], keys=keys, schedule=schedule)
        except ValueError as err:
            raise ctx.error(err) from None
        trace = jax.tree.map(np.asarray, dyn.trace)
        evals = [_evaluate(nin.with_params(model, jax.tree.map(lambda a, r=r: a[0, r],
                                                                dyn.params)),
                           x_test, y_test, levels, jax.random.fold_in(ctx.key, 100 + m),
                           cfg.samples)
                 for r in range(cfg.seeds)]
        common = {"analysis": cfg.label, "estimator": "nin_regularization", "site": "input",
                  "method": method, "seeds": cfg.seeds,
                  "final_train_loss": float(np.mean(trace.clean_loss[0, :, -1]))}
        theta = trace.theta_norm[0, :, :, :]  # (seeds, records, nodes)
        if theta.shape[-1]:
            common["theta_ratio"] = float(np.median(theta[:, -1, :] / theta[:, 0, :]))
            common["trace_step"] = [int(s) for s in trace.step[0, 0]]
            common["trace_theta_ratio"] = [float(v) for v in theta[0, :, 0] / theta[0, 0, 0]]
        acc, sd = _stat([e["clean"] for e in evals])
        records.append({**common, "level": 0.0, "accuracy": acc, "accuracy_std": sd,
                        "accuracy_seeds": [e["clean"] for e in evals], "clean_accuracy": acc,
                        "flip_rate": 0.0, "sampled_deviation": 0.0,
                        "predicted_deviation": 0.0, "jacobian_norm": None,
                        "linearized_accuracy": acc, "robust_radius": None})
        for level in levels:
            per = [e["levels"][level] for e in evals]
            acc, sd = _stat([p["accuracy"] for p in per])
            records.append({
                **common, "level": level, "accuracy": acc, "accuracy_std": sd,
                "accuracy_seeds": [p["accuracy"] for p in per],
                "clean_accuracy": _stat([e["clean"] for e in evals])[0],
                **{k: _stat([p[k] for p in per])[0] for k in (
                    "flip_rate", "sampled_deviation", "predicted_deviation",
                    "jacobian_norm", "linearized_accuracy", "robust_radius")},
            })
    return records


# ---------------------------------------------------------------------------------- report
def _by_method(recs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in recs:
        out.setdefault(r["method"], []).append(r)
    return {m: sorted(v, key=lambda r: r["level"]) for m, v in out.items()}


def _f(v) -> float:
    return float("nan") if v is None else float(v)


def figures(run_dir: Path, analysis: dict) -> list[str]:
    """Accuracy against input noise per method; Jacobian norm and deviations; NIN θ."""
    groups = _by_method(analysis["records"])
    if not groups:
        return []
    name = analysis["name"]
    fig = Figure(figsize=(9.6, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for method, recs in groups.items():
        lv = [_f(r["level"]) for r in recs]
        left.errorbar(lv, [_f(r["accuracy"]) for r in recs],
                      yerr=[_f(r["accuracy_std"]) for r in recs], fmt="o-", ms=4, capsize=2,
                      color=_COLORS[method], label=_LABELS[method])
        noisy = [r for r in recs if r["level"] > 0]
        right.plot([_f(r["level"]) for r in noisy], [_f(r["sampled_deviation"]) for r in noisy],
                   "o-", color=_COLORS[method], ms=4)
        right.plot([_f(r["level"]) for r in noisy],
                   [_f(r["predicted_deviation"]) for r in noisy], "--", color=_COLORS[method])
    left.set_xlabel("input noise σ (η ~ N(0, σ²I), inputs in [0, 1])")
    left.set_ylabel("accuracy under noise (mean ± std over seeds)")
    left.grid(alpha=0.3)
    right.set_xlabel("input noise σ")
    right.set_ylabel("E‖F(x + η) − F(x)‖ (logits)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.grid(alpha=0.3, which="major")
    handles, labels = left.get_legend_handles_labels()
    handles += [Line2D([], [], color="0.4", marker="o", ms=4),
                Line2D([], [], color="0.4", ls="--")]
    labels += ["sampled (Monte Carlo)", "linearized E‖Jη‖"]
    fig.legend(handles, labels, loc="outside lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle(f"{name}: robustness to Gaussian input noise", fontsize=10)
    made = [save_figure(run_dir, f"{name}_accuracy.png", fig)]

    nin_recs = groups.get("nin", [])
    if nin_recs and nin_recs[0].get("trace_step"):
        fig = Figure(figsize=(5.6, 3.6), layout="constrained")
        ax = fig.add_subplot()
        r = nin_recs[0]
        ax.plot(r["trace_step"], [_f(v) for v in r["trace_theta_ratio"]], "o-", ms=3,
                color=_COLORS["nin"])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("‖θ‖ / ‖θ₀‖ (first NIN, first seed)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{name}: the NIN coupling switches itself off", fontsize=10)
        made.append(save_figure(run_dir, f"{name}_theta.png", fig))
    return made


def _percent(v: float) -> str:
    return num(100 * v, "{:.1f}") + "%" if math.isfinite(v) else "–"


def markdown(analysis: dict, figs: list[str]) -> str:
    groups = _by_method(analysis["records"])
    name = analysis["name"]
    if not groups:
        return f"## {name} (NIN regularization)\n\nNo records.\n"
    levels = [_f(r["level"]) for r in next(iter(groups.values()))]
    lines = [
        f"## {name} (NIN regularization against plain, dropout and L2)", "",
        "The same MLP, initialization, SGD schedule, data order and seeds for every method; "
        "only the regularizer differs. Accuracy under Gaussian input noise η ~ N(0, σ²I) "
        "from Monte Carlo (`jaxsens.sampled`, mean ± std over seeds); the linearized "
        "estimator (`jaxsens.linearized`) gives E‖Jη‖ and, through E‖Jη‖² = σ²‖J‖_F², the "
        "input-output Jacobian norm that explains the differences.", "",
        "| method | " + " | ".join(f"σ = {num(v, '{:.3g}')}" for v in levels)
        + " | ‖J‖_F | final train loss |",
        "|---|" + "---|" * (len(levels) + 2),
    ]
    jac: dict[str, float] = {}
    for method, recs in groups.items():
        jn = [_f(r["jacobian_norm"]) for r in recs if r["level"] > 0]
        jac[method] = float(np.nanmean(jn)) if jn else float("nan")
        cells = [f"{num(_f(r['accuracy']), '{:.3f}')} ± {num(_f(r['accuracy_std']), '{:.3f}')}"
                 for r in recs]
        lines.append(f"| {_LABELS[method]} | " + " | ".join(cells)
                     + f" | {num(jac[method], '{:.3g}')} | "
                     f"{num(_f(recs[0]['final_train_loss']), '{:.3g}')} |")
    lines += ["", "At the largest σ: the sampled deviation of the logits against the linearized "
              "E‖Jη‖, and the linearized reading of robustness — the accuracy predicted from "
              "the clean margin to the runner-up class and the spread of that logit gap "
              "under J C Jᵀ (Φ(margin/std)), and the median radius margin/‖∇(F_y − F_j)‖, the "
              "input σ at which the gap's z-score falls to 1.", "",
              "| method | sampled E‖ΔF‖ | linearized E‖Jη‖ | ratio | flip rate | accuracy "
              "(sampled) | accuracy (linearized) | radius |",
              "|---|---|---|---|---|---|---|---|"]
    for method, recs in groups.items():
        top = recs[-1]
        s, p = _f(top["sampled_deviation"]), _f(top["predicted_deviation"])
        lines.append(f"| {_LABELS[method]} | {num(s, '{:.3g}')} | {num(p, '{:.3g}')} | "
                     f"{num(s / p if p else float('nan'), '{:.3f}')} | "
                     f"{num(_f(top['flip_rate']), '{:.3f}')} | "
                     f"{num(_f(top['accuracy']), '{:.3f}')} | "
                     f"{num(_f(top['linearized_accuracy']), '{:.3f}')} | "
                     f"{num(_f(top['robust_radius']), '{:.3g}')} |")
    lines += ["", "**Reading the numbers:**", ""]
    plain = groups.get("plain")
    for method, recs in groups.items():
        if method == "plain" or plain is None:
            continue
        d_clean = _f(recs[0]["accuracy"]) - _f(plain[0]["accuracy"])
        d_top = _f(recs[-1]["accuracy"]) - _f(plain[-1]["accuracy"])
        ratio = jac[method] / jac["plain"] if jac.get("plain") else float("nan")
        rad = _f(recs[-1]["robust_radius"]) / _f(plain[-1]["robust_radius"])
        lines.append(
            f"- {_LABELS[method]} vs plain: clean accuracy {d_clean:+.3f}, at σ = "
            f"{num(levels[-1], '{:.3g}')} {d_top:+.3f}; its mean ‖J‖_F is "
            f"{_percent(ratio)} and its median robustness radius {_percent(rad)} of plain's.")
    by_jac = ", ".join(_LABELS[m] for m in sorted(jac, key=lambda m: jac[m]))
    by_acc = ", ".join(_LABELS[m] for m in
                       sorted(groups, key=lambda m: -_f(groups[m][-1]["accuracy"])))
    by_rad = ", ".join(_LABELS[m] for m in
                       sorted(groups, key=lambda m: -_f(groups[m][-1]["robust_radius"])))
    gap = max(abs(_f(v[-1]["linearized_accuracy"]) - _f(v[-1]["accuracy"]))
              for v in groups.values())
    lines.append(f"- Ordered by ‖J‖_F (smallest first): {by_jac}; by robustness radius "
                 f"(largest first): {by_rad}; by accuracy at the largest σ (best first): "
                 f"{by_acc}. ‖J‖_F alone cannot order the accuracies when a method also "
                 "rescales the logits (L2 shrinks both); the linearized accuracy, which "
                 "weighs each margin against the spread J C Jᵀ gives its logit gap, is within "
                 f"{num(gap, '{:.3f}')} of the sampled one for every method.")
    nin_recs = groups.get("nin")
    if nin_recs and nin_recs[0].get("theta_ratio") is not None:
        shrink = num(_f(nin_recs[0]["theta_ratio"]), "{:.3g}")
        lines.append(f"- The NIN coupling ended at {shrink} of its initial norm (median over "
                     "seeds and nodes).")
    lines += ["", *[f"![{f}](figures/{f})" for f in figs], ""]
    return "\n".join(lines)


def summary(analysis: dict) -> list[str]:
    return [summary_row(analysis["name"], _LABELS.get(r["method"], r["method"]),
                        num(_f(r["level"]), "{:.3g}"), num(_f(r["accuracy"]), "{:.3f}"),
                        num(_f(r["sampled_deviation"]), "{:.3g}"),
                        num(_f(r["predicted_deviation"]), "{:.3g}"),
                        num(_f(r["jacobian_norm"]), "{:.3g}"))
            for r in analysis["records"]]


KIND = AnalysisKind(NINRegularization, run, figures, markdown, summary,
                    ("method", "σ", "accuracy", "sampled", "predicted", "‖J‖_F"))
