"""Phases of NIN training dynamics: decay-rate fits, phase labels, and the linear test problem.

The reconstruction under test (DESIGN §3.6, not the paper's text): averaging the loss over
the node's noise adds (σ²/2) θᵀHθ, so under SGD with learning rate η the coupling obeys
d log‖θ‖/dt = −η σ² λ_t with λ_t = θ̂ᵀ H θ̂ the curvature along θ. Its predictions, with
c = η σ² λ₀ (λ₀ at initialization) and T training steps:

* **decoupled** c·T < 1: the decay time 1/c exceeds the training, θ barely moves;
* **decay** c ≤ 2: ‖θ‖ decays, at rate c per step (decay time ∝ σ⁻²); the discrete step
  multiplies the readout component by 1 − c, so the exact per-step rate is −ln|1 − c|,
  which equals c only for c ≪ 1 (oscillating for 1 < c < 2);
* **catapult** 2 < c ≤ 4: the coupling first grows, the curvature falls until c < 2, then
  it decays (as the uv model of Lewkowycz et al. 2020, here with learning rate ησ²);
* **divergent** c > 4: the curvature grows with the coupling, training diverges.

These functions read recorded trajectories (NumPy, on the host); :func:`measured_phase`
labels what happened, :func:`predicted_phase` what the reconstruction says.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models import MLP
from ._node import attach

__all__ = ["PHASES", "MEASURED_PHASES", "LinearProblem", "linear_problem", "decay_window",
           "measured_decay_rate", "predicted_decay_rate", "measured_phase", "predicted_phase",
           "phase_table", "phase_findings"]

PHASES = ("decoupled", "decay", "catapult", "divergent")
"""The phases of the reconstruction, in the order they appear as σ grows."""

MEASURED_PHASES = (*PHASES, "collapsed")
"""What :func:`measured_phase` can report: the phases, and a network that died."""


class LinearProblem(NamedTuple):
    """The linear two-layer test problem of :func:`linear_problem`.

    Attributes:
      model: ``MLP(d, [m], 1, activation="identity")`` with a NIN feeding its first layer.
      x: inputs ``(n, d)``.
      y: targets ``(n,)``, the model's own clean outputs (a global minimum at the start).
      readout: the readout vector v (``(m,)``), along which θ₀ points.
    """

    model: nnx.Module
    x: jax.Array
    y: jax.Array
    readout: jax.Array


def linear_problem(key: jax.Array, *, input_dim: int = 16, width: int = 16, n: int = 256,
                   theta_scale: float = 0.1, sigma: float = 1.0, distribution: str = "gaussian",
                   resample: str = "step", dtype=jnp.float32) -> LinearProblem:
    """A linear two-layer network f(x) = v·(W x + b + σ ξ θ) + c at a minimum of its loss.

    Inputs x ~ N(0, I/d); the targets are the network's own clean outputs, so the clean
    loss starts at its global minimum and the node's noise is the only driver: the
    setting of the reconstruction, with the curvature along θ equal to ‖v‖² for the
    loss ½(f − y)². θ₀ = theta_scale · v/‖v‖ (along the readout: all of θ feels the
    noise; a θ₀ orthogonal to v would never move).

    Args:
      key: PRNG key of the inputs and the initial weights.
      input_dim: d.
      width: m, the hidden width.
      n: number of examples.
      theta_scale: ‖θ₀‖.
      sigma: the node's noise scale (a sweep overrides it).
      distribution: the law of ξ.
      resample: when ξ is redrawn.
      dtype: parameter and input dtype.

    Returns:
      A :class:`LinearProblem`.
    """
    k_x, k_w = jax.random.split(key)
    x = jax.random.normal(k_x, (n, input_dim), dtype) / math.sqrt(input_dim)
    base = MLP(input_dim, [width], 1, activation="identity", param_dtype=dtype,
               rngs=nnx.Rngs(params=k_w))
    v = base.layers[1].kernel.get_value()[:, 0]
    theta = theta_scale * v / jnp.linalg.norm(v)
    model = attach(base, "layers/0", key=key, theta=theta, sigma=sigma,
                   distribution=distribution, resample=resample)
    return LinearProblem(model, x, base(x)[:, 0], v)


def decay_window(norms: np.ndarray, *, efolds: float = 3.0) -> int:
    """The record at which ‖θ‖ has decayed by ``efolds`` e-folds (else the last finite one).

    Args:
      norms: ``(R,)`` recorded ‖θ‖.
      efolds: how many e-folds the window spans at most.

    Returns:
      The index ``w`` of the window's end record (0 if no later record is finite).
    """
    norms = np.asarray(norms, np.float64)
    finite = np.isfinite(norms)
    last = int(np.argmin(finite)) - 1 if not finite.all() else len(norms) - 1
    if last <= 0:
        return 0
    below = np.nonzero(norms[1:last + 1] < norms[0] * math.exp(-efolds))[0]
    return int(below[0]) + 1 if below.size else last


def measured_decay_rate(steps: np.ndarray, norms: np.ndarray, *, efolds: float = 3.0
                        ) -> float:
    """The average decay rate of ‖θ‖ per step over its decay window.

    ``−ln(‖θ_w‖/‖θ₀‖) / t_w`` with ``w`` from :func:`decay_window`: comparable with the
    window's mean of η σ² λ_t whatever the shape of the decay.

    Args:
      steps: ``(R,)`` the steps of the records.
      norms: ``(R,)`` ‖θ‖ at those steps.
      efolds: the window's depth (see :func:`decay_window`).

    Returns:
      The rate (negative if ‖θ‖ grew); NaN without a finite window.
    """
    w = decay_window(norms, efolds=efolds)
    norms = np.asarray(norms, np.float64)
    if w == 0 or not norms[0] > 0 or not norms[w] > 0:
        return float("nan")
    return float(-math.log(norms[w] / norms[0]) / float(steps[w] - steps[0]))


def predicted_decay_rate(norms: np.ndarray, curvature: np.ndarray, *, learning_rate: float,
                         sigma: float, efolds: float = 3.0) -> float:
    """The reconstruction's rate η σ² λ̄ over the same window as the measured rate.

    Args:
      norms: ``(R,)`` recorded ‖θ‖ (they fix the window, :func:`decay_window`).
      curvature: ``(R,)`` recorded λ_t, the curvature along θ.
      learning_rate: η.
      sigma: σ.
      efolds: the window's depth.

    Returns:
      η σ² times the mean of λ_t over the records before the window's end (λ₀ alone for
      an empty window); NaN if those are not finite.
    """
    w = decay_window(norms, efolds=efolds)
    lam = np.asarray(curvature, np.float64)[:max(w, 1)]
    if not np.isfinite(lam).all():
        return float("nan")
    return float(learning_rate * sigma**2 * lam.mean())


def measured_phase(norms: np.ndarray, *, clean_loss: np.ndarray | None = None,
                   chance_loss: float | None = None, readout: np.ndarray | None = None,
                   catapult_factor: float = 1.5, divergence_factor: float = 1e3) -> str:
    """The phase a recorded ‖θ‖ trajectory shows.

    In this order: ``"divergent"``: a non-finite record; ``"collapsed"`` (not a phase of
    the reconstruction): the final clean loss is still at least 90% of ``chance_loss``
    and θ no longer reaches the output (final ``readout`` below 10⁻⁶ of its largest
    value): the network died, e.g. every ReLU unit θ feeds; ``"divergent"``:
    a final ‖θ‖ above ``divergence_factor``·‖θ₀‖; ``"catapult"``: ‖θ‖ rose above
    ``catapult_factor``·‖θ₀‖ and came back finite; ``"decay"``: the final ‖θ‖ is below
    ‖θ₀‖/e; ``"decoupled"``: none of these (θ stayed within a factor e of where it
    started).

    Args:
      norms: ``(R,)`` recorded ‖θ‖.
      clean_loss: ``(R,)`` recorded clean loss (needed for ``"collapsed"``).
      chance_loss: the loss of a network that learnt nothing (ln k for cross-entropy
        over k classes); ``None``: never ``"collapsed"``.
      readout: ``(R,)`` recorded ‖Jθ‖ (default: not checked for ``"collapsed"``).
      catapult_factor: the growth that counts as a catapult.
      divergence_factor: the growth that counts as divergence.

    Returns:
      One of :data:`MEASURED_PHASES`.
    """
    norms = np.asarray(norms, np.float64)
    if not np.isfinite(norms).all():
        return "divergent"
    if clean_loss is not None and chance_loss is not None:
        final = float(np.asarray(clean_loss, np.float64)[-1])
        if not math.isfinite(final):
            return "divergent"
        dead = readout is None or (np.asarray(readout, np.float64)[-1]
                                   <= 1e-6 * np.nanmax(np.asarray(readout, np.float64)))
        if final >= 0.9 * chance_loss and dead:
            return "collapsed"
    if norms[-1] > divergence_factor * norms[0]:
        return "divergent"
    if norms.max() > catapult_factor * norms[0]:
        return "catapult"
    if norms[-1] < norms[0] / math.e:
        return "decay"
    return "decoupled"


def predicted_phase(rate: float, steps: int) -> str:
    """The phase the reconstruction predicts from c = η σ² λ₀.

    Args:
      rate: c, the predicted per-step decay rate at initialization.
      steps: the number of training steps T.

    Returns:
      ``"divergent"`` for c > 4, ``"catapult"`` for 2 < c ≤ 4, ``"decoupled"`` for
      c·T < 1, else ``"decay"``; ``"divergent"`` for a non-finite c.
    """
    if not math.isfinite(rate) or rate > 4:
        return "divergent"
    if rate > 2:
        return "catapult"
    if rate * steps < 1:
        return "decoupled"
    return "decay"


def _mode(labels: list[str]) -> str:
    """The most frequent label; ties go to the later one in :data:`MEASURED_PHASES`."""
    return max(labels, key=lambda p: (labels.count(p), MEASURED_PHASES.index(p)))


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def phase_table(trace, sigmas, *, learning_rate: float, node: int = 0,
                chance_loss: float | None = None, efolds: float = 3.0) -> list[dict]:
    """One row per σ of a sweep: measured and predicted phase and decay rate.

    Args:
      trace: the :class:`~jaxsens.nin.Trace` of :func:`~jaxsens.nin.sweep` (arrays with
        leading axes ``(S, R)``: σ, seed).
      sigmas: ``(S,)`` the swept σ.
      learning_rate: η of the schedule.
      node: which node's θ (index into :func:`~jaxsens.nin.nodes`).
      chance_loss: the clean loss of a network that learnt nothing (see
        :func:`measured_phase`).
      efolds: the depth of the decay window (:func:`decay_window`).

    Returns:
      Per σ a dict: ``sigma``; ``phase`` (the most frequent over seeds, ties to the later
      phase) and ``phases`` (per seed); ``phase_predicted`` from c₀ = ησ²λ₀
      (:func:`predicted_phase`); ``eta_sigma2_lambda0`` (c₀) and ``lambda0`` (λ at step
      0); ``measured_decay_rate`` (median over the seeds whose phase is decay or
      decoupled, NaN unless the row's phase is one of those); ``predicted_decay_rate``
      (ησ²λ̄, the clean curvature averaged over the same window, for a decay or
      decoupled row; c₀ otherwise); ``effective_decay_rate`` (ησ² times the mean
      effective curvature, the step's actual drift; NaN outside decay and decoupled
      rows); ``discrete_decay_rate`` (−ln|1 − ησ²λ̄| for ησ²λ̄ < 2); ``decay_time`` and
      ``predicted_decay_time`` (their inverses); ``theta0_norm``,
      ``final_theta_norm``, ``peak_theta_ratio`` (max ‖θ‖/‖θ₀‖), ``final_readout`` and
      ``final_clean_loss`` (medians over seeds). Rates are per step.
    """
    steps = np.asarray(trace.step, np.float64)
    norms = np.asarray(trace.theta_norm, np.float64)[..., node]
    curv = np.asarray(trace.curvature, np.float64)[..., node]
    eff = np.asarray(trace.effective_curvature, np.float64)[..., node]
    readout = np.asarray(trace.readout, np.float64)[..., node]
    clean = np.asarray(trace.clean_loss, np.float64)
    total_steps = int(steps[0, 0, -1])
    rows = []
    for i, sigma in enumerate(np.asarray(sigmas, np.float64).tolist()):
        seeds = range(norms.shape[1])
        phases = [measured_phase(norms[i, r], clean_loss=clean[i, r],
                                 chance_loss=chance_loss, readout=readout[i, r])
                  for r in seeds]
        measured = [measured_decay_rate(steps[i, r], norms[i, r], efolds=efolds)
                    if phases[r] in ("decay", "decoupled") else float("nan") for r in seeds]
        predicted = [predicted_decay_rate(norms[i, r], curv[i, r], learning_rate=learning_rate,
                                          sigma=sigma, efolds=efolds) for r in seeds]
        effective = [predicted_decay_rate(norms[i, r], eff[i, r], learning_rate=learning_rate,
                                          sigma=sigma, efolds=efolds) for r in seeds]
        lam0 = _median([float(curv[i, r, 0]) for r in seeds])
        c0 = learning_rate * sigma**2 * lam0
        phase = _mode(phases)
        rate, pred, drift = _median(measured), _median(predicted), _median(effective)
        if phase not in ("decay", "decoupled"):  # no decay window: the onset value
            rate, pred, drift = float("nan"), c0, float("nan")
        rows.append({
            "sigma": sigma, "phase": phase, "phases": phases,
            "phase_predicted": predicted_phase(c0, total_steps),
            "eta_sigma2_lambda0": c0, "lambda0": lam0,
            "measured_decay_rate": rate, "predicted_decay_rate": pred,
            "effective_decay_rate": drift,
            "discrete_decay_rate": (-math.log(abs(1 - pred)) if 0 < pred < 2 and pred != 1
                                    else float("nan")),
            "decay_time": 1 / rate if rate > 0 else float("nan"),
            "predicted_decay_time": 1 / pred if pred > 0 else float("nan"),
            "theta0_norm": _median([float(norms[i, r, 0]) for r in seeds]),
            "final_theta_norm": _median([float(norms[i, r, -1]) for r in seeds]),
            "peak_theta_ratio": _median([float(np.max(norms[i, r]) / norms[i, r, 0])
                                         for r in seeds]),
            "final_readout": _median([float(readout[i, r, -1]) for r in seeds]),
            "final_clean_loss": _median([float(clean[i, r, -1]) for r in seeds]),
        })
    return rows


def phase_findings(rows: list[dict], *, small: float = 0.1) -> dict:
    """The reconstruction's predictions checked against a :func:`phase_table`.

    Args:
      rows: the rows of :func:`phase_table` (any order).
      small: the largest c₀ = ησ²λ₀ at which the first-order law ``rate = ησ²λ`` is
        compared (its discrete-step correction is about c/2 there).

    Returns:
      A dict: ``decay_time_slope`` (least-squares slope of log τ against log σ over the
      decay and decoupled rows with c₀ ≤ 0.5, with ``decay_time_points``; the
      reconstruction says −2); ``rate_ratio`` (median measured / ησ²λ̄ over rows with
      c₀ ≤ ``small``, with ``rate_points``; says 1); ``discrete_ratio`` (median measured /
      −ln|1 − ησ²λ̄| over decay rows with ``small`` < c₀ < 2); ``drift_ratio`` (median
      measured / ``effective_decay_rate`` over decay and decoupled rows: 1 when the SGD
      drift alone moves θ); ``max_c`` (the largest c₀ swept); ``catapult_onset`` (the
      smallest c₀ of a catapult row), ``last_decay`` (the largest c₀ of a decay row
      below it; the reconstruction puts the boundary at 2); ``divergence_onset`` (the
      smallest c₀ of a divergent or collapsed row; says 4) and ``last_finite`` (the
      largest c₀ of a catapult or decay row below it); ``agreement`` (the fraction of rows
      whose measured phase is the predicted one). NaN where no row qualifies.
    """
    nan = float("nan")
    rows = sorted(rows, key=lambda r: r["eta_sigma2_lambda0"])

    def ok(v) -> bool:
        return v is not None and math.isfinite(v)

    fit = [r for r in rows if r["phase"] in ("decay", "decoupled") and ok(r["decay_time"])
           and r["eta_sigma2_lambda0"] <= 0.5]
    slope = (float(np.polyfit(np.log([r["sigma"] for r in fit]),
                              np.log([r["decay_time"] for r in fit]), 1)[0])
             if len(fit) >= 2 else nan)
    small_rows = [r["measured_decay_rate"] / r["predicted_decay_rate"] for r in rows
                  if r["eta_sigma2_lambda0"] <= small and ok(r["measured_decay_rate"])
                  and ok(r["predicted_decay_rate"]) and r["predicted_decay_rate"] > 0]
    drift = [r["measured_decay_rate"] / r["effective_decay_rate"] for r in rows
             if r["phase"] in ("decay", "decoupled") and ok(r["measured_decay_rate"])
             and ok(r["effective_decay_rate"]) and r["effective_decay_rate"] > 0]
    disc = [r["measured_decay_rate"] / r["discrete_decay_rate"] for r in rows
            if small < r["eta_sigma2_lambda0"] < 2 and r["phase"] == "decay"
            and ok(r["measured_decay_rate"]) and ok(r["discrete_decay_rate"])]
    cat = [r["eta_sigma2_lambda0"] for r in rows if r["phase"] == "catapult"]
    div = [r["eta_sigma2_lambda0"] for r in rows if r["phase"] in ("divergent", "collapsed")]
    onset = min(cat) if cat else nan
    div_onset = min(div) if div else nan
    below = [r["eta_sigma2_lambda0"] for r in rows if r["phase"] == "decay"
             and (not cat or r["eta_sigma2_lambda0"] < onset)]
    finite = [r["eta_sigma2_lambda0"] for r in rows if r["phase"] in ("decay", "catapult")
              and (not div or r["eta_sigma2_lambda0"] < div_onset)]
    return {
        "decay_time_slope": slope, "decay_time_points": len(fit),
        "rate_ratio": float(np.median(small_rows)) if small_rows else nan,
        "rate_points": len(small_rows),
        "discrete_ratio": float(np.median(disc)) if disc else nan,
        "drift_ratio": float(np.median(drift)) if drift else nan,
        "max_c": max((r["eta_sigma2_lambda0"] for r in rows), default=nan),
        "catapult_onset": onset, "last_decay": max(below) if below else nan,
        "divergence_onset": div_onset, "last_finite": max(finite) if finite else nan,
        "agreement": (sum(r["phase"] == r["phase_predicted"] for r in rows) / len(rows)
                      if rows else nan),
    }
