"""Differentiable robustness losses, optax-style: per-example arrays out, reduced by the caller.

Every loss term is a frozen (hashable) dataclass implementing the :class:`LossTerm` protocol

    term(struct, params, rest, x, y, key) -> Float[Array, "batch"]

on the pure function of a split model (:class:`jaxsens.sites.Structure`), so terms compose
inside one jitted, differentiated train step. Hyperparameters are keyword-only fields;
randomness comes only from ``key``.

Terms:
  * :class:`CrossEntropy` — softmax cross-entropy with integer labels.
  * :class:`NoiseLoss` — sampled-noise loss (reparameterized draws of a noise law at a site):
    the output deviation ‖F(x; site + η) − F(x)‖², or the cross-entropy of the noisy
    forward pass (noise-injection training).
  * :class:`JacobianPenalty` — Hoffman, Roberts & Yaida (2019): ‖J‖_F² ≈ k ‖vᵀJ‖² with
    random unit projections v (Hoffman, Roberts, Yaida 2019).
  * :class:`LinearizedPenalty` — the exact first-order mean-square deviation
    E‖Jη‖² = tr(J C Jᵀ) of :func:`jaxsens.linearized`.

Configs choose terms through the explicit registry :data:`LOSSES` and :func:`make_loss`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol, cast, runtime_checkable

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from . import montecarlo
from . import noise as noise_lib
from .bounds import FORMS, margin_bound_and_logits, margin_chain
from .checks import positive_int
from .estimators import sandwiches
from .graph import GraphError, dense_chain
from .graph import read as read_graph
from .moments import METHODS, check_method, noisy_cross_entropy
from .paths import param
from .sites import INPUT, PureModel, Structure

__all__ = [
    "LossTerm",
    "CrossEntropy",
    "NoiseLoss",
    "JacobianPenalty",
    "LinearizedPenalty",
    "ExpectedGaussianLoss",
    "AdversarialInputLoss",
    "WeightMarginLoss",
    "LinfNormPenalty",
    "TheoryLoss",
    "WeightedSum",
    "Warmup",
    "weight_at",
    "total_loss",
    "term_names",
    "normalize_terms",
    "LOSSES",
    "make_loss",
]


# --------------------------------------------------------------------------- helpers
def _as_input(struct: Structure, x: jax.Array) -> jax.Array:
    """``x`` reshaped to ``(batch, *struct.input_shape)`` when only the layout differs."""
    want = struct.input_shape
    if tuple(x.shape[1:]) == want:
        return x
    if math.prod(x.shape[1:]) != math.prod(want):
        raise ValueError(
            f"x has per-example shape {tuple(x.shape[1:])} but the model takes {want}"
        )
    return x.reshape(x.shape[0], *want)


def _float_dtype(params, x: jax.Array):
    """The dtype the forward pass computes in (inputs promoted with the parameters)."""
    leaves = [a for a in jax.tree.leaves(params) if jnp.issubdtype(a.dtype, jnp.floating)]
    return jnp.result_type(x.dtype, *[a.dtype for a in leaves])


def _check_site_law(struct: Structure, site: str, law: noise_lib.NoiseLaw):
    info = struct.site(site)
    if info.kind not in law.applies_to:
        raise ValueError(
            f"noise {type(law).__name__} cannot be used at {info.kind} site {site!r}; it "
            f"applies to {', '.join(law.applies_to)} sites"
        )
    return info


def _check_law(owner: str, law) -> None:
    if not isinstance(law, noise_lib.NoiseLaw):
        raise ValueError(
            f"{owner} noise must be a law from jaxsens.noise ({', '.join(noise_lib.LAWS)}), "
            f"got {type(law).__name__}"
        )


def _flat_logits(struct: Structure, params, rest, x: jax.Array) -> jax.Array:
    out = struct.apply(params, rest, x)
    return out.reshape(out.shape[0], -1)


# --------------------------------------------------------------------------- protocol
@runtime_checkable
class LossTerm(Protocol):
    """What every loss term is: ``term(struct, params, rest, x, y, key) -> (batch,)``.

    Terms are frozen dataclasses with a class-level ``name`` (the registry key);
    ``struct`` is a :class:`jaxsens.sites.Structure`, ``params``/``rest`` its arrays,
    ``x`` inputs ``(batch, *input_shape)`` (or any layout with the same size per example),
    ``y`` integer labels ``(batch,)`` and ``key`` a JAX PRNG key. The result is one loss
    value per example; the caller reduces it (mean), as with optax losses. The built-in
    terms subclass this protocol to inherit the default :meth:`check`.
    """

    name: ClassVar[str]

    def check(self, struct: Structure) -> None:
        """Raise a one-line ValueError if the term does not fit the model (before tracing)."""
        return None

    def __call__(
        self,
        struct: Structure,
        params: Any,
        rest: Any,
        x: Float[Array, "batch ..."],
        y: Int[Array, " batch"],
        key: jax.Array,
    ) -> Float[Array, " batch"]: ...


# --------------------------------------------------------------------------- terms
@dataclasses.dataclass(frozen=True)
class CrossEntropy(LossTerm):
    """Softmax cross-entropy with integer labels.

    ``optax.softmax_cross_entropy_with_integer_labels`` on the flattened outputs.

    Returns:
      ``(batch,)``: −log softmax(F(x))_y per example.
    """

    name: ClassVar[str] = "cross_entropy"

    def __call__(self, struct, params, rest, x, y, key):
        del key
        logits = _flat_logits(struct, params, rest, _as_input(struct, x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoiseLoss(LossTerm):
    """Sampled-noise loss: reparameterized draws η of ``noise`` at ``site``.

    With S = ``num_samples`` draws η_s (gradients flow through the draws, whose scale may
    depend on the clean value, e.g. relative-norm noise):

      * ``target="output"``: (1/S) Σ_s ‖F(x; site + η_s) − F(x)‖²  (the mean-square output
        deviation; its expectation is ≈ :class:`LinearizedPenalty` for small noise);
      * ``target="ce"``: (1/S) Σ_s CE(F(x; site + η_s), y)  (noise-injection training).

    Input and activation sites get independent draws per example (``fold_in`` of the
    sample key with the example index); a weight site gets one Δ per sample, shared by the
    whole batch.

    Attributes:
      site: ``"input"``, an activation site or a weight path.
      noise: a law from :mod:`jaxsens.noise`.
      num_samples: draws per example (per batch for weight sites).
      target: ``"output"`` or ``"ce"``.

    Returns:
      ``(batch,)`` per-example loss.
    """

    name: ClassVar[str] = "noise"

    site: str
    noise: noise_lib.NoiseLaw
    num_samples: int = 1
    target: Literal["output", "ce"] = "output"

    def __post_init__(self):
        if not isinstance(self.site, str):
            raise ValueError(f"NoiseLoss site must be a site name, got {self.site!r}")
        _check_law("NoiseLoss", self.noise)
        positive_int("NoiseLoss num_samples", self.num_samples)
        if self.target not in ("output", "ce"):
            raise ValueError(f"NoiseLoss target must be 'output' or 'ce', got {self.target!r}")

    def check(self, struct):
        _check_site_law(struct, self.site, self.noise)

    def __call__(self, struct, params, rest, x, y, key):
        info = _check_site_law(struct, self.site, self.noise)
        x = _as_input(struct, x)
        batch = x.shape[0]
        if info.kind == "activation":
            out0, values = struct.apply_with_values(params, rest, x)
        else:
            out0, values = struct.apply(params, rest, x), {}
        out0 = out0.reshape(batch, -1)

        if info.kind == "weight":
            w = param(params, info.path)

            def noisy(k):
                return struct.apply(params, rest, x, {self.site: self.noise.sample(k, w)})
        else:
            h = x if info.kind == "input" else values[self.site]
            ex = jnp.arange(batch)

            def noisy(k):
                eta = jax.vmap(lambda i, hb: self.noise.sample(jax.random.fold_in(k, i), hb))(
                    ex, h)
                return struct.apply(params, rest, x, {self.site: eta})

        def draw(k):
            out = noisy(k).reshape(batch, -1)
            if self.target == "output":
                return jnp.sum(jnp.square(out - out0), axis=-1)
            return optax.softmax_cross_entropy_with_integer_labels(out, y)

        # All draws in one chunk (vmapped) with params and x unbatched: the prefix before
        # the site is computed once (prefix reuse).
        return montecarlo.average(draw, key, num_samples=self.num_samples,
                                  chunk=self.num_samples).mean


@dataclasses.dataclass(frozen=True, kw_only=True)
class JacobianPenalty(LossTerm):
    """Squared Frobenius norm of the Jacobian ∂F/∂(site), by random projections.

    Hoffman, Roberts & Yaida (2019): for v uniform on the unit sphere of R^k,
    E[v vᵀ] = I/k, so ‖J‖_F² = tr(Jᵀ E[v vᵀ] J)·k = k · E_v ‖vᵀJ‖². Each projection costs
    one vector-Jacobian product; the estimate is unbiased for any number of projections P
    (its variance is 2k/(k+2) (tr(A²) − tr(A)²/k) / P with A = J Jᵀ).

    For the input or an activation site one batched VJP with a per-example v gives every
    example's vᵀJ_b (examples do not interact). For a weight site the Jacobian of each
    example is taken separately (vmapped per-example VJPs).

    Attributes:
      site: ``"input"`` (default), an activation site or a weight path.
      num_projections: P, the number of random projections per example.

    Returns:
      ``(batch,)``: the estimate of ‖∂F(x_b)/∂(site)‖_F² per example.

    References:
      Hoffman, Roberts, Yaida, "Robust learning with Jacobian regularization", 2019.
    """

    name: ClassVar[str] = "jacobian"

    site: str = INPUT
    num_projections: int = 1

    def __post_init__(self):
        if not isinstance(self.site, str):
            raise ValueError(f"JacobianPenalty site must be a site name, got {self.site!r}")
        positive_int("JacobianPenalty num_projections", self.num_projections)

    def check(self, struct):
        struct.site(self.site)

    def __call__(self, struct, params, rest, x, y, key):
        del y
        info = struct.site(self.site)
        x = _as_input(struct, x)
        batch = x.shape[0]
        dtype = _float_dtype(params, x)
        k = math.prod(struct.output_shape)
        v = jax.random.normal(key, (self.num_projections, batch, k), dtype)
        v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)

        if info.kind == "weight":
            w = param(params, info.path)

            def per_example(x1, v1):
                def f(d):
                    return struct.apply_one(params, rest, x1, {self.site: d}).reshape(-1)

                _, vjp = jax.vjp(f, jnp.zeros_like(w))
                (g,) = jax.vmap(vjp)(v1)  # (P, *w.shape)
                return jnp.sum(jnp.square(g.reshape(self.num_projections, -1)), axis=-1)

            sq = jax.vmap(per_example, in_axes=(0, 1), out_axes=1)(x, v)  # (P, batch)
        else:
            def f(d):
                return struct.apply(params, rest, x, {self.site: d}).reshape(batch, -1)

            _, vjp = jax.vjp(f, jnp.zeros((batch, *info.shape), dtype))
            (g,) = jax.vmap(vjp)(v)  # (P, batch, *site_shape)
            sq = jnp.sum(jnp.square(g.reshape(self.num_projections, batch, -1)), axis=-1)
        return k * jnp.mean(sq, axis=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearizedPenalty(LossTerm):
    """The first-order mean-square output deviation under ``noise`` at ``site``.

    E‖Jη‖² = tr(J C Jᵀ) with J = ∂F/∂(site) at the clean point and C = E[ηηᵀ] from the
    law — exactly ``jaxsens.linearized(...).rms ** 2`` — as a differentiable loss. For
    isotropic C = s² I it is s² ‖J‖_F² (for relative-norm noise s depends on the clean
    value, and the gradient flows through it). Costs k VJPs per example (k outputs).

    Attributes:
      site: ``"input"``, an activation site or a weight path.
      noise: a law from :mod:`jaxsens.noise`.

    Returns:
      ``(batch,)``: tr(J C Jᵀ) per example.
    """

    name: ClassVar[str] = "linearized"

    site: str
    noise: noise_lib.NoiseLaw

    def __post_init__(self):
        if not isinstance(self.site, str):
            raise ValueError(f"LinearizedPenalty site must be a site name, got {self.site!r}")
        _check_law("LinearizedPenalty", self.noise)

    def check(self, struct):
        _check_site_law(struct, self.site, self.noise)

    def __call__(self, struct, params, rest, x, y, key):
        del y, key
        _check_site_law(struct, self.site, self.noise)
        x = _as_input(struct, x)
        x = x.astype(_float_dtype(params, x))
        # The estimator's own jitted core (check_inputs in jaxsens.linearized reads concrete
        # values, which a traced train step does not have). chunk = batch: fully vmapped.
        ((m, _, _),) = sandwiches(struct, params, rest, x, (self.noise,),
                                  sites=(self.site,), chunk=x.shape[0])
        return jnp.trace(m, axis1=-2, axis2=-1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpectedGaussianLoss(LossTerm):
    """Expected cross-entropy under Gaussian input noise, through the analytic moments.

    For input ``x + eta``, ``eta ~ N(0, sigma^2 I)``, the output mean ``m`` and covariance
    ``C`` of each example come from the Bibi et al. moments (two-stage by default:
    ``Sigma~ = sigma^2 A A^T``, computed without a ``d x d`` matrix), and

        E CE(F, y) ≈ CE(m, y) + ½ tr(H C),   H = diag(p) − p pᵀ,  p = softmax(m),

    the second-order (delta-method) expansion of log-sum-exp (``E F_y = m_y`` is exact).
    With exact moments (one hidden layer) its error is at most (√2/12) E‖F − m‖³, i.e.
    O(σ³) (see :func:`jaxsens.moments.expected_cross_entropy`). Deterministic (``key`` is
    unused), differentiable, usable inside a jitted train step. Cost per example: one
    two-stage linearization (p VJPs) and p²/2 bivariate normal CDFs (p: width of the split
    layer); examples are processed in memory-bounded chunks.

    Attributes:
      sigma: input noise standard deviation, > 0.
      method: ``"two_stage"``, ``"layerwise_full"`` or ``"layerwise_diag"``.
      split_at: the two-stage ReLU site (default: the last one).

    Returns:
      ``(batch,)``: the approximate E CE(F(x + η), y) per example.

    References:
      Bibi, Alfadly, Ghanem, "Analytic Expressions for Probabilistic Moments of PL-DNN
      with Gaussian Input", CVPR 2018.
    """

    name: ClassVar[str] = "expected_gaussian"

    sigma: float
    method: str = "two_stage"
    split_at: str | None = None

    def __post_init__(self):
        if (isinstance(self.sigma, bool) or not isinstance(self.sigma, int | float)
                or not math.isfinite(self.sigma) or self.sigma <= 0):
            raise ValueError(f"ExpectedGaussianLoss sigma must be a finite number > 0, got "
                             f"{self.sigma!r}")
        if self.method not in METHODS:
            raise ValueError(f"ExpectedGaussianLoss method={self.method!r}; choose one of "
                             f"{list(METHODS)}")

    def check(self, struct):
        try:
            check_method(PureModel(struct, None, None), self.method, self.split_at)
        except ValueError as err:
            raise ValueError(f"ExpectedGaussianLoss: {err}") from None

    def __call__(self, struct, params, rest, x, y, key):
        del key
        x = _as_input(struct, x)
        x = x.astype(_float_dtype(params, x))
        return noisy_cross_entropy(PureModel(struct, params, rest), x, y, sigma=self.sigma,
                                   method=self.method, split_at=self.split_at)


@dataclasses.dataclass(frozen=True)
class AdversarialInputLoss(LossTerm):
    """Cross-entropy at an ℓ∞ adversarial input (projected gradient ascent, Madry et al.).

    δ* ≈ argmax_{‖δ‖_∞ ≤ eps} CE(F(x + δ), y) by ``steps`` signed-gradient steps of size
    ``step_size · eps`` from a uniform random start (``key``); the loss is CE(F(x + δ*), y)
    with δ* held fixed (no gradient through the inner maximization). Input-adversarial
    training, to compare with the weight-perturbation theory under weight attacks.

    Attributes:
      eps: the ℓ∞ radius, in the input's (normalized) units.
      steps: ascent steps.
      step_size: each step's size as a fraction of ``eps``.
    """

    eps: float = 0.1
    steps: int = 5
    step_size: float = 0.4
    name: ClassVar[str] = "adversarial"

    def __post_init__(self):
        for field, value in (("eps", self.eps), ("step_size", self.step_size)):
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"adversarial {field} must be a finite number >= 0, got "
                                 f"{value!r}")
        positive_int("adversarial steps", self.steps)

    def __call__(self, struct, params, rest, x, y, key):
        x = _as_input(struct, x)
        x = x.astype(_float_dtype(params, x))

        def ce(xx):
            return optax.softmax_cross_entropy_with_integer_labels(
                _flat_logits(struct, jax.lax.stop_gradient(params), rest, xx), y)

        delta = self.eps * jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
        grad = jax.grad(lambda d: jnp.sum(ce(x + d)))
        for _ in range(self.steps):
            delta = jnp.clip(delta + self.step_size * self.eps * jnp.sign(grad(delta)),
                             -self.eps, self.eps)
        x_adv = x + jax.lax.stop_gradient(delta)
        return optax.softmax_cross_entropy_with_integer_labels(
            _flat_logits(struct, params, rest, x_adv), y)


@dataclasses.dataclass(frozen=True)
class WeightMarginLoss(LossTerm):
    """The theory-driven term of the weight-perturbation margin bound.

    ``variant="hinge"``: ``max_{j≠y} [Γ_j − (f_y − f_j)]_+``, positive while some
    perturbation of the listed layers within the budget could change the prediction;
    ``"raw"``: ``max_{j≠y} Γ_j``, the bound itself. Γ is
    :func:`jaxsens.bounds.weight_margin_bound` (a sound form derived after Tsai et al.
    2021, not the paper's constants). Add it to cross-entropy with a weight λ, and
    :class:`LinfNormPenalty` with a weight μ: CE + λ·hinge + μ·Σ_k ‖W_k‖_∞. Deterministic
    (``key`` is unused); differentiable and jit-compiled inside the training step.

    Attributes:
      eps: the budget (a scalar, or one value per listed layer).
      layers: 0-based indices of the perturbed dense layers (default: all).
      relative: budgets relative to each ``‖W_k‖_∞``.
      form: ``"data"`` or ``"product"``.
      variant: ``"hinge"`` or ``"raw"``.
    """

    eps: float | tuple[float, ...] = 0.01
    layers: tuple[int, ...] | None = None
    relative: bool = True
    form: str = "data"
    variant: str = "hinge"
    name: ClassVar[str] = "weight_margin"

    def __post_init__(self):
        eps = self.eps if isinstance(self.eps, tuple | list) else (self.eps,)
        if any(isinstance(e, bool) or not isinstance(e, int | float) or not math.isfinite(e)
               or e < 0 for e in eps):
            raise ValueError(f"weight_margin eps must be finite numbers >= 0, got {self.eps!r}")
        if isinstance(self.eps, list):
            object.__setattr__(self, "eps", tuple(self.eps))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(k) for k in self.layers))
        if self.form not in FORMS:
            raise ValueError(f"weight_margin form={self.form!r}; choose one of {list(FORMS)}")
        if self.variant not in ("hinge", "raw"):
            raise ValueError(f"weight_margin variant={self.variant!r}; choose 'hinge' or 'raw'")

    def _layers(self, depth: int) -> tuple[int, ...]:
        return tuple(range(depth)) if self.layers is None else tuple(self.layers)

    def check(self, struct):
        try:
            steps = dense_chain(read_graph(struct))
        except GraphError as err:
            raise ValueError(f"weight_margin: {err}") from None
        layers = self._layers(len(steps))
        if any(k < 0 or k >= len(steps) for k in layers):
            raise ValueError(f"weight_margin layers {list(layers)} out of range: the model has "
                             f"{len(steps)} dense layers (0..{len(steps) - 1})")

    def __call__(self, struct, params, rest, x, y, key):
        del key
        pm = PureModel(struct, params, rest)
        x = _as_input(struct, x)
        x = x.astype(_float_dtype(params, x))
        return self.penalty(pm, x, y)[0]

    def penalty(self, pm: PureModel, x, y) -> tuple[jax.Array, jax.Array]:
        """``(per-example penalty, logits)`` from one forward pass."""
        depth = len(dense_chain(read_graph(pm.structure, x.dtype)))
        eps = jnp.asarray(self.eps) if isinstance(self.eps, tuple) else self.eps
        form: Literal["data", "product"] = "data" if self.form == "data" else "product"
        gamma, out = margin_bound_and_logits(pm, x, y, eps=eps, layers=self._layers(depth),
                                             relative=self.relative, form=form)
        true = jax.nn.one_hot(y, gamma.shape[1], dtype=bool)
        if self.variant == "raw":
            return jnp.max(jnp.where(true, 0.0, gamma), axis=1), out
        margins = jnp.take_along_axis(out, y[:, None], axis=1) - out
        return jnp.max(jnp.where(true, 0.0, jnp.maximum(gamma - margins, 0.0)), axis=1), out


@dataclasses.dataclass(frozen=True)
class TheoryLoss(LossTerm):
    """The whole theory-driven loss in one term, from one forward pass:
    ``CE + lam · weight_margin + mu · Σ_k ‖W_k‖_∞``.

    The same value as the three terms ``cross_entropy``, ``(lam, weight_margin)`` and
    ``(mu, linf_norm)`` in a loss list, without the extra forward passes of separate terms
    (the hinge needs the clean logits, which cross-entropy also computes).

    Attributes:
      eps: the budget (a scalar, or one value per listed layer).
      layers: 0-based indices of the perturbed dense layers (default: all).
      relative: budgets relative to each ``‖W_k‖_∞``.
      form: ``"data"`` or ``"product"``.
      variant: ``"hinge"`` or ``"raw"``.
      lam: the weight of the margin term.
      mu: the weight of the norm penalty.
    """

    eps: float | tuple[float, ...] = 0.01
    layers: tuple[int, ...] | None = None
    relative: bool = True
    form: str = "data"
    variant: str = "hinge"
    lam: float = 1.0
    mu: float = 0.0
    name: ClassVar[str] = "theory"

    def _margin(self) -> WeightMarginLoss:
        return WeightMarginLoss(eps=self.eps, layers=self.layers, relative=self.relative,
                                form=self.form, variant=self.variant)

    def __post_init__(self):
        self._margin()  # validates the shared fields
        for field, value in (("lam", self.lam), ("mu", self.mu)):
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"theory {field} must be a finite number >= 0, got {value!r}")
        if isinstance(self.eps, list):
            object.__setattr__(self, "eps", tuple(self.eps))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(k) for k in self.layers))

    def check(self, struct):
        self._margin().check(struct)

    def __call__(self, struct, params, rest, x, y, key):
        del key
        pm = PureModel(struct, params, rest)
        x = _as_input(struct, x)
        x = x.astype(_float_dtype(params, x))
        hinge, logits = self._margin().penalty(pm, x, y)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        total = ce + self.lam * hinge
        if self.mu:
            chain = margin_chain(pm)
            total = total + self.mu * sum(jnp.max(jnp.sum(jnp.abs(k), axis=0))
                                          for k in chain.kernels)
        return total


@dataclasses.dataclass(frozen=True)
class LinfNormPenalty(LossTerm):
    """``Σ_k ‖W_k‖_∞`` over the model's dense layers (max row ℓ1 sum of ``W = Kᵀ``), the
    same value for every example: the μ term of the theory-driven loss.

    Attributes:
      layers: 0-based indices of the dense layers to penalize (default: all).
    """

    layers: tuple[int, ...] | None = None
    name: ClassVar[str] = "linf_norm"

    def check(self, struct):
        try:
            dense_chain(read_graph(struct))
        except GraphError as err:
            raise ValueError(f"linf_norm: {err}") from None

    def __call__(self, struct, params, rest, x, y, key):
        del key, y
        chain = margin_chain(PureModel(struct, params, rest))
        layers = range(chain.depth) if self.layers is None else self.layers
        total = sum(jnp.max(jnp.sum(jnp.abs(chain.kernels[k]), axis=0)) for k in layers)
        return jnp.broadcast_to(jnp.asarray(total), (x.shape[0],))


# --------------------------------------------------------------------------- combining
# --------------------------------------------------------------------------- weights
@dataclasses.dataclass(frozen=True)
class Warmup:
    """A term weight that ramps up linearly: ``weight · clip((step − start) / steps, 0, 1)``.

    The weight is 0 until optimizer step ``start`` (0-based, counted over the whole
    training), grows linearly over the next ``steps`` steps and stays at ``weight`` after;
    ``steps = 0`` is the constant ``weight`` from ``start`` on. Use it in place of a number
    in ``[(weight, term), ...]``, e.g. ``(Warmup(0.3, 500), WeightMarginLoss(eps=0.01))``,
    or as ``warmup_steps`` of a loss term in a config: a robustness term switched on at
    full strength from random initialization can keep the network from learning at all
    (the margin bound is loose while the margins are small), so it is phased in.

    Attributes:
      weight: the weight after the warm-up.
      steps: the length of the linear ramp in optimizer steps.
      start: the step the ramp starts at.

    Examples:
      >>> from jaxsens.losses import Warmup
      >>> w = Warmup(0.3, steps=100)
      >>> [round(float(w(s)), 3) for s in (0, 50, 100, 1000)]
      [0.0, 0.15, 0.3, 0.3]
    """

    weight: float
    steps: int
    start: int = 0

    def __post_init__(self):
        w, n, s = self.weight, self.steps, self.start
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) \
                or w < 0:
            raise ValueError(f"Warmup weight must be a finite number >= 0, got {w!r}")
        for name, v in (("steps", n), ("start", s)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Warmup {name} must be an integer >= 0, got {v!r}")

    def __call__(self, step) -> jax.Array:
        """The weight at optimizer step ``step`` (an integer or a traced scalar)."""
        t = jnp.asarray(step, jnp.float32) - self.start
        ramp = jnp.clip(t / max(self.steps, 1), 0.0, 1.0) if self.steps else \
            (t >= 0).astype(jnp.float32)
        return self.weight * ramp


def weight_at(weight, step) -> Any:
    """A term weight at optimizer step ``step``: ``weight(step)`` for a schedule
    (:class:`Warmup`, an Optax schedule), the number itself otherwise.

    Args:
      weight: a number or a callable of the step.
      step: the step (``None`` outside training).

    Returns:
      The weight to multiply the term's mean with.

    Raises:
      ValueError: a schedule without a step.
    """
    if not callable(weight):
        return weight
    if step is None:
        raise ValueError(f"the loss weight {weight!r} is a schedule and needs the optimizer "
                         f"step: pass step= (jaxsens.train passes it)")
    return weight(step)


def normalize_terms(
    terms: LossTerm | Sequence[tuple[float, LossTerm] | LossTerm],
) -> tuple[tuple[float, LossTerm], ...]:
    """``(weight, term)`` pairs from a term, a list of terms or of pairs (weight 1 default).

    Args:
      terms: a :class:`LossTerm`, or a sequence whose entries are loss terms or
        ``(weight, term)`` pairs (tuples or lists of two). A weight is a number or a
        schedule of the optimizer step (:class:`Warmup`, an Optax schedule).

    Returns:
      ``((weight, term), ...)`` in the given order; a bare term gets weight ``1.0``, a
      pair's weight is kept as given.

    Raises:
      ValueError: an entry that is neither a loss term nor a ``(weight, term)`` pair, or
        no term at all.
    """
    if isinstance(terms, LossTerm):
        terms = (terms,)
    out = []
    for item in terms:
        if isinstance(item, LossTerm):
            out.append((1.0, item))
            continue
        if (not isinstance(item, tuple | list) or len(item) != 2
                or not isinstance(item[1], LossTerm)):
            raise ValueError(
                f"loss terms must be LossTerm objects or (weight, LossTerm) pairs, got {item!r}"
            )
        out.append((item[0], item[1]))
    if not out:
        raise ValueError("need at least one loss term, e.g. [(1.0, CrossEntropy())]")
    return tuple(out)


def term_names(terms: Sequence[tuple[float, LossTerm]] | Sequence[LossTerm]) -> tuple[str, ...]:
    """Metric names of the terms: their registry names, ``_1``, ``_2`` ... for repeats.

    Args:
      terms: ``[(weight, term), ...]`` or bare terms, as :func:`normalize_terms` takes.

    Returns:
      One name per term, in order: the term's ``name`` the first time it occurs, then
      ``name_1``, ``name_2`` ... (``("cross_entropy", "noise", "noise_1")``).

    Raises:
      ValueError: as :func:`normalize_terms`.
    """
    names: list[str] = []
    seen: dict[str, int] = {}
    for _, term in normalize_terms(terms):
        n = seen.get(term.name, 0)
        seen[term.name] = n + 1
        names.append(term.name if n == 0 else f"{term.name}_{n}")
    return tuple(names)


@dataclasses.dataclass(frozen=True)
class WeightedSum(LossTerm):
    """Σ_i w_i · term_i, per example.

    Attributes:
      terms: ``((weight, term), ...)``; a bare term has weight 1. Term ``i`` gets the key
        ``fold_in(key, i)``.

    Returns:
      ``(batch,)`` weighted per-example sum.
    """

    name: ClassVar[str] = "weighted_sum"

    terms: tuple[tuple[float, LossTerm], ...]

    def __post_init__(self):
        object.__setattr__(self, "terms", normalize_terms(self.terms))

    def check(self, struct):
        for _, term in self.terms:
            term.check(struct)

    def parts(self, struct, params, rest, x, y, key) -> dict[str, jax.Array]:
        """Every term's per-example values, by :func:`term_names`."""
        return {
            name: term(struct, params, rest, x, y, jax.random.fold_in(key, i))
            for i, (name, (_, term)) in enumerate(zip(term_names(self.terms), self.terms,
                                                      strict=True))
        }

    def __call__(self, struct, params, rest, x, y, key, step=None):
        """Σ_i w_i · term_i per example, scheduled weights taken at ``step``."""
        parts = self.parts(struct, params, rest, x, y, key)
        return sum(weight_at(w, step) * p
                   for (w, _), p in zip(self.terms, parts.values(), strict=True))


def total_loss(
    terms: Sequence[tuple[float, LossTerm]] | Sequence[LossTerm],
    struct: Structure,
    params: Any,
    rest: Any,
    x: Float[Array, "batch ..."],
    y: Int[Array, " batch"],
    key: jax.Array,
    step: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The scalar training objective Σ_i w_i · mean_b term_i(x_b) and each term's mean.

    Args:
      terms: ``[(weight, term), ...]`` (a bare term has weight 1; a weight may be a
        schedule of the step, :class:`Warmup`).
      struct: the model structure; ``params``, ``rest`` its arrays.
      x: inputs ``(batch, ...)``; y: labels ``(batch,)``; key: PRNG key (term ``i`` gets
        ``fold_in(key, i)``).
      step: the optimizer step (0-based) at which scheduled weights are taken; needed
        only when there are any.

    Returns:
      ``(total, {name: batch mean of the unweighted term})`` with names from
      :func:`term_names`.

    Raises:
      ValueError: a scheduled weight and ``step=None``.
    """
    ws = WeightedSum(normalize_terms(terms))
    parts = ws.parts(struct, params, rest, x, y, key)
    means = {n: jnp.mean(p) for n, p in parts.items()}
    total = jnp.zeros((), jnp.result_type(*means.values()))
    for (w, _), m in zip(ws.terms, means.values(), strict=True):
        total = total + jnp.asarray(weight_at(w, step), total.dtype) * m
    return total, means


# --------------------------------------------------------------------------- registry
# Explicit name -> constructor mapping for configs (never getattr on a string). To add a
# term: write a frozen dataclass with a `name` that satisfies LossTerm, register it here.
LOSSES: dict[str, Callable[..., LossTerm]] = {
    "cross_entropy": CrossEntropy,
    "noise": NoiseLoss,
    "jacobian": JacobianPenalty,
    "linearized": LinearizedPenalty,
    "expected_gaussian": ExpectedGaussianLoss,
    "adversarial": AdversarialInputLoss,
    "weight_margin": WeightMarginLoss,
    "linf_norm": LinfNormPenalty,
    "theory": TheoryLoss,
}


def _noise_from_config(value) -> noise_lib.NoiseLaw:
    if isinstance(value, noise_lib.NoiseLaw):
        return value
    if isinstance(value, Mapping) and "law" in value:
        spec = dict(value)
        law = spec.pop("law")
        if law not in noise_lib.LAWS:
            raise ValueError(f"unknown noise law {law!r}; valid: {', '.join(noise_lib.LAWS)}")
        try:
            return noise_lib.LAWS[law](**spec)
        except TypeError as err:
            raise ValueError(f"noise law {law!r}: {err}") from None
    raise ValueError(
        f"noise must be a jaxsens.noise law or a mapping {{'law': name, ...}} with name one "
        f"of {', '.join(noise_lib.LAWS)}; got {value!r}"
    )


def make_loss(name: str, **kwargs: Any) -> LossTerm:
    """Build a registered loss term by name.

    Args:
      name: a key of :data:`LOSSES`.
      **kwargs: the term's fields. ``noise`` may be a law object or a mapping
        ``{"law": <name in jaxsens.noise.LAWS>, **law_kwargs}``.

    Returns:
      The term, an instance of ``LOSSES[name]`` built from ``kwargs`` (a ``noise``
      mapping converted to its law first).

    Raises:
      ValueError: unknown name, unknown or missing arguments, bad values (one line).

    Examples:
      >>> from jaxsens.losses import make_loss
      >>> make_loss("jacobian", num_projections=2)
      JacobianPenalty(site='input', num_projections=2)
      >>> make_loss("noise", site="h0", noise={"law": "absolute", "level": 0.1}).noise
      Absolute(level=0.1)
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    cls = LOSSES[name]
    fields = [f.name for f in dataclasses.fields(cast(Any, cls)) if f.init]
    bad = sorted(set(kwargs) - set(fields))
    if bad:
        raise ValueError(
            f"loss {name!r} got unknown argument(s) {bad}; valid: {fields or 'none'}"
        )
    missing = [f.name for f in dataclasses.fields(cast(Any, cls))
               if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"loss {name!r} needs argument(s) {missing}; valid: {fields}")
    if "noise" in kwargs:
        kwargs["noise"] = _noise_from_config(kwargs["noise"])
    return cls(**kwargs)
