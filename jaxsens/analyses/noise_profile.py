"""Noise at sites, three answers side by side: ``activation_noise``, ``weight_noise``,
``input_noise``.

Every site × level × estimator from :func:`jaxsens.profile`: the sampled E‖ΔF‖ with its
standard error, the linearized prediction, the certified bound (and for input noise the
analytic moments), the accuracy under noise, and the per-site sensitivity factor that
says which layers resist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import jax
from matplotlib import rcParams
from matplotlib.figure import Figure
from pydantic import Field
from tqdm.auto import tqdm

from ..estimators import ESTIMATORS, profile
from ..schema import ConfigError, NoiseConfig, one_of
from ..sites import INPUT, PureModel, split
from ._base import (
    AnalysisKind,
    Context,
    WithLevels,
    WithMoments,
    a_kind,
    check_moments_model,
    summary_row,
)
from ._report import by_site_level, num, save_figure, sites_in_order

__all__ = ["ActivationNoise", "WeightNoise", "InputNoise", "KINDS"]


class _NoiseAnalysis(WithLevels, WithMoments):
    """Where the noise enters, its law, levels and estimators.

    Attributes:
      sites: ``"all"`` or a list of site names (activation sites, weight paths).
      noise: the law (its level is replaced by each of ``levels``).
      levels: noise levels ε (σ for absolute noise).
      samples: Monte Carlo draws per example.
      estimators: names from :data:`jaxsens.ESTIMATORS`.
      moments_method: the analytic moments' method (``input_noise``).
      split_at: the two-stage split site of the moments.
    """

    sites: Literal["all"] | list[str] = "all"
    noise: NoiseConfig | None = None
    samples: int = Field(256, ge=2)
    estimators: list[Annotated[str, one_of(ESTIMATORS, "estimator")]] = Field(
        default_factory=lambda: ["sampled", "linearized", "bound"], min_length=1)

    def check(self, where: str) -> None:
        super().check(where)
        if self.noise is None:
            raise ConfigError(f"config error at {where}.noise: {a_kind(self.kind)} analysis "
                              "needs a noise law (e.g. {law: relative_norm})")
        if "moments" in self.estimators and self.kind != "input_noise":
            raise ConfigError(f"config error at {where}.estimators: 'moments' applies to "
                              f"input_noise analyses only, not {self.kind}")
        if self.kind != "weight_noise" and self.noise.law == "weight_relative":
            raise ConfigError(
                f"config error at {where}.noise.law: 'weight_relative' applies to weight sites "
                f"only (kind: weight_noise); for {self.kind} use relative_norm, absolute or "
                "multiplicative"
            )
        if self.kind == "input_noise" and self.sites != "all" and self.sites != [INPUT]:
            raise ConfigError(f"config error at {where}.sites: input_noise has the one site "
                              f"'input'; got {self.sites!r}")

    def resolve_sites(self, model: PureModel) -> list[str]:
        """The sites this analysis perturbs on ``model``."""
        if self.kind == "input_noise":
            return [INPUT]
        if self.kind == "activation_noise":
            return list(model.activation_sites) if self.sites == "all" else list(self.sites)
        kernels = [n for n in model.weight_sites if len(model.site(n).shape) >= 2]
        return kernels if self.sites == "all" else list(self.sites)

    def validate_model(self, where: str, model: PureModel) -> None:
        assert self.noise is not None  # check() ran first
        law = self.noise.build()
        want = {"activation_noise": ("activation", "input"), "weight_noise": ("weight",),
                "input_noise": ("input",)}[self.kind]
        for j, site in enumerate(self.resolve_sites(model)):
            at = f"{where}.sites" + (f"[{j}]" if self.sites != "all" else "")
            try:
                info = model.site(site)
            except ValueError as err:
                raise ConfigError(f"config error at {at}: {err}") from None
            if info.kind not in want:
                article = "an" if info.kind[0] in "aeiou" else "a"
                raise ConfigError(f"config error at {at}: {site!r} is {article} {info.kind} "
                                  f"site; {a_kind(self.kind)} analysis takes {' or '.join(want)} "
                                  "sites")
            if info.kind not in law.applies_to:
                raise ConfigError(f"config error at {where}.noise.law: {self.noise.law!r} "
                                  f"cannot perturb {info.kind} site {site!r}")
        if "moments" in self.estimators:
            check_moments_model(where, model, self.moments_method, self.split_at)


class ActivationNoise(_NoiseAnalysis):
    """Noise in hidden activations (a hidden layer's value perturbed)."""

    kind: Literal["activation_noise"]


class WeightNoise(_NoiseAnalysis):
    """Noise in weight matrices (question 2)."""

    kind: Literal["weight_noise"]


class InputNoise(_NoiseAnalysis):
    """Noise in the input (with the analytic moments, question 3)."""

    kind: Literal["input_noise"]


def run(cfg: _NoiseAnalysis, ctx: Context) -> list[dict]:
    """One :func:`jaxsens.profile` per site (site ``j`` draws with ``fold_in(key, j)``)."""
    assert cfg.noise is not None and cfg.levels is not None
    pm = split(ctx.model, ctx.x)
    names = cfg.resolve_sites(pm)
    law = cfg.noise.build()
    records: list[dict] = []
    bar = tqdm(names, desc=f"analysis {cfg.label}", disable=True if ctx.quiet else None,
               leave=False)
    for j, site in enumerate(bar):
        kw: dict[str, Any]
        if cfg.kind == "weight_noise":
            kw = {"sites": [], "weight_noise": law, "weight_sites": [site]}
        else:
            kw = {"sites": [site]}
        try:
            table = profile(ctx.model, ctx.x, noise=law, levels=cfg.levels,
                            key=jax.random.fold_in(ctx.key, j), estimators=cfg.estimators,
                            num_samples=cfg.samples, labels=ctx.y,
                            moments_method=cfg.moments_method, split_at=cfg.split_at, **kw)
        except ValueError as err:
            raise ctx.error(err) from None
        for r in table.to_records():
            r["analysis"] = cfg.label
            records.append(r)
        # What could not run is reported, never dropped silently.
        records += [dict(sk, analysis=cfg.label, skipped=sk.pop("reason"))
                    for sk in table.skipped()]
    return records


def _measured(records) -> list[dict]:
    return [r for r in records if "skipped" not in r]


def figures(run_dir: Path, analysis: dict) -> list[str]:
    """Deviation vs level per site (sampled band, predicted, bound), the factor, accuracy."""
    recs = _measured(analysis["records"])
    sites = sites_in_order(recs)
    table = by_site_level(recs)
    levels = sorted({r["level"] for r in recs})
    name = analysis["name"]
    made = []
    colors = rcParams["axes.prop_cycle"].by_key()["color"]

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for i, s in enumerate(sites):
        c = colors[i % len(colors)]
        lv = [lv for lv in levels if (s, lv) in table]
        smp = [table[(s, lv)].get("sampled") for lv in lv]
        if all(smp):
            ax.plot(lv, [r["mean"] for r in smp], "o-", color=c, label=f"{s} sampled")
            if all("q05" in r and "q95" in r for r in smp):
                ax.fill_between(lv, [r["q05"] for r in smp], [r["q95"] for r in smp],
                                color=c, alpha=0.15, linewidth=0)
        lin = [table[(s, lv)].get("linearized") for lv in lv]
        if all(lin):
            ax.plot(lv, [r["mean"] for r in lin], "--", color=c, label=f"{s} predicted")
        bnd = [table[(s, lv)].get("bound") for lv in lv]
        if all(bnd):
            ax.plot(lv, [r["upper"] for r in bnd], ":", color=c, alpha=0.7, label=f"{s} bound")
    if any(lv > 0 for lv in levels):
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("noise level ε")
    ax.set_ylabel("E‖F(x+η) − F(x)‖ (band: 5–95% of draws)")
    ax.set_title(f"{name}: output deviation vs noise level")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    made.append(save_figure(run_dir, f"{name}_deviation.png", fig))

    factors = _factors(recs, sites)
    if factors:
        fig = Figure(figsize=(6.4, 3.6))
        ax = fig.add_subplot()
        ax.bar(list(factors), list(factors.values()), color=colors[0])
        ax.set_ylabel("‖h‖·‖J‖_F/√n")
        ax.set_title(f"{name}: per-site sensitivity factor (rms deviation per unit ε)")
        ax.tick_params(axis="x", rotation=30)
        made.append(save_figure(run_dir, f"{name}_factor.png", fig))

    acc = [(s, [(lv, table[(s, lv)]["sampled"].get("accuracy")) for lv in levels
                if (s, lv) in table and "sampled" in table[(s, lv)]]) for s in sites]
    if any(v is not None for _, pts in acc for _, v in pts):
        fig = Figure(figsize=(6.4, 4.0))
        ax = fig.add_subplot()
        for i, (s, pts) in enumerate(acc):
            pts = [(lv, v) for lv, v in pts if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                        color=colors[i % len(colors)], label=s)
        ax.set_xlabel("noise level ε")
        ax.set_ylabel("accuracy under noise")
        ax.set_title(f"{name}: accuracy vs noise level")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        made.append(save_figure(run_dir, f"{name}_accuracy.png", fig))
    return made


def _factors(recs, sites) -> dict[str, float]:
    out = {}
    for s in sites:
        lin = [r for r in recs if r["site"] == s and r["estimator"] == "linearized"]
        if lin and lin[0].get("factor") is not None:
            out[s] = lin[0]["factor"]
    return out


def markdown(analysis: dict, figs: list[str]) -> str:
    """The table of sampled / predicted / bound per site and level, and the "why"."""
    recs = _measured(analysis["records"])
    skipped = [r for r in analysis["records"] if "skipped" in r]
    clean_acc = analysis.get("clean_accuracy")
    table = by_site_level(recs)
    sites = sites_in_order(recs)
    levels = sorted({r["level"] for r in recs})
    law = recs[0]["law"].rsplit(" ", 1)[0] if recs else ""
    lines = [f"## {analysis['name']} ({analysis['kind']}, {law})", ""]
    has_mom = any(r["estimator"] == "moments" for r in recs)
    lines += [
        "| site | ε | sampled E‖ΔF‖ ± se | predicted | sampled/predicted | bound | "
        "bound/sampled | accuracy | flip rate |" + (" moments (analytic) |" if has_mom else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if has_mom else ""),
    ]
    for s in sites:
        for lv in levels:
            row = table.get((s, lv))
            if not row:
                continue
            smp, lin, bnd = row.get("sampled"), row.get("linearized"), row.get("bound")
            ratio = (smp["mean"] / lin["mean"]) if smp and lin and lin["mean"] else None
            loose = (bnd["upper"] / smp["mean"]) if smp and bnd and smp["mean"] else None
            lines.append(
                f"| {s} | {lv:g} | "
                f"{num(smp and smp['mean'])} ± {num(smp and smp['stderr'], '{:.2g}')} | "
                f"{num(lin and lin['mean'])} | {num(ratio, '{:.3f}')} | "
                f"{num(bnd and bnd['upper'])} | {num(loose, '{:.1f}')}× | "
                f"{num(smp and smp.get('accuracy'), '{:.3f}')} | "
                f"{num(smp and smp.get('flip_rate'), '{:.3f}')} |"
                + (f" {num(row['moments']['mean'])} |" if has_mom and "moments" in row
                   else (" – |" if has_mom else ""))
            )
    lines.append("")
    factors = _factors(recs, sites)
    if len(factors) > 1:
        lo = min(factors, key=factors.__getitem__)
        hi = max(factors, key=factors.__getitem__)
        lines += [
            "**Which sites are resistant, and why.** To first order the mean-square output "
            "change is ε² · factor², with factor = ‖h‖·‖J‖_F/√n: the site's root-mean-square "
            "value times the Frobenius norm of the Jacobian from the site to the output. "
            f"Here the most resistant site is **{lo}** (factor {factors[lo]:.4g}) and the "
            f"most sensitive is **{hi}** (factor {factors[hi]:.4g}), a ratio of "
            f"{factors[hi] / factors[lo]:.3g}.",
            "",
            "| site | factor |",
            "|---|---|",
            *[f"| {s} | {f:.4g} |" for s, f in factors.items()],
            "",
        ]
    mid = [lv for lv in levels if any((s, lv) in table for s in sites)]
    if mid and clean_acc is not None:
        lv = min(mid, key=lambda v: abs(v - 0.05))
        accs = {s: table[(s, lv)]["sampled"].get("accuracy") for s in sites
                if (s, lv) in table and "sampled" in table[(s, lv)]}
        accs = {s: a for s, a in accs.items() if a is not None}
        if accs:
            n = analysis.get("num_examples")
            listed = ", ".join(f"{s} {a:.3f}" for s, a in accs.items())
            lines += [f"Accuracy on the {n} analysed test examples: clean {clean_acc:.3f}; with "
                      f"noise at ε = {lv:g} entering each site: {listed}.", ""]
    if skipped:
        lines += ["Not run: " + "; ".join(f"{r['estimator']} at {r['site']} ({r['skipped']})"
                                          for r in skipped) + ".", ""]
    lines += [f"![{f}](figures/{f})" for f in figs]
    lines.append("")
    return "\n".join(lines)


def summary(analysis: dict) -> list[str]:
    """One line per site at the level nearest 5%."""
    recs = _measured(analysis["records"])
    table = by_site_level(recs)
    levels = sorted({r["level"] for r in recs})
    if not levels:
        return []
    lv = min(levels, key=lambda v: abs(v - 0.05))
    out = []
    for s in sites_in_order(recs):
        row = table.get((s, lv), {})
        smp, lin, bnd = row.get("sampled"), row.get("linearized"), row.get("bound")
        out.append(summary_row(analysis["name"], s, f"{lv:g}", num(smp and smp["mean"]),
                               num(lin and lin["mean"]), num(bnd and bnd["upper"]),
                               num(smp and smp.get("accuracy"), "{:.3f}")))
    return out


KINDS = tuple(AnalysisKind(c, run, figures, markdown, summary)
              for c in (ActivationNoise, WeightNoise, InputNoise))
