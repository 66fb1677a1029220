"""Noise at sites, three answers side by side: ``activation_noise``, ``weight_noise``,
``input_noise``.

Every site × level × estimator from :func:`jaxsens.profile`: the sampled E‖ΔF‖ with its
standard error, the linearized prediction, the certified bound (and for input noise the
analytic moments), the accuracy under noise, and the per-site sensitivity factor that
says which layers resist — broken down into its parts (the site's rms value and the
Jacobian norm to the output; for a dense weight, the layer input norm and the
pre-activation Jacobian norm), and, when the runner hands over the initialized model,
the same parts at initialization.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from pydantic import Field
from tqdm.auto import tqdm

from ..estimators import ESTIMATORS, profile
from ..paths import param
from ..schema import ConfigError, NoiseConfig, one_of
from ..sites import INPUT, PureModel, Structure, activations, split
from ._base import (
    AnalysisKind,
    Context,
    WithLevels,
    WithMoments,
    a_kind,
    check_moments_model,
    summary_row,
)
from ._report import (
    binomial_halfwidth,
    by_site_level,
    level_symbol,
    noise_label,
    num,
    save_figure,
    set_level_ticks,
    set_log_ticks,
    set_name_ticks,
    site_style,
    sites_in_order,
    wrap_name,
)

__all__ = ["ActivationNoise", "WeightNoise", "InputNoise", "KINDS"]


class _NoiseAnalysis(WithLevels, WithMoments):
    """Where the noise enters, its law, levels and estimators.

    Attributes:
      sites: ``"all"`` or a list of site names (activation sites, weight paths).
      noise: the law (its level is replaced by each of ``levels``).
      levels: noise levels ε (σ for absolute noise).
      headline: the level the summary, the per-site bar chart and the "why" paragraph
        speak of: the level of ``levels`` nearest it (default: nearest 10% for weight
        noise, nearest 5% otherwise), so that overriding ``levels`` keeps a config valid.
      samples: Monte Carlo draws per example.
      estimators: names from :data:`jaxsens.ESTIMATORS`.
      moments_method: the analytic moments' method (``input_noise``).
      split_at: the two-stage split site of the moments.
    """

    sites: Literal["all"] | list[str] = "all"
    noise: NoiseConfig | None = None
    headline: float | None = Field(None, ge=0, allow_inf_nan=False)
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

    def headline_level(self) -> float:
        """The headline level: ``headline``, or the level nearest the kind's default."""
        assert self.levels is not None  # check() ran first
        target = self.headline
        if target is not None:
            return min(self.levels, key=lambda v: abs(v - target))
        return _default_headline(self.kind, self.levels)

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


def _default_headline(kind: str, levels) -> float:
    """The level nearest 10% for weight noise, nearest 5% for the other kinds."""
    target = 0.1 if kind == "weight_noise" else 0.05
    return min(levels, key=lambda v: abs(v - target))


# ---------------------------------------------------------------------------------------
# The factor's parts


# Bytes of per-example Jacobians materialized at once by the decomposition.
_JACOBIAN_BYTES = 1 << 27


@functools.lru_cache(maxsize=64)
def _jacobian_norm_fn(struct: Structure, site: str):
    """Jitted ``(params, rest, xc) -> (chunk,)``: ‖∂F/∂site‖_F per example."""
    info = struct.site(site)

    def one(params, rest, x1):
        if info.kind == "weight":
            zero = jnp.zeros_like(param(params, info.path))
        else:
            zero = jnp.zeros(info.shape, x1.dtype)

        def f(d):
            return struct.apply_one(params, rest, x1, {site: d}).reshape(-1)

        jac = jax.jacrev(f)(zero)
        return jnp.sqrt(jnp.sum(jnp.square(jac)))

    return jax.jit(jax.vmap(one, in_axes=(None, None, 0)))


def _jacobian_norms(pm: PureModel, x: jax.Array, site: str) -> np.ndarray:
    """‖∂F/∂site‖_F of every example (float64), a memory-bounded chunk at a time."""
    struct = pm.structure
    size = pm.param(site).size if struct.site(site).kind == "weight" else struct.site(site).size
    per_example = max(1, math.prod(struct.output_shape) * size * 4)
    chunk = int(max(1, min(x.shape[0], _JACOBIAN_BYTES // per_example)))
    fn = _jacobian_norm_fn(struct, site)
    return np.concatenate([np.asarray(fn(pm.params, pm.rest, x[i:i + chunk]), np.float64)
                           for i in range(0, x.shape[0], chunk)])


def _bias_of(pm: PureModel, site: str) -> str | None:
    """The bias beside the 2-D kernel ``site`` (``.../kernel`` → ``.../bias`` of its output
    size), or None."""
    head, _, last = site.rpartition("/")
    if last != "kernel" or len(pm.site(site).shape) != 2:
        return None
    bias = f"{head}/bias" if head else "bias"
    try:
        info = pm.site(bias)
    except ValueError:
        return None
    return bias if info.kind == "weight" and info.shape == pm.site(site).shape[-1:] else None


def _geo(a: np.ndarray) -> float:
    """Geometric mean over examples (so that the parts multiply to the factor exactly)."""
    return float(np.exp(np.mean(np.log(np.maximum(a, np.finfo(np.float64).tiny)))))


def _norms(v) -> np.ndarray:
    """Per-example ℓ2 norms of a batch ``(batch, ...)``, float64."""
    a = np.asarray(v, np.float64)
    return np.sqrt(np.sum(np.square(a.reshape(a.shape[0], -1)), axis=1))


def decompose(pm: PureModel, x: jax.Array, site: str) -> dict[str, Any]:
    """The parts of the sensitivity factor ‖v‖·‖J‖_F/√n at ``site``.

    Activation and input sites: ``value_rms`` = ‖v‖/√n and ``jacobian_norm`` = ‖∂F/∂v‖_F.
    Weight sites: ``weight_rms`` = ‖W‖_F/√n and ``jacobian_norm`` = ‖∂F/∂W‖_F, and for a
    dense kernel with a bias the split ‖∂F/∂W‖_F = ‖h_in‖·‖∂F/∂z‖_F into ``input_norm``
    and ``downstream_norm``: for z = h_in W + b, ∂F/∂W = h_in ⊗ ∂F/∂z and ∂F/∂b = ∂F/∂z,
    so ‖∂F/∂z‖_F is the bias Jacobian's norm and ‖h_in‖ the ratio (exact for a dense
    layer applied to one vector per example). Every per-example part is summarized by its
    geometric mean over the examples, so the parts multiply exactly to ``factor_geo``.

    Args:
      pm: the split model.
      x: the inputs ``(batch, ...)``, of the model's input size per example.
      site: an input, activation or weight site.

    Returns:
      ``{part: value}`` as above (floats).
    """
    info = pm.site(site)
    x = jnp.asarray(x).reshape(x.shape[0], *pm.structure.input_shape)  # e.g. images → flat
    jn = _jacobian_norms(pm, x, site)
    out: dict[str, Any] = {"jacobian_norm": _geo(jn)}
    if info.kind == "weight":
        w = np.asarray(pm.param(site), np.float64)
        w_rms = float(np.linalg.norm(w) / math.sqrt(w.size))
        out["weight_rms"] = w_rms
        factor = w_rms * jn
        bias = _bias_of(pm, site)
        if bias is not None:
            dn = _jacobian_norms(pm, x, bias)
            out.update(input_norm=_geo(jn / np.maximum(dn, np.finfo(np.float64).tiny)),
                       downstream_norm=_geo(dn))
    else:
        v = x if info.kind == "input" else activations(pm, x)[site]
        v_rms = _norms(v) / math.sqrt(info.size)
        out["value_rms"] = _geo(v_rms)
        factor = v_rms * jn
    out["factor_geo"] = _geo(factor)
    return out


def run(cfg: _NoiseAnalysis, ctx: Context) -> list[dict]:
    """One :func:`jaxsens.profile` per site (site ``j`` draws with ``fold_in(key, j)``),
    with the factor's parts per site; with ``ctx.initial_model`` (when the runner gives
    one) also the parts and the linearized prediction at initialization."""
    assert cfg.noise is not None and cfg.levels is not None
    pm = split(ctx.model, ctx.x)
    initial = ctx.initial_model
    pm0 = split(initial, ctx.x) if initial is not None and initial is not ctx.model else None
    names = cfg.resolve_sites(pm)
    law = cfg.noise.build()
    headline = cfg.headline_level()
    carrier = "linearized" if "linearized" in cfg.estimators else cfg.estimators[0]
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
            parts = decompose(pm, ctx.x, site)
            init: dict[float, dict] = {}
            if pm0 is not None:
                parts0 = {f"init_{k}": v for k, v in decompose(pm0, ctx.x, site).items()}
                lin0 = profile(pm0, ctx.x, noise=law, levels=cfg.levels,
                               estimators=["linearized"], **kw).to_records()
                init = {r["level"]: dict(parts0, init_predicted=r["mean"]) for r in lin0}
        except ValueError as err:
            raise ctx.error(err) from None
        for r in table.to_records():
            r["analysis"] = cfg.label
            r["headline"] = headline
            if r["estimator"] == carrier:
                r.update(parts)
                r.update(init.get(r["level"], {}))
            records.append(r)
        # What could not run is reported, never dropped silently.
        records += [dict(sk, analysis=cfg.label, skipped=sk.pop("reason"))
                    for sk in table.skipped()]
    return records


# ---------------------------------------------------------------------------------------
# Reading saved records


def _measured(records) -> list[dict]:
    return [r for r in records if "skipped" not in r]


def _headline(analysis: dict, recs: list[dict], levels: list[float]) -> float | None:
    """The analysis's headline level (saved on its records; else the kind's default)."""
    saved = [r["headline"] for r in recs if r.get("headline") is not None]
    if not levels:
        return None
    target = saved[0] if saved else _default_headline(analysis["kind"], levels)
    return min(levels, key=lambda v: abs(v - target))


def _parts(recs: list[dict], sites: list[str]) -> dict[str, dict]:
    """``{site: record carrying the factor's parts}`` (sites without parts left out)."""
    out: dict[str, dict] = {}
    for r in recs:
        if r["site"] in sites and r["site"] not in out and "factor_geo" in r:
            out[r["site"]] = r
    return out


def _factors(recs, sites) -> dict[str, float]:
    """The linearized estimator's factor per site (its mean over examples)."""
    out = {}
    for s in sites:
        lin = [r for r in recs if r["site"] == s and r["estimator"] == "linearized"]
        if lin and lin[0].get("factor") is not None and math.isfinite(lin[0]["factor"]):
            out[s] = lin[0]["factor"]
    return out


def _law_name(recs: list[dict]) -> str:
    return recs[0]["law"].rsplit(" ", 1)[0] if recs else ""


def _site_kind(analysis: dict, recs: list[dict]) -> str:
    if recs and recs[0].get("kind"):
        return recs[0]["kind"]
    return {"weight_noise": "weight", "input_noise": "input"}.get(analysis["kind"], "activation")


def _factor_is_per_unit(law: str) -> bool:
    """Whether rms ‖Jη‖ = level · factor exactly under this law."""
    return law.startswith("relative-norm") or law.startswith("weight-relative(frobenius)")


def _part_columns(kind: str, law: str, parts: dict[str, dict]) -> list[tuple[str, str]]:
    """``[(key, label)]`` of the factor's parts for this site kind (factor last)."""
    sym = level_symbol(law)
    if kind == "weight":
        cols = [("weight_rms", "‖W‖_F/√n (rms weight)")]
        if parts and all("input_norm" in p for p in parts.values()):
            cols += [("input_norm", "‖h_in‖ (layer input)"),
                     ("downstream_norm", "‖∂F/∂z‖_F (pre-activation → output)")]
        else:
            cols += [("jacobian_norm", "‖∂F/∂W‖_F (weight → output)")]
    else:
        v = "x" if kind == "input" else "h"
        jac = f"‖J‖_F ({kind} → output)"
        if sym == "σ":
            jac = "‖J‖_F = rms ‖ΔF‖ per unit σ"
        cols = [("value_rms", f"‖{v}‖/√n (rms value)"), ("jacobian_norm", jac)]
    what = f"rms ‖ΔF‖ per unit {sym}" if _factor_is_per_unit(law) else "product"
    return [*cols, ("factor_geo", f"factor = {what}")]


# ---------------------------------------------------------------------------------------
# Figures


def _deviation_figure(name: str, kind: str, law: str, sites: list[str], levels: list[float],
                      table: dict) -> Figure:
    """One small panel per site (sampled with its 5–95% band, predicted, moments), and
    the certified bound on a panel of its own below, in log scale."""
    ncol = min(4, len(sites))
    nrow = -(-len(sites) // ncol)
    bounds = {s: [(lv, table[(s, lv)]["bound"]["upper"]) for lv in levels
                  if (s, lv) in table and "bound" in table[(s, lv)]] for s in sites}
    has_bound = any(bounds.values())
    fig = Figure(figsize=(max(6.4, 2.5 * ncol + 1.9), 2.4 * nrow + (2.8 if has_bound else 0)
                          + 1.2), layout="constrained")
    gs = fig.add_gridspec(nrow + has_bound, ncol,
                          height_ratios=[1.0] * nrow + ([1.15] if has_bound else []))
    first = None
    for i, s in enumerate(sites):
        ax = fig.add_subplot(gs[i // ncol, i % ncol], sharex=first, sharey=first)
        first = first or ax
        color, marker = site_style(i)
        lv = [v for v in levels if (s, v) in table]
        rows = [table[(s, v)] for v in lv]
        smp = [r.get("sampled") for r in rows]
        if lv and all(smp):
            if all("q05" in r and "q95" in r for r in smp):
                ax.fill_between(lv, [r["q05"] for r in smp], [r["q95"] for r in smp],
                                color=color, alpha=0.18, linewidth=0,
                                label="5–95% of draws")
            ax.plot(lv, [r["mean"] for r in smp], "-", marker=marker, ms=4, color=color,
                    label="sampled (Monte Carlo mean)")
        for est, style, label in (("linearized", "--", "predicted (linearized)"),
                                  ("moments", ":", "analytic moments")):
            got = [r.get(est) for r in rows]
            if lv and all(got):
                ax.plot(lv, [r["mean"] for r in got], style, color="0.15", lw=1.3,
                        marker="x" if est == "moments" else None, ms=5, label=label)
        ax.set_title(wrap_name(s if kind == "weight" else f"{kind} site {s}", 26), fontsize=9)
        ax.grid(alpha=0.3, which="major")
        if i % ncol:
            ax.tick_params(labelleft=False)
        else:
            ax.set_ylabel("E‖ΔF‖", fontsize=9)
        if has_bound and i >= len(sites) - ncol:
            ax.set_xlabel(level_symbol(law), fontsize=9)
        ax.tick_params(labelsize=8)
    assert first is not None
    set_level_ticks(first, levels)
    set_log_ticks(first, "y")
    handles, labels = first.get_legend_handles_labels()
    if has_bound:
        bax = fig.add_subplot(gs[nrow, :])
        lo, hi = math.inf, 0.0
        for i, s in enumerate(sites):
            color, marker = site_style(i)
            pts = bounds[s]
            if pts:
                bax.plot([p[0] for p in pts], [p[1] for p in pts], "-", marker=marker, ms=4,
                         color=color, label=s)
            smp_pts = [(v, table[(s, v)]["sampled"]["mean"]) for v, _ in pts
                       if "sampled" in table[(s, v)]]
            for (_, b), (_, m) in zip(pts, smp_pts, strict=False):
                if m > 0:
                    lo, hi = min(lo, b / m), max(hi, b / m)
        set_level_ticks(bax, levels)
        set_log_ticks(bax, "y")
        bax.grid(alpha=0.3, which="major")
        bax.set_ylabel("bound on E‖ΔF‖", fontsize=9)
        bax.tick_params(labelsize=8)
        ratio = f": {lo:.3g}–{hi:.3g}× the sampled mean" if hi > 0 else ""
        bax.set_title(f"certified bound (own log scale){ratio}", fontsize=9)
        bax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8,
                   title="site", title_fontsize=8, frameon=False)
        bax.set_xlabel(noise_label(kind, law), fontsize=9)
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(handles)),
                   fontsize=8, frameon=False)
    else:
        # Constrained layout does not stack a figure legend below a figure x label.
        fig.supxlabel(noise_label(kind, law), fontsize=9)
        fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"{name}: mean output change E‖F(noisy) − F‖ with noise at one {kind} site",
                 fontsize=10)
    return fig


def _factor_figure(name: str, kind: str, law: str, sites: list[str],
                   parts: dict[str, dict], factors: dict[str, float]) -> Figure | None:
    """The factor per site broken into its parts, trained and (when saved) initialized."""
    shown = [s for s in sites if s in parts]
    if not shown:
        if not factors:
            return None
        shown = list(factors)
        cols = [("factor", "factor ‖v‖·‖J‖_F/√n (mean over examples)")]
        parts = {s: {"factor": factors[s]} for s in shown}
    else:
        cols = _part_columns(kind, law, parts)
    has_init = all(f"init_{cols[-1][0]}" in parts[s] for s in shown)
    fig = Figure(figsize=(max(6.4, 2.55 * len(cols) + 0.4), 3.9), layout="constrained")
    pos = np.arange(len(shown))
    for j, (key, label) in enumerate(cols):
        ax = fig.add_subplot(1, len(cols), j + 1)
        ax.plot(pos, [parts[s][key] for s in shown], "-o", color=site_style(0)[0], ms=5,
                label="trained")
        if has_init:
            ax.plot(pos, [parts[s][f"init_{key}"] for s in shown], "--s", color="0.45",
                    mfc="none", ms=5, label="at initialization")
        ax.set_xlim(-0.5, len(shown) - 0.5)
        set_log_ticks(ax, "y")
        set_name_ticks(ax, pos, shown, 2.2)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_title(label, fontsize=8.5)
        ax.grid(alpha=0.3, which="major")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    v = {"input": "x", "activation": "h"}.get(kind, "v")
    formula = ("factor = ‖W‖_F/√n · ‖h_in‖ · ‖∂F/∂z‖_F" if any(k == "input_norm" for k, _ in cols)
               else "factor = ‖W‖_F/√n · ‖∂F/∂W‖_F" if kind == "weight"
               else f"factor = ‖{v}‖/√n · ‖J‖_F")
    fig.suptitle(f"{name}: why {kind} sites differ — {formula}\n(geometric means over "
                 "the examples, so the parts multiply to the factor)", fontsize=9.5)
    return fig


def _headline_figure(name: str, kind: str, law: str, sites: list[str], table: dict,
                     at: float) -> Figure | None:
    """E‖ΔF‖ per site at the headline level: sampled (95% interval) and predicted side
    by side (and predicted at initialization when saved); the bound on its own axis."""
    rows = {s: table[(s, at)] for s in sites if (s, at) in table}
    if not rows:
        return None
    shown = list(rows)
    sym = level_symbol(law)

    def value(s, est, key="mean"):
        r = rows[s].get(est)
        return None if r is None or r.get(key) is None else r[key]

    init = {s: next((r["init_predicted"] for r in rows[s].values() if "init_predicted" in r),
                    None) for s in shown}
    bars: list[tuple[str, str, str, str | None]] = [
        ("sampled", "sampled (95% interval)", site_style(0)[0], None),
        ("linearized", "predicted (linearized)", site_style(1)[0], None),
        ("moments", "analytic moments", site_style(2)[0], None)]
    bars = [b for b in bars if any(value(s, b[0]) is not None for s in shown)]
    series = [(label, color, hatch, [value(s, est) for s in shown])
              for est, label, color, hatch in bars]
    if any(v is not None for v in init.values()):
        series.append(("predicted at initialization", "0.75", "//",
                       [init[s] for s in shown]))
    has_bound = any(value(s, "bound", "upper") is not None for s in shown)
    width_in = max(6.4, 0.55 * len(shown) * max(1, len(series)) + (3.6 if has_bound else 1.5))
    fig = Figure(figsize=(width_in, 4.2), layout="constrained")
    gs = fig.add_gridspec(1, 2 if has_bound else 1, width_ratios=[2.2, 1] if has_bound else [1])
    ax = fig.add_subplot(gs[0, 0])
    pos = np.arange(len(shown))
    w = 0.8 / max(1, len(series))
    for k, (label, color, hatch, vals) in enumerate(series):
        x = pos + (k - (len(series) - 1) / 2) * w
        y = [np.nan if v is None else v for v in vals]
        err = None
        if label.startswith("sampled"):
            err = [1.96 * (value(s, "sampled", "stderr") or 0.0) for s in shown]
        ax.bar(x, y, w, color=color, hatch=hatch, edgecolor="0.3" if hatch else None,
               linewidth=0.6 if hatch else 0, label=label, yerr=err, capsize=2,
               error_kw={"elinewidth": 1})
    set_name_ticks(ax, pos, shown, (width_in - 1.2) * (0.69 if has_bound else 1.0))
    ax.tick_params(axis="y", labelsize=8)
    ax.set_ylabel(f"E‖ΔF‖ at {sym} = {at:g}", fontsize=9)
    ax.set_title("sampled vs predicted", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    if has_bound:
        bax = fig.add_subplot(gs[0, 1])
        up = [value(s, "bound", "upper") for s in shown]
        bax.bar(pos, [np.nan if v is None else v for v in up], 0.6, color="0.55",
                label="certified bound")
        ref = [value(s, "sampled") for s in shown]
        if any(v is not None for v in ref):  # the data on the same log axis, for scale
            bax.plot(pos, [np.nan if v is None else v for v in ref], "D", color=site_style(0)[0],
                     ms=5, label="sampled (for scale)")
        set_log_ticks(bax, "y")
        set_name_ticks(bax, pos, shown, (width_in - 1.2) * 0.31)
        bax.tick_params(axis="y", labelsize=8)
        bax.set_title("certified bound (own log scale)", fontsize=9)
        bax.grid(alpha=0.3, axis="y", which="major")
    handles, labels = [], []
    for a in fig.axes:
        for h, lab in zip(*a.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(handles)),
               fontsize=8, frameon=False)
    fig.suptitle(f"{name}: output change per {kind} site at {sym} = {at:g}", fontsize=10)
    return fig


def _accuracy_figure(name: str, kind: str, law: str, sites: list[str], levels: list[float],
                     table: dict, clean: float | None, n: int | None) -> Figure | None:
    """Accuracy vs level per site with 95% binomial intervals, and the clean accuracy."""
    acc = {s: [(lv, table[(s, lv)]["sampled"].get("accuracy")) for lv in levels
               if (s, lv) in table and "sampled" in table[(s, lv)]] for s in sites}
    acc = {s: [(lv, a) for lv, a in pts if a is not None and math.isfinite(a)]
           for s, pts in acc.items()}
    if not any(acc.values()):
        return None
    n = n or max((r.get("num_examples", 0) for row in table.values() for r in row.values()),
                 default=0)
    fig = Figure(figsize=(7.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    lo, hi = math.inf, -math.inf
    if clean is not None:
        hw = binomial_halfwidth(clean, n)
        ax.axhspan(clean - hw, clean + hw, color="0.88", lw=0, label="clean: 95% interval")
        ax.axhline(clean, color="0.25", lw=1.2, label=f"clean accuracy {clean:.3f}")
        lo, hi = clean - hw, clean + hw
    positive = [v for v in levels if v > 0]
    span = math.log10(max(positive) / min(positive)) if len(positive) > 1 else 1.0
    for i, s in enumerate(sites):
        pts = acc.get(s) or []
        if not pts:
            continue
        color, marker = site_style(i)
        shift = 10 ** ((i - (len(sites) - 1) / 2) * 0.012 * span) if positive else 1.0
        xs = [lv * shift if lv > 0 else lv for lv, _ in pts]
        ys = [a for _, a in pts]
        err = [binomial_halfwidth(a, n) for a in ys]
        ax.errorbar(xs, ys, yerr=err, fmt="-", marker=marker, ms=4, color=color, lw=1,
                    capsize=2, label=s)
        lo = min(lo, *(y - e for y, e in zip(ys, err, strict=True)))
        hi = max(hi, *(y + e for y, e in zip(ys, err, strict=True)))
    set_level_ticks(ax, levels)
    pad = max(0.08 * (hi - lo), 0.5 / max(n, 1))
    ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel(noise_label(kind, law), fontsize=9)
    ax.set_ylabel(f"accuracy on {n} test examples", fontsize=9)
    ax.set_title(f"{name}: accuracy under noise (bars: 95% binomial interval, n = {n};\n"
                 f"points of different sites shifted sideways to stay apart)", fontsize=9.5)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    return fig


def figures(run_dir: Path, analysis: dict) -> list[str]:
    """Deviation vs level (one panel per site, the bound on its own panel), the factor's
    parts per site, E‖ΔF‖ per site at the headline level, and accuracy under noise."""
    recs = _measured(analysis["records"])
    if not recs:
        return []
    sites = sites_in_order(recs)
    table = by_site_level(recs)
    levels = sorted({r["level"] for r in recs})
    name = analysis["name"]
    law = recs[0]["law"]
    kind = _site_kind(analysis, recs)
    at = _headline(analysis, recs, levels)
    made = [save_figure(run_dir, f"{name}_deviation.png",
                        _deviation_figure(name, kind, law, sites, levels, table))]
    fig = _factor_figure(name, kind, law, sites, _parts(recs, sites), _factors(recs, sites))
    if fig is not None:
        made.append(save_figure(run_dir, f"{name}_factor.png", fig))
    if at is not None:
        fig = _headline_figure(name, kind, law, sites, table, at)
        if fig is not None:
            made.append(save_figure(run_dir, f"{name}_headline.png", fig))
    fig = _accuracy_figure(name, kind, law, sites, levels, table,
                           analysis.get("clean_accuracy"), analysis.get("num_examples"))
    if fig is not None:
        made.append(save_figure(run_dir, f"{name}_accuracy.png", fig))
    return made


# ---------------------------------------------------------------------------------------
# Report


def _ratio_text(a: dict, b: dict, cols: list[tuple[str, str]]) -> str:
    """``factor ×r = part1 ×r1 · part2 ×r2`` from record ``a`` to record ``b``."""
    def r(key):
        return b[key] / a[key] if a.get(key) else math.nan

    parts = " · ".join(f"{label.split(' (')[0]} ×{r(key):.3g}" for key, label in cols[:-1])
    return f"×{r(cols[-1][0]):.3g} = {parts}"


def _prefixed(rec: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in rec.items() if k.startswith(prefix)}


def _order_verdict(values: dict[str, float], alike: float = 0.1) -> str:
    """Whether the earliest site changes the output least, from values in depth order
    (sites within ``alike`` of each other, relatively, are called alike)."""
    names = list(values)
    if len(names) < 2:
        return "cannot be judged from one site"
    vals = [values[s] for s in names]
    lo = min(names, key=values.__getitem__)
    spread = max(vals) / min(vals) if min(vals) > 0 else math.inf
    if spread < 1 + alike:
        return (f"**cannot be judged**: the sites are within {100 * alike:.0f}% of each "
                f"other (largest / smallest = {spread:.3g})")
    if all(a <= b for a, b in zip(vals, vals[1:], strict=False)):
        return f"**holds**: E‖ΔF‖ grows with depth (last / first = {vals[-1] / vals[0]:.3g})"
    if lo == names[0]:
        return f"**holds in part**: {names[0]} is the most resistant, but not monotonically"
    return (f"**does not hold**: the most resistant site is {lo}, not {names[0]} "
            f"(largest / smallest = {spread:.3g})")


def _dominant(a: dict, b: dict, cols: list[tuple[str, str]]) -> str:
    """Which part changes most (in log terms) from record ``a`` to record ``b``."""
    ratios = {label.split(" (")[0]: b[key] / a[key] for key, label in cols[:-1]
              if a.get(key) and b.get(key)}
    if not ratios:
        return ""
    name = max(ratios, key=lambda k: abs(math.log(ratios[k])))
    up = [k for k, r in ratios.items() if r > 1.05]
    down = [k for k, r in ratios.items() if r < 1 / 1.05]
    if up and down:
        return (f" {' and '.join(up)} grow{'s' if len(up) == 1 else ''} while "
                f"{' and '.join(down)} shrink{'s' if len(down) == 1 else ''}; the largest change "
                f"is {name} (×{ratios[name]:.3g}).")
    return f" The largest change is {name} (×{ratios[name]:.3g})."


def _why(analysis: dict, recs: list[dict], sites: list[str], table: dict, at: float | None,
         kind: str, law: str) -> list[str]:
    """The decomposition table and the depth / initialization paragraph."""
    parts = _parts(recs, sites)
    factors = _factors(recs, sites)
    lines: list[str] = []
    sym = level_symbol(law)
    if len(factors) > 1:
        lo = min(factors, key=factors.__getitem__)
        hi = max(factors, key=factors.__getitem__)
        per_unit = (f"the mean-square output change is {sym}² · factor²"
                    if _factor_is_per_unit(law) else
                    "the output change grows with factor = ‖v‖·‖J‖_F/√n (for this law the "
                    f"rms per unit {sym} is not exactly the factor"
                    + ("; it is ‖J‖_F for absolute noise)" if sym == "σ" else ")"))
        lines += [
            f"**Which sites are resistant, and why.** To first order {per_unit}, with factor = "
            "‖v‖·‖J‖_F/√n: the site's root-mean-square value times the Frobenius norm of the "
            "Jacobian from the site to the output. "
            f"Here the most resistant site is **{lo}** (factor {factors[lo]:.4g}) and the "
            f"most sensitive is **{hi}** (factor {factors[hi]:.4g}), a ratio of "
            f"{factors[hi] / factors[lo]:.3g}.", ""]
    if not parts:
        if factors:
            lines += ["| site | factor |", "|---|---|",
                      *[f"| {s} | {f:.4g} |" for s, f in factors.items()], ""]
        return lines
    cols = _part_columns(kind, law, parts)
    shown = [s for s in sites if s in parts]
    has_init = all("init_factor_geo" in parts[s] for s in shown)
    head = "| site | " + " | ".join(label for _, label in cols)
    sep = "|---|" + "---|" * len(cols)
    if has_init:
        head += " | at init: " + " | at init: ".join(label.split(" (")[0] for _, label in cols)
        sep += "---|" * len(cols)
    lines += ["Its parts per site (geometric means over the examples, so that they multiply "
              "to the factor exactly; the arithmetic means quoted above are slightly larger):",
              "", head + " |", sep]
    for s in shown:
        p = parts[s]
        cells = [num(p.get(k)) for k, _ in cols]
        if has_init:
            cells += [num(p.get(f"init_{k}")) for k, _ in cols]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("")
    if at is None:
        return lines
    measured = {s: table[(s, at)]["sampled"]["mean"] for s in shown
                if (s, at) in table and "sampled" in table[(s, at)]}
    predicted = {s: table[(s, at)]["linearized"]["mean"] for s in shown
                 if (s, at) in table and "linearized" in table[(s, at)]}
    values, what = (measured, "sampled") if len(measured) == len(shown) else (predicted,
                                                                               "predicted")
    if len(values) == len(shown) and len(shown) > 1:
        listed = ", ".join(f"{s} {values[s]:.4g}" for s in shown)
        first, last = parts[shown[0]], parts[shown[-1]]
        lines += [f"**Do early layers resist?** At {sym} = {at:g} the {what} E‖ΔF‖ per site, in "
                  f"depth order: {listed}. \"Early layers resist\" {_order_verdict(values)}. "
                  f"Why, from {shown[0]} to {shown[-1]}: factor {_ratio_text(first, last, cols)}."
                  + _dominant(first, last, cols), ""]
    init = {s: next((r["init_predicted"] for r in table.get((s, at), {}).values()
                     if "init_predicted" in r), None) for s in shown}
    if has_init and all(v is not None for v in init.values()) and len(shown) > 1:
        listed = ", ".join(f"{s} {init[s]:.4g}" for s in shown)
        changes = "; ".join(
            f"{s} {_ratio_text(_prefixed(parts[s], 'init_'), parts[s], cols)}" for s in shown)
        now = predicted if len(predicted) == len(shown) else values  # like with like
        grown = {s: now[s] / v for s, v in init.items() if s in now and v}
        scale = (f" Training multiplied the output change by ×{min(grown.values()):.3g} "
                 f"({min(grown, key=grown.__getitem__)}) to ×{max(grown.values()):.3g} "
                 f"({max(grown, key=grown.__getitem__)})." if grown else "")
        verdict0 = _order_verdict({s: float(v) for s, v in init.items() if v is not None})
        lines += [f"**The same network at initialization** (before training; linearized "
                  f"prediction at {sym} = {at:g}): {listed}. At initialization \"early layers "
                  f"resist\" {verdict0}.{scale} Factor and parts, trained / initial: "
                  f"{changes}.", ""]
    elif not has_init:
        lines += ["(The initialized model was not available to this analysis, so the "
                  "comparison with initialization is left out.)", ""]
    return lines


def _attack_cells(row: dict) -> str:
    att, bnd = row.get("attack"), row.get("bound")
    lower = att and att.get("lower")
    ratio = (bnd["upper"] / lower) if bnd and lower else None
    return f" {num(lower)} | {num(ratio, '{:.2f}')}{'×' if ratio else ''} |"


def markdown(analysis: dict, figs: list[str]) -> str:
    """The table of sampled / predicted / bound per site and level, and the "why"."""
    recs = _measured(analysis["records"])
    skipped = [r for r in analysis["records"] if "skipped" in r]
    clean_acc = analysis.get("clean_accuracy")
    table = by_site_level(recs)
    sites = sites_in_order(recs)
    levels = sorted({r["level"] for r in recs})
    law = recs[0]["law"] if recs else ""
    sym = level_symbol(law)
    kind = _site_kind(analysis, recs)
    at = _headline(analysis, recs, levels)
    lines = [f"## {analysis['name']} ({analysis['kind']}, {_law_name(recs)})", ""]
    if at is not None:
        lines += [f"Headline level: {sym} = {at:g} ({noise_label(kind, law)}).", ""]
    has_mom = any(r["estimator"] == "moments" for r in recs)
    has_att = any(r["estimator"] == "attack" for r in recs)
    lines += [
        f"| site | {sym} | sampled E‖ΔF‖ ± se | predicted | sampled/predicted | bound | "
        "bound/sampled | accuracy | flip rate |" + (" moments (analytic) |" if has_mom else "")
        + (" attack (worst found) | bound/attack |" if has_att else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if has_mom else "")
        + ("---|---|" if has_att else ""),
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
                + (_attack_cells(row) if has_att else "")
            )
    lines.append("")
    if has_att:
        lines += ["The attack (projected gradient ascent on ‖ΔF‖ in the law's ball, from the "
                  "top singular direction of the clean Jacobian) is a worst case from below, "
                  "the bound one from above: attack ≤ max ‖ΔF‖ ≤ bound. bound/attack says how "
                  "loose the certificate is; bound/sampled mixes a worst case with a typical "
                  "one.", ""]
    lines += _why(analysis, recs, sites, table, at, kind, law)
    if at is not None and clean_acc is not None:
        accs = {s: table[(s, at)]["sampled"].get("accuracy") for s in sites
                if (s, at) in table and "sampled" in table[(s, at)]}
        accs = {s: a for s, a in accs.items() if a is not None}
        if accs:
            n = analysis.get("num_examples")
            hw = binomial_halfwidth(clean_acc, n) if n else None
            listed = ", ".join(f"{s} {a:.3f}" for s, a in accs.items())
            lines += [f"Accuracy on the {n} analysed test examples: clean {clean_acc:.3f}"
                      + (f" (95% binomial interval ±{hw:.3f}, i.e. one example is "
                         f"{1 / n:.4f})" if hw is not None and n else "")
                      + f"; with noise at {sym} = {at:g} entering each site: {listed}.", ""]
    if skipped:
        lines += ["Not run: " + "; ".join(f"{r['estimator']} at {r['site']} ({r['skipped']})"
                                          for r in skipped) + ".", ""]
    lines += [f"![{f}](figures/{f})" for f in figs]
    lines.append("")
    return "\n".join(lines)


def summary(analysis: dict) -> list[str]:
    """One line per site at the analysis's headline level."""
    recs = _measured(analysis["records"])
    table = by_site_level(recs)
    levels = sorted({r["level"] for r in recs})
    lv = _headline(analysis, recs, levels)
    if lv is None:
        return []
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
