"""``weight_margin``: how far can the weights move before a prediction can change?

For budgets ε on the ℓ∞-operator norm of the perturbation of chosen dense layers
(``‖ΔW_k‖_∞ ≤ ε‖W_k‖_∞`` by default; ‖·‖_∞ the max row ℓ1 sum of ``W_k = K_kᵀ``), every
pairwise margin ``f_y − f_j`` moves by at most Γ_j (:func:`jaxsens.bounds.weight_margin_bound`,
a sound form derived in jaxsens after Tsai et al. 2021, not the paper's constants). This kind
holds Γ against the best margin drop a projected-gradient weight attack finds
(:func:`jaxsens.bounds.weight_attack`), per ε: the bound in its data and product forms, the
attack, their ratio (≤ 1 wherever the bound is sound), certified accuracy (both forms) next
to the accuracy clean, under random perturbations on the budget's boundary and under attack;
per dense layer alone, the median certified radius; and the Rademacher term of the perturbed
class (Golowich et al. 2018, biases folded in) on the analysed sample.

Everything of one ε is one compiled program, ε a traced argument: the levels of an analysis
compile once.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from pydantic import Field
from tqdm.auto import tqdm

from ..bounds import (
    certified_accuracy,
    certified_radius,
    generalization_term,
    margin_chain,
    random_weight_perturbation,
    weight_attack,
    weight_margin_bound,
)
from ..schema import ConfigError
from ..sites import PureModel, split
from ._base import AnalysisKind, Context, WithLevels, a_kind, summary_row
from ._report import (
    binomial_halfwidth,
    num,
    save_figure,
    set_level_ticks,
    set_log_ticks,
    set_name_ticks,
    site_style,
)

__all__ = ["WeightMargin", "KIND", "SOUNDNESS_TOLERANCE"]

FORMS: tuple[Literal["data", "product"], ...] = ("data", "product")  # jaxsens.bounds.FORMS

SOUNDNESS_TOLERANCE = {"float32": 1e-3, "float64": 1e-9}
"""Relative slack of ``attack ≤ Γ`` by dtype: the attack attains Γ exactly when only the
last layer moves, and the two sides are computed by different float operations."""


class WeightMargin(WithLevels):
    """The weight-perturbation margin bound against the best attack, per budget ε.

    Attributes:
      levels: the budgets ε (relative to each perturbed layer's ``‖W_k‖_∞`` unless
        ``relative`` is false); required.
      layers: ``"all"`` or 0-based indices of the perturbed dense layers (jointly);
        negative ones count from the end (``[-1]``: the last layer, at any depth).
      relative: budgets relative to ``‖W_k‖_∞`` (else absolute ℓ∞-operator norms).
      samples: random perturbations on the budget's boundary (accuracy under random).
      attack_steps: projected-gradient steps of each attack start.
      attack_restarts: random boundary starts of the attack besides its Frank–Wolfe start.
      attack_examples: the first this many examples get the per-class margin attack (the
        costly part: one attack per example and class); the bound, certified and random
        accuracy and the untargeted attack use all ``examples``.
      radius: also the median certified radius of every dense layer alone (a property of
        the model, the same for every ``layers``: one analysis of a run is enough).
      examples: how many test examples are analysed.
    """

    kind: Literal["weight_margin"]
    layers: Literal["all"] | list[int] = "all"
    relative: bool = True
    samples: int = Field(20, ge=1)
    attack_steps: int = Field(20, ge=1)
    attack_restarts: int = Field(1, ge=0)
    attack_examples: int = Field(16, gt=0)
    radius: bool = True
    examples: int = Field(64, gt=0)

    def check(self, where: str) -> None:
        super().check(where)
        if isinstance(self.layers, list):
            if not self.layers:
                raise ConfigError(f"config error at {where}.layers: give 'all' or a non-empty "
                                  "list of dense-layer indices")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"config error at {where}.layers: indices must be distinct; "
                                  f"got {self.layers}")

    def resolve_layers(self, depth: int) -> tuple[int, ...]:
        """The perturbed layers of a chain of ``depth`` dense layers.

        Args:
          depth: the number of dense layers of the model.

        Returns:
          The sorted indices in ``0..depth − 1`` (``"all"``: every layer; a negative index
          counts from the end).
        """
        if self.layers == "all":
            return tuple(range(depth))
        return tuple(sorted({k % depth for k in self.layers}))

    def validate_model(self, where: str, model: PureModel) -> None:
        try:
            chain = margin_chain(model)
        except ValueError as err:
            raise ConfigError(f"config error at {where}: {a_kind(self.kind)} analysis needs a "
                              f"chain of dense layers; {err}") from None
        d = chain.depth
        if isinstance(self.layers, list):
            bad = [k for k in self.layers if not -d <= k < d]
            if bad:
                raise ConfigError(f"config error at {where}.layers: dense layer {bad[0]} does "
                                  f"not exist; the model has {d} dense layers (0..{d - 1}, or "
                                  f"-{d}..-1 from the end)")
            if len(self.resolve_layers(d)) != len(self.layers):
                raise ConfigError(f"config error at {where}.layers: {self.layers} name a layer "
                                  f"twice in a model of {d} dense layers")
        computed = [k for k in self.resolve_layers(d) if chain.sites[k] is None]
        if computed:
            raise ConfigError(f"config error at {where}.layers: dense layer {computed[0]}'s "
                              "kernel is computed, not a parameter, so it cannot be perturbed")


# ------------------------------------------------------------------------------ computing
@functools.partial(jax.jit, static_argnames=("layers", "relative", "samples", "steps",
                                             "restarts", "n_attack"))
def _evaluate(pm: PureModel, x, y, eps, key, *, layers: tuple[int, ...], relative: bool,
              samples: int, steps: int, restarts: int, n_attack: int) -> dict:
    """Everything of one budget, compiled once per analysis (``eps`` is traced).

    Random perturbations take ``fold_in(key, i)``, ``i < samples``, and the untargeted
    attack ``fold_in(key, samples)``, as :func:`jaxsens.bounds.accuracy_under_weight_noise`
    does, so that its clean, random and attacked accuracies are reproduced exactly.
    """
    n = x.shape[0]
    xs = x.reshape(n, *pm.input_shape)
    kw = {"eps": eps, "layers": layers, "relative": relative}
    out = {f"gamma_{f}": weight_margin_bound(pm, x, y, form=f, **kw) for f in FORMS}
    out |= {f"certified_{f}": certified_accuracy(pm, x, y, form=f, **kw) for f in FORMS}
    logits = pm.apply(xs).reshape(n, -1)
    out["margins"] = jnp.take_along_axis(logits, y[:, None], axis=1) - logits
    clean = jnp.argmax(logits, axis=1) == y

    def accuracy(i):
        deltas = random_weight_perturbation(pm, jax.random.fold_in(key, i), **kw)
        pred = jnp.argmax(pm.apply(xs, deltas).reshape(n, -1), axis=1)
        return jnp.mean((pred == y).astype(jnp.float32))

    out["random"] = jax.vmap(accuracy)(jnp.arange(samples))
    worst = weight_attack(pm, x, y, objective="untargeted", steps=steps, restarts=restarts,
                          key=jax.random.fold_in(key, samples), **kw)
    out["untargeted_ok"] = clean & (worst < 0)
    out["clean_ok"] = clean
    out["drops"] = weight_attack(pm, x[:n_attack], y[:n_attack], objective="margins",
                                 steps=steps, restarts=restarts,
                                 key=jax.random.fold_in(key, samples + 1), **kw)
    return out


@functools.partial(jax.jit, static_argnames=("depth", "relative"))
def _radii(pm: PureModel, x, y, *, depth: int, relative: bool) -> dict:
    """Per dense layer alone and per form, every example's certified radius."""
    return {f"{k}/{f}": certified_radius(pm, x, y, layers=[k], relative=relative, form=f)
            for k in range(depth) for f in FORMS}


def _linf_norms(pm: PureModel) -> list[float]:
    """``‖W_k‖_∞`` (max row ℓ1 sum of ``W_k = K_kᵀ``) of every dense layer."""
    return [float(np.abs(np.asarray(k, np.float64)).sum(axis=0).max())
            for k in margin_chain(pm).kernels]


def _log_product(values) -> float:
    """Π values through logs (no overflow of the float64 product of deep networks)."""
    if any(v <= 0 for v in values):
        return 0.0
    log = sum(math.log(v) for v in values)
    return math.exp(log) if log < 709.0 else math.inf


def _rademacher(pm: PureModel, x, eps: float, layers: tuple[int, ...], relative: bool
                ) -> tuple[dict | None, str | None]:
    """:func:`generalization_term` on the analysed sample, or ``(None, reason)``."""
    try:
        return generalization_term(pm, x, eps=eps, layers=layers if eps > 0 else (),
                                   relative=relative), None
    except ValueError as err:
        return None, str(err)


def _layers_label(cfg: WeightMargin, depth: int) -> str:
    layers = cfg.resolve_layers(depth)
    if layers == tuple(range(depth)):
        return "all layers"
    return ("layer " if len(layers) == 1 else "layers ") + ",".join(map(str, layers))


def _ratios(drops: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """attack / Γ over every example and class j ≠ y with a finite, positive Γ."""
    ok = np.isfinite(gamma) & (gamma > 0)
    return drops[ok] / gamma[ok]


def run(cfg: WeightMargin, ctx: Context) -> list[dict]:
    """Bound, attack, certified and empirical accuracies per ε; radii per layer.

    Args:
      cfg: the analysis config.
      ctx: the runner's context (trained model, analysed examples, key).

    Returns:
      JSON-able records: one ``"budget"`` record per ε, one ``"radius"`` record per dense
      layer and one ``"generalization"`` record (see :func:`markdown` for their meaning).
    """
    assert cfg.levels is not None
    pm = split(ctx.model, ctx.x)
    cfg.validate_model(f"analyses[{ctx.index}]", pm)  # the runner did; direct callers too
    chain = margin_chain(pm)
    depth = chain.depth
    layers = cfg.resolve_layers(depth)
    label = _layers_label(cfg, depth)
    x, y = ctx.x, ctx.y
    n = int(x.shape[0])
    n_attack = min(cfg.attack_examples, n)
    dtype = jnp.result_type(x.dtype, jnp.float32)
    a = _linf_norms(pm)
    key = jax.random.fold_in(ctx.key, 0)  # the same draws at every ε: smooth curves
    base = {"analysis": cfg.label, "estimator": "weight_margin"}
    records: list[dict] = []
    for eps in tqdm(cfg.levels, desc=f"analysis {cfg.label}", leave=False,
                    disable=True if ctx.quiet else None):
        out = jax.device_get(_evaluate(
            pm, x, y, jnp.asarray(eps, dtype), key, layers=layers, relative=cfg.relative,
            samples=cfg.samples, steps=cfg.attack_steps, restarts=cfg.attack_restarts,
            n_attack=n_attack))
        gd, gp = np.asarray(out["gamma_data"], np.float64), np.asarray(out["gamma_product"],
                                                                     np.float64)
        drops = np.asarray(out["drops"], np.float64)
        m = np.asarray(out["margins"], np.float64)[:n_attack]
        flipped = np.zeros(n, bool)
        other = np.arange(m.shape[1]) != np.asarray(y)[:n_attack, None]
        flipped[:n_attack] = np.any((drops >= m) & other, axis=1)
        attacked = np.asarray(out["untargeted_ok"]) & ~flipped
        ratio = _ratios(drops, gd[:n_attack])
        ratio_p = _ratios(drops, gp[:n_attack])
        budgets = [eps * a[k] if cfg.relative else eps for k in range(depth)]
        perturbed = [a[k] + (budgets[k] if k in layers else 0.0) for k in range(depth)]
        gen, _ = _rademacher(pm, x, float(eps), layers, cfg.relative)
        records.append(dict(
            base, record="budget", site=label, level=float(eps), layers=list(layers),
            relative=cfg.relative,
            bound_data=float(np.mean(gd.max(axis=1))),
            bound_product=float(np.mean(gp.max(axis=1))),
            bound_data_attacked=float(np.mean(gd[:n_attack].max(axis=1))),
            bound_product_attacked=float(np.mean(gp[:n_attack].max(axis=1))),
            attack=float(np.mean(drops.max(axis=1))),
            ratio_median=float(np.median(ratio)) if ratio.size else None,
            ratio_max=float(ratio.max()) if ratio.size else None,
            ratio_product_max=float(ratio_p.max()) if ratio_p.size else None,
            certified_data=float(out["certified_data"]),
            certified_product=float(out["certified_product"]),
            accuracy_clean=float(np.mean(out["clean_ok"])),
            accuracy_random=float(np.mean(out["random"])),
            accuracy_random_min=float(np.min(out["random"])),
            accuracy_untargeted=float(np.mean(out["untargeted_ok"])),
            accuracy_attacked=float(np.mean(attacked)),
            rademacher=None if gen is None else gen["complexity"],
            linf_product=_log_product(perturbed),
            num_examples=n, num_attacked=n_attack, samples=cfg.samples,
            dtype=str(np.dtype(dtype)),
        ))
    radii = (jax.device_get(_radii(pm, x, y, depth=depth, relative=cfg.relative))
             if cfg.radius else {})
    for k in range(depth if cfg.radius else 0):
        rd, rp = (np.asarray(radii[f"{k}/{f}"], np.float64) for f in FORMS)
        records.append(dict(
            base, record="radius", site=chain.sites[k] or f"dense {k}", level=None, layer=k,
            linf_norm=a[k], radius_data_median=float(np.median(rd)),
            radius_product_median=float(np.median(rp)),
            radius_data_q25=float(np.quantile(rd, 0.25)),
            radius_data_q75=float(np.quantile(rd, 0.75)),
            relative=cfg.relative, num_examples=n))
    gen, reason = _rademacher(pm, x, 0.0, layers, cfg.relative)
    records.append(dict(
        base, record="generalization", site=label, level=0.0,
        complexity=None if gen is None else gen["complexity"],
        input_radius=None if gen is None else gen["input_radius"],
        frobenius_radii=None if gen is None else gen["frobenius_radii"],
        depth=depth, num_examples=n, skipped=reason,
        linf_norms=a, linf_product=_log_product(a), activations=list(chain.activations)))
    return records


# ------------------------------------------------------------------------------ reporting
def _of(analysis: dict, record: str) -> list[dict]:
    return [r for r in analysis["records"] if r.get("record") == record]


def _budget_label(recs: list[dict]) -> str:
    relative = recs[0].get("relative", True) if recs else True
    return ("budget ε (‖ΔW_k‖_∞ ≤ ε·‖W_k‖_∞)" if relative else "budget ε (‖ΔW_k‖_∞ ≤ ε)")


def soundness(analysis: dict) -> float | None:
    """The largest attack / Γ (data form) over every ε, example and class.

    Args:
      analysis: a saved ``weight_margin`` analysis entry.

    Returns:
      The ratio (≤ 1 up to rounding where the bound is sound), or ``None`` without one.
    """
    vals = [r["ratio_max"] for r in _of(analysis, "budget") if r.get("ratio_max") is not None]
    return max(vals) if vals else None


def _positive(xs, ys):
    pts = [(a, b) for a, b in zip(xs, ys, strict=True) if b is not None and b > 0]
    return [p[0] for p in pts], [p[1] for p in pts]


def _bound_figure(run_dir: Path, analysis: dict, recs: list[dict]) -> str:
    fig = Figure(figsize=(9.6, 4.3), layout="constrained")
    left, right = fig.subplots(1, 2)
    levels = [r["level"] for r in recs]
    for i, (key, lab) in enumerate((("bound_data_attacked", "bound Γ, data form"),
                                    ("bound_product_attacked", "bound Γ, product form"),
                                    ("attack", "best attack found"))):
        colour, marker = site_style(i)
        xs, ys = _positive(levels, [r.get(key) for r in recs])
        left.plot(xs, ys, marker=marker, color=colour, ls="--" if i < 2 else "-", label=lab)
    if any(line.get_xdata().size for line in left.get_lines()):
        set_log_ticks(left, "y")
    set_level_ticks(left, levels)
    left.set_xlabel(_budget_label(recs), fontsize=9)
    left.set_ylabel("max_j margin change (mean over examples)", fontsize=9)
    left.set_title("bound vs attack", fontsize=10)
    left.grid(alpha=0.3, which="major")
    for i, (key, lab) in enumerate((("ratio_median", "attack / Γ, median over examples and "
                                     "classes"), ("ratio_max", "attack / Γ, largest"))):
        colour, marker = site_style(3 + i)
        pts = [(r["level"], r[key]) for r in recs if r.get(key) is not None]
        right.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour,
                   label=lab)
    right.axhline(1.0, color="0.3", lw=1, ls=":", label="attack = Γ (a sound bound stays below)")
    top = max([1.0] + [r["ratio_max"] for r in recs if r.get("ratio_max") is not None])
    right.set_ylim(0.0, 1.08 * top)
    set_level_ticks(right, levels)
    right.set_xlabel(_budget_label(recs), fontsize=9)
    right.set_ylabel("attack / Γ (data form)", fontsize=9)
    right.set_title("how much of the bound the attack reaches", fontsize=10)
    right.grid(alpha=0.3)
    handles, labels = [], []
    for ax in (left, right):
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    # Two columns: the left panel's lines, then the right panel's.
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{analysis['name']}: margin change under weight perturbation of "
                 f"{recs[0]['site']}", fontsize=10)
    return save_figure(run_dir, f"{analysis['name']}_bound.png", fig)


def _accuracy_figure(run_dir: Path, analysis: dict, recs: list[dict]) -> str:
    fig = Figure(figsize=(7.2, 4.6), layout="constrained")
    ax = fig.add_subplot()
    levels = [r["level"] for r in recs]
    n = int(recs[0].get("num_examples", analysis.get("num_examples", 0)))
    clean = recs[0]["accuracy_clean"]
    ax.axhline(clean, color="0.4", lw=1, ls=":", label=f"clean accuracy ({clean:.3f})")
    series = (("certified_data", "certified, data form"),
              ("certified_product", "certified, product form"),
              ("accuracy_random", f"random perturbations ({recs[0].get('samples', '?')} draws)"),
              ("accuracy_attacked", "under attack"))
    for i, (key, lab) in enumerate(series):
        colour, marker = site_style(i)
        ys = [r[key] for r in recs]
        ax.errorbar(levels, ys, yerr=[binomial_halfwidth(p, n) for p in ys], marker=marker,
                    color=colour, capsize=2, ms=4, label=lab)
    set_level_ticks(ax, levels)
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel(_budget_label(recs), fontsize=9)
    ax.set_ylabel(f"accuracy (95% interval, {n} examples)", fontsize=9)
    ax.set_title(f"{analysis['name']}: accuracy when {recs[0]['site']} move", fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8,
               frameon=False)
    return save_figure(run_dir, f"{analysis['name']}_accuracy.png", fig)


def _radius_figure(run_dir: Path, analysis: dict, recs: list[dict]) -> str:
    fig = Figure(figsize=(max(5.6, 1.2 * len(recs) + 2.4), 4.4), layout="constrained")
    ax = fig.add_subplot()
    pos = np.arange(len(recs))
    values = []
    for i, (key, lab) in enumerate((("radius_data_median", "data form"),
                                    ("radius_product_median", "product form"))):
        ys = [r[key] if r.get(key) is not None else 0.0 for r in recs]
        values += ys
        ax.bar(pos + (i - 0.5) * 0.38, ys, width=0.38, color=site_style(i)[0], label=lab)
    set_name_ticks(ax, pos, [r["site"] for r in recs], fig.get_figwidth() - 1.2)
    if values and min(values) > 0:
        set_log_ticks(ax, "y")
    relative = recs[0].get("relative", True)
    ax.set_ylabel("median certified radius ε" + (" (× ‖W_k‖_∞)" if relative else ""),
                  fontsize=9)
    ax.set_title(f"{analysis['name']}: how far each layer alone can move", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8,
               frameon=False)
    return save_figure(run_dir, f"{analysis['name']}_radius.png", fig)


def figures(run_dir: Path, analysis: dict) -> list[str]:
    """Bound vs attack vs ε, accuracies vs ε, certified radius per layer.

    Args:
      run_dir: the run directory (figures go to ``figures/``).
      analysis: the saved analysis entry.

    Returns:
      The file names written.
    """
    budget, radius = _of(analysis, "budget"), _of(analysis, "radius")
    made = []
    if budget:
        made.append(_bound_figure(run_dir, analysis, budget))
        made.append(_accuracy_figure(run_dir, analysis, budget))
    if radius:
        made.append(_radius_figure(run_dir, analysis, radius))
    return made


def markdown(analysis: dict, figs: list[str]) -> str:
    """The report section: what the bound is, the tables, the soundness line.

    Args:
      analysis: the saved analysis entry.
      figs: the figure file names.

    Returns:
      Markdown text.
    """
    budget, radius = _of(analysis, "budget"), _of(analysis, "radius")
    gens = _of(analysis, "generalization")
    gen = gens[0] if gens else None
    site = budget[0]["site"] if budget else "the listed layers"
    dtype = budget[0].get("dtype", "float32") if budget else "float32"
    tol = SOUNDNESS_TOLERANCE.get(dtype, 1e-3)
    lines = [
        f"## {analysis['name']} (weight-perturbation margins)", "",
        f"Perturbing {site} by ΔW_k with ‖ΔW_k‖_∞ ≤ "
        + ("ε·‖W_k‖_∞" if (budget[0].get("relative", True) if budget else True) else "ε")
        + " (‖·‖_∞ the max row ℓ1 sum; biases fixed), every margin f_y − f_j moves by at "
        "most Γ_j. The bound's form is derived in jaxsens (DESIGN §3.3, after Tsai et al. "
        "2021) and sound (the proof is in `jaxsens.bounds`); it does not use the paper's "
        "constants. The **data** form uses the clean hidden activations, the **product** "
        "form only ‖x‖_∞ and the norms of the weights. The attack is projected gradient "
        "ascent over the budget (a Frank–Wolfe start plus random boundary starts), one per "
        "example and class; attack / Γ ≤ 1 is the soundness check, and how close it comes "
        "to 1 says how tight the bound is. A prediction is **certified** when "
        "f_y − f_j > Γ_j for every j ≠ y.",
        "",
    ]
    ratio = soundness(analysis)
    if ratio is not None:
        verdict = (f": sound (≤ 1 up to {dtype} rounding, tolerance {tol:g})"
                   if ratio <= 1 + tol else
                   " > 1: **the attack exceeds the bound: it is violated**")
        lines += [f"**Soundness:** the largest attack / Γ over every ε, example and class is "
                  f"{ratio:.6g}{verdict}.", ""]
    if budget:
        n, na = budget[0]["num_examples"], budget[0]["num_attacked"]
        lines += [
            f"Bounds and the attack are means over the first {na} examples of max_j (the "
            f"largest change over classes); accuracies are over all {n} examples. "
            "*Under attack* counts an example as broken when the untargeted attack or one of "
            "its per-class attacks flips it; R(ε) is the Rademacher term of the perturbed "
            "class (below).", "",
            "| ε | Γ data | Γ product | attack | attack/Γ median | attack/Γ max | certified "
            "(data) | certified (product) | clean | random | attacked | R(ε) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in budget:
            lines.append(
                f"| {r['level']:g} | {num(r['bound_data_attacked'])} | "
                f"{num(r['bound_product_attacked'])} | {num(r['attack'])} | "
                f"{num(r['ratio_median'], '{:.3f}')} | {num(r['ratio_max'], '{:.3f}')} | "
                f"{num(r['certified_data'], '{:.3f}')} | "
                f"{num(r['certified_product'], '{:.3f}')} | "
                f"{num(r['accuracy_clean'], '{:.3f}')} | "
                f"{num(r['accuracy_random'], '{:.3f}')} | "
                f"{num(r['accuracy_attacked'], '{:.3f}')} | {num(r['rademacher'])} |")
        lines.append("")
    if radius:
        lines += ["**How far can each layer alone move?** The median over examples of the "
                  "certified radius: the largest ε for which the prediction stays certified "
                  "when only that layer moves (0 for a misclassified example).", "",
                  "| dense layer | weight | ‖W_k‖_∞ | median radius (data) | quartiles (data) "
                  "| median radius (product) |", "|---|---|---|---|---|---|"]
        for r in radius:
            lines.append(f"| {r['layer']} | {r['site']} | {num(r['linf_norm'])} | "
                         f"{num(r['radius_data_median'])} | {num(r['radius_data_q25'])} – "
                         f"{num(r['radius_data_q75'])} | {num(r['radius_product_median'])} |")
        lines.append("")
    if gen is not None:
        if gen.get("complexity") is not None:
            lines += [
                f"**Generalization term.** The Rademacher-complexity bound of Golowich, "
                f"Rakhlin & Shamir (2018, Theorem 1), B (√(2d log 2) + 1) Π_k M_k / √m, with "
                f"the biases folded in as an extra constant input (derived in jaxsens), "
                f"evaluated on the analysed sample (m = {gen['num_examples']} test examples, "
                f"B = max ‖x‖₂ = {num(gen['input_radius'])}, d = {gen['depth']}): "
                f"{num(gen['complexity'])} for the trained network; R(ε) above is the same "
                "term for the class of its perturbations within the budget. The product "
                f"of the ℓ∞-operator norms Π_k ‖W_k‖_∞ is {num(gen['linf_product'])}.", ""]
        else:
            lines += [f"Generalization term not computed: {gen.get('skipped')}. Π_k ‖W_k‖_∞ = "
                      f"{num(gen['linf_product'])}.", ""]
    lines += [*[f"![{f}](figures/{f})" for f in figs], ""]
    return "\n".join(lines)


def summary(analysis: dict) -> list[str]:
    """Terminal rows: per ε, certified accuracy (data form), accuracy under attack and
    under random perturbations, and the Rademacher term of the perturbed class.

    Args:
      analysis: the saved analysis entry.

    Returns:
      One line per ε.
    """
    return [summary_row(analysis["name"], r["site"], f"{r['level']:g}",
                        num(r["certified_data"], "{:.3f}"),
                        num(r["accuracy_attacked"], "{:.3f}"),
                        num(r["accuracy_random"], "{:.3f}"), num(r["rademacher"], "{:.3g}"))
            for r in _of(analysis, "budget")]


KIND = AnalysisKind(WeightMargin, run, figures, markdown, summary,
                    ("layers", "ε", "certified", "attacked", "random", "R(ε)"))
