"""Gaussian noise attacks shaped through the analytic moments, checked by Monte Carlo.

:func:`gaussian_noise_attack` optimizes a Gaussian input distribution
``N(x1 + mean_shift, diag(std^2))`` under an energy budget, through the differentiable
moments of :func:`~jaxsens.moments.diagonal_output_moments` (Bibi, Alfadly, Ghanem, CVPR
2018); :func:`check_attack` measures the result on the true network by Monte Carlo. Inputs
are one example (no batch axis).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int

from .. import montecarlo
from ..sites import PureModel, split
from ._common import _check_method, _concrete_float, _float_input, _num_outputs
from ._expected import expected_cross_entropy
from ._gaussian import GaussianMoments
from ._maps import diagonal_output_moments

__all__ = [
    "AttackCheck",
    "AttackResult",
    "OBJECTIVES",
    "check_attack",
    "gaussian_noise_attack",
]

OBJECTIVES = ("margin", "ce")


# --------------------------------------------------------------------------- attacks
class AttackResult(NamedTuple):
    """A Gaussian input distribution ``N(x1 + mean_shift, diag(std^2))`` found by
    :func:`gaussian_noise_attack`.

    Attributes:
      mean_shift: ``(*input_shape)`` shift of the input mean.
      std: ``(*input_shape)`` per-coordinate standard deviation (``>= 0``).
      history: ``(steps,)`` predicted objective before each step.
      predicted_objective: predicted objective at the returned distribution (scalar).
      predicted_margin: ``E[F_a - F_b] = m_a - m_b`` predicted for ``margin_classes``.
      margin_classes: ``(a, b)``: untargeted ``(strongest wrong class, y)``; targeted
        ``(target, strongest other class)`` at the returned distribution.
      predicted_ce: second-order expected cross-entropy of ``y`` (untargeted) or of
        ``target`` (targeted).
      output: the predicted output moments.
      target: the target class, ``None`` for an untargeted attack.
      budget: the bound on ``(||mean_shift||^2 + ||std||^2)^(1/2)``.
    """

    mean_shift: Float[Array, "*input_shape"]
    std: Float[Array, "*input_shape"]
    history: Float[Array, " steps"]
    predicted_objective: Float[Array, ""]
    predicted_margin: Float[Array, ""]
    margin_classes: Int[Array, " 2"]
    predicted_ce: Float[Array, ""]
    output: GaussianMoments
    target: Int[Array, ""] | None
    budget: Float[ArrayLike, ""]


class AttackCheck(NamedTuple):
    """Monte Carlo measurement of an :class:`AttackResult` on the true network.

    Attributes:
      success_rate: fraction of draws misclassified (untargeted: ``argmax F != y``) or
        classified as the target (targeted).
      success_stderr: ``sqrt(rate (1 - rate) / n)``.
      margin: sample mean of ``F_a - F_b`` for ``result.margin_classes``.
      margin_stderr: its standard error.
      cross_entropy: sample mean of ``CE(F, label)`` (label ``y`` or the target).
      cross_entropy_stderr: its standard error.
      predicted_margin: ``result.predicted_margin``.
      predicted_ce: ``result.predicted_ce``.
      num_samples: number of draws.
    """

    success_rate: Float[Array, ""]
    success_stderr: Float[Array, ""]
    margin: Float[Array, ""]
    margin_stderr: Float[Array, ""]
    cross_entropy: Float[Array, ""]
    cross_entropy_stderr: Float[Array, ""]
    predicted_margin: Float[Array, ""]
    predicted_ce: Float[Array, ""]
    num_samples: int


def _strongest_other(m: Array, exclude) -> Array:
    return jnp.argmax(jnp.where(jnp.arange(m.size) == exclude, -jnp.inf, m))


def _total_variation(z: Array, image_shape: tuple[int, ...]) -> Array:
    """Anisotropic TV ``sum |z[h+1, w] - z[h, w]| + |z[h, w+1] - z[h, w]|`` (per channel)."""
    z = z.reshape(image_shape)
    return jnp.sum(jnp.abs(jnp.diff(z, axis=0))) + jnp.sum(jnp.abs(jnp.diff(z, axis=1)))


def _inv_softplus(v: Array) -> Array:
    v = jnp.maximum(v, jnp.finfo(v.dtype).tiny)
    # log(expm1(v)) = v + log(-expm1(-v)): no overflow for large v.
    return v + jnp.log(-jnp.expm1(-v))


def _attack_summary(mom: GaussianMoments, y, target, targeted: bool):
    m = mom.mean
    if targeted:
        a, b = target, _strongest_other(m, target)
        ce = expected_cross_entropy(mom, target)
    else:
        a, b = _strongest_other(m, y), y
        ce = expected_cross_entropy(mom, y)
    return m[a] - m[b], jnp.stack([a, b]).astype(jnp.int32), ce


@functools.partial(jax.jit, static_argnames=(
    "struct", "steps", "objective", "targeted", "method", "split_at", "relinearize",
    "optimize_mean", "image_shape"))
def _attack_core(struct, params, rest, x1, y, target, delta0, std0, budget, learning_rate,
                 sparsity, smoothness, *, steps, objective, targeted, method, split_at,
                 relinearize, optimize_mean, image_shape):
    pm = PureModel(struct, params, rest)

    def moments_of(delta, std):
        var = jnp.square(std)
        if relinearize and method == "two_stage":
            return diagonal_output_moments(pm, x1 + delta, 0.0, var, method=method,
                                           split_at=split_at)
        return diagonal_output_moments(pm, x1, delta, var, method=method, split_at=split_at)

    def objective_of(mom):
        margin, _, ce = _attack_summary(mom, y, target, targeted)
        if objective == "margin":
            return margin
        return -ce if targeted else ce

    def unpack(raw):
        delta = raw[0] if optimize_mean else jnp.zeros_like(x1)
        return delta, jax.nn.softplus(raw[1])

    def loss(raw):
        delta, std = unpack(raw)
        value = objective_of(moments_of(delta, std))
        penalty = sparsity * jnp.sum(std)
        if image_shape is not None:
            penalty = penalty + smoothness * (_total_variation(std, image_shape)
                                              + _total_variation(delta, image_shape))
        return penalty - value, value

    def project(raw):
        delta, std = unpack(raw)
        norm = jnp.sqrt(jnp.sum(delta**2) + jnp.sum(std**2))
        scale = jnp.minimum(1.0, budget / jnp.where(norm > 0, norm, 1.0))
        return (delta * scale, _inv_softplus(std * scale))

    opt = optax.adam(learning_rate)
    raw = project((delta0, _inv_softplus(std0)))

    def step(carry, _):
        raw, state = carry
        (_, value), grads = jax.value_and_grad(loss, has_aux=True)(raw)
        updates, state = opt.update(grads, state, raw)
        raw = project(optax.apply_updates(raw, updates))
        return (raw, state), value

    (raw, _), history = jax.lax.scan(step, (raw, opt.init(raw)), None, length=steps)
    delta, std = unpack(raw)
    mom = moments_of(delta, std)
    margin, classes, ce = _attack_summary(mom, y, target, targeted)
    return delta, std, history, objective_of(mom), margin, classes, ce, mom


def gaussian_noise_attack(
    model,
    x1: Float[ArrayLike, "*input_shape"],
    y: int | Int[ArrayLike, ""],
    *,
    budget: float,
    target: int | None = None,
    objective: str = "margin",
    steps: int = 200,
    learning_rate: float = 0.01,
    sparsity: float = 0.0,
    smoothness: float = 0.0,
    optimize_mean: bool = True,
    method: str = "two_stage",
    split_at: str | None = None,
    relinearize: bool = True,
    image_shape: tuple[int, ...] | None = None,
    key: jax.Array | None = None,
) -> AttackResult:
    r"""Find the worst Gaussian input distribution within an energy budget.

    The input is ``x ~ N(x1 + delta, diag(s^2))``. The budget bounds its mean-square
    distance from the clean input,

    .. math::
        E\,\|x - x_1\|^2 = \|\delta\|^2 + \|s\|^2 \le \mathrm{budget}^2,

    one constraint shared by the mean shift and the noise (``optimize_mean=False`` fixes
    ``delta = 0``: a pure noise attack). The output moments ``F ~ (m, C)`` come from the
    differentiable analytic moments (:func:`diagonal_output_moments`); the objective,
    maximized with Adam (Optax) on unconstrained parameters (``delta``, and ``s =
    softplus(rho)``) followed after every step by the Euclidean projection onto the budget
    ball (a radial rescaling of ``(delta, s)``), is

    * ``objective="margin"`` (exact expected logit margins, ``E[F_a - F_b] = m_a - m_b``):
      untargeted ``max_{j != y} (m_j - m_y)``; targeted ``m_t - max_{j != t} m_j``;
    * ``objective="ce"`` (second-order :func:`expected_cross_entropy`): untargeted
      ``E CE(F, y)``; targeted ``-E CE(F, t) = E log softmax(F)_t``, the expected
      log-probability of the target;

    minus the penalties ``sparsity * ||s||_1`` and ``smoothness * (TV(s) + TV(delta))``
    (anisotropic total variation over ``image_shape``; needs an image-shaped input or
    ``image_shape``). With ``relinearize`` the two-stage expansion is taken at the current
    mean ``x1 + delta`` at every step (more faithful for large shifts in deep nets; exact
    either way for one hidden layer); otherwise at ``x1``, as in ``output_moments``.

    Args:
      model: an NNX module or ``PureModel`` with a ReLU site (two-stage) or made of affine steps
        and ReLUs (layerwise).
      x1: one clean input (no batch axis).
      y: its true label.
      budget: bound on ``(||delta||^2 + ||s||^2)^(1/2)``, ``> 0``.
      target: target class for a targeted attack (``!= y``), ``None`` for untargeted.
      objective: ``"margin"`` or ``"ce"``.
      steps: Adam steps.
      learning_rate: Adam learning rate (in input units).
      sparsity: weight of the ``l1`` penalty on ``s``.
      smoothness: weight of the total-variation penalty on ``s`` and ``delta``.
      optimize_mean: optimize the mean shift too (``False``: zero-mean noise only).
      method: one of :data:`jaxsens.moments.METHODS`.
      split_at: the two-stage ReLU site (default: the last one).
      relinearize: two-stage expansion at the current mean (see above).
      image_shape: ``(H, W)`` or ``(H, W, C)`` view of the input for the smoothness
        penalty (default: the model's input shape when it has 2 or 3 axes).
      key: PRNG key of the initial distribution: ``None`` starts from ``delta = 0`` and an
        isotropic ``s``; a key starts from a random ``delta`` direction (random restarts).
        Both start with half of the budget's energy in ``delta`` and half in ``s``.

    Returns:
      An :class:`AttackResult`.

    Raises:
      ValueError: bad budget, steps, target, objective, method, penalty weights or shapes.

    References:
      Bibi, Alfadly, Ghanem, CVPR 2018 (moments; attacks that shape the noise through them).
    """
    _check_method(method)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}; choose one of {list(OBJECTIVES)}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    _concrete_float("budget", budget)
    _concrete_float("learning_rate", learning_rate)
    _concrete_float("sparsity", sparsity, positive=False)
    _concrete_float("smoothness", smoothness, positive=False)
    pm = split(model)
    x1 = _float_input(pm, x1)
    k = _num_outputs(pm.structure)
    _check_label("y", y, k)
    targeted = target is not None
    if target is not None:
        _check_label("target", target, k)
        try:
            same = int(target) == int(np.asarray(y))
        except (jax.errors.ConcretizationTypeError, TypeError):
            same = False
        if same:
            raise ValueError(f"target={target} equals the true label y; pick another class "
                             f"or target=None for an untargeted attack")
    if image_shape is None and len(pm.input_shape) in (2, 3):
        image_shape = pm.input_shape
    if image_shape is not None:
        image_shape = tuple(int(n) for n in image_shape)
        if math.prod(image_shape) != x1.size or len(image_shape) not in (2, 3):
            raise ValueError(f"image_shape must be (H, W) or (H, W, C) with {x1.size} "
                             f"elements, got {image_shape}")
    else:
        try:
            if float(smoothness) > 0:
                raise ValueError("smoothness > 0 needs an image: pass image_shape=(H, W) for "
                                 "flat inputs")
        except (jax.errors.ConcretizationTypeError, TypeError):
            pass
    dtype = x1.dtype
    d = x1.size
    half = jnp.asarray(budget, dtype) / math.sqrt(2.0)
    std0 = jnp.full(x1.shape, 1.0, dtype) * (half / math.sqrt(d))
    if key is None or not optimize_mean:
        delta0 = jnp.zeros_like(x1)
    else:
        u = jax.random.normal(key, x1.shape, dtype)
        delta0 = half * u / jnp.linalg.norm(u)
    if not optimize_mean:
        std0 = std0 * math.sqrt(2.0)
    tgt = jnp.asarray(0 if target is None else target, jnp.int32)
    delta, std, history, value, margin, classes, ce, mom = _attack_core(
        pm.structure, pm.params, pm.rest, x1, jnp.asarray(y, jnp.int32), tgt, delta0, std0,
        jnp.asarray(budget, dtype), jnp.asarray(learning_rate, dtype),
        jnp.asarray(sparsity, dtype), jnp.asarray(smoothness, dtype), steps=int(steps),
        objective=objective, targeted=targeted, method=method, split_at=split_at,
        relinearize=bool(relinearize), optimize_mean=bool(optimize_mean),
        image_shape=image_shape)
    return AttackResult(
        mean_shift=delta, std=std, history=history, predicted_objective=value,
        predicted_margin=margin, margin_classes=classes, predicted_ce=ce, output=mom,
        target=tgt if targeted else None, budget=budget)


def _check_label(name: str, value, k: int) -> None:
    try:
        v = int(value)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return
    if not 0 <= v < k:
        raise ValueError(f"{name}={value} is not a class index in [0, {k})")


@functools.partial(jax.jit, static_argnames=("struct", "num_samples", "chunk", "targeted"))
def _check_core(struct, params, rest, x1, delta, std, y, target, classes, key, *,
                num_samples, chunk, targeted):
    label = target if targeted else y

    def draw(k):
        eps = jax.random.normal(k, x1.shape, x1.dtype)
        out = struct.apply_one(params, rest, x1 + delta + std * eps).reshape(-1)
        margin = out[classes[0]] - out[classes[1]]
        ce = -jax.nn.log_softmax(out)[label]
        pred = jnp.argmax(out)
        hit = (pred == target) if targeted else (pred != y)
        return {"margin": margin, "margin2": margin**2, "ce": ce, "ce2": ce**2,
                "hit": hit.astype(x1.dtype)}

    n = num_samples
    avg = montecarlo.average(draw, key, num_samples=n, chunk=chunk).mean

    def mean_se(m1, m2):
        var = jnp.maximum(m2 - m1**2, 0.0) * n / (n - 1)
        return m1, jnp.sqrt(var / n)

    rate = avg["hit"]
    return (rate, jnp.sqrt(rate * (1.0 - rate) / n), *mean_se(avg["margin"], avg["margin2"]),
            *mean_se(avg["ce"], avg["ce2"]))


def check_attack(
    model,
    x1: Float[ArrayLike, "*input_shape"],
    y: int | Int[ArrayLike, ""],
    result: AttackResult,
    *,
    key: jax.Array,
    num_samples: int = 10_000,
    chunk_size: int = 1000,
) -> AttackCheck:
    """Measure an attack on the true network by Monte Carlo.

    Draws ``x = x1 + mean_shift + std * eps``, ``eps ~ N(0, I)`` (chunk ``c`` uses
    ``fold_in(key, c)``), runs the model's own forward pass, and returns the success rate,
    the mean of ``F_a - F_b`` for ``result.margin_classes`` (compare with
    ``result.predicted_margin``; equal in expectation when the moments are exact, e.g. one
    hidden layer) and the mean cross-entropy (compare with ``result.predicted_ce``), each
    with its standard error.

    Args:
      model: the model attacked (NNX module or ``PureModel``).
      x1: the clean input (no batch axis).
      y: its true label.
      result: from :func:`gaussian_noise_attack` (or a hand-made baseline with the same
        fields, e.g. ``result._replace(mean_shift=0 * ..., std=...)``).
      key: PRNG key of the draws.
      num_samples: number of draws (``>= 2``).
      chunk_size: draws per forward pass.

    Returns:
      An :class:`AttackCheck`.
    """
    if (isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer)
            or num_samples < 2):
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer)
            or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    pm = split(model)
    x1 = _float_input(pm, x1)
    targeted = result.target is not None
    delta = jnp.broadcast_to(jnp.asarray(result.mean_shift, x1.dtype), x1.shape)
    std = jnp.broadcast_to(jnp.asarray(result.std, x1.dtype), x1.shape)
    tgt = jnp.asarray(result.target if targeted else 0, jnp.int32)
    stats = _check_core(pm.structure, pm.params, pm.rest, x1, delta, std,
                        jnp.asarray(y, jnp.int32), tgt, jnp.asarray(result.margin_classes),
                        key, num_samples=int(num_samples),
                        chunk=int(min(chunk_size, num_samples)), targeted=targeted)
    rate, rate_se, margin, margin_se, ce, ce_se = stats
    return AttackCheck(rate, rate_se, margin, margin_se, ce, ce_se,
                       predicted_margin=result.predicted_margin,
                       predicted_ce=result.predicted_ce, num_samples=int(num_samples))
