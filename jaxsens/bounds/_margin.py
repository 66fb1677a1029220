"""Certified margin bounds under norm-bounded weight perturbations (after Tsai et al. 2021).

The network is read from its traced computation as a chain of dense layers
``h_k = σ_k(h_{k−1} K_k + b_k)`` (:func:`jaxsens.graph.dense_chain`); the logits are the
last layer's output. Layers k ∈ I are perturbed, ``Ŵ_k = W_k + Δ_k`` (``W_k = K_kᵀ``), with
``‖Δ_k‖_∞ ≤ ε_k``, ‖·‖_∞ the max row ℓ1 sum (the ℓ∞ → ℓ∞ operator norm); biases are not
perturbed; optionally the input moves in an ℓ∞ ball of radius ``ε_x``.

With ``a_k = ‖W_k‖_∞``, ``ε̄_k = ε_k [k ∈ I]``, ``L_k`` the activations' Lipschitz constant
and δ_k an upper bound on ``‖ĥ_k − h_k‖_∞``:

    δ_0 = ε_x,   δ_k = L_k [(a_k + ε̄_k) δ_{k−1} + ε̄_k ‖h_{k−1}‖_∞]

since ``ẑ_k − z_k = Ŵ_k (ĥ_{k−1} − h_{k−1}) + Δ_k h_{k−1}``. The margin ``f_y − f_j``
changes by at most

    Γ_j = (‖u_j‖_1 + 2ε̄_d) δ_{d−1} + 2ε̄_d ‖h_{d−1}‖_∞,     u_j = W_d[y] − W_d[j].

The ``"data"`` form uses the clean ``‖h_{k−1}(x)‖_∞``; the ``"product"`` form only ``‖x‖_∞``,
through ``‖h_k‖_∞ ≤ |σ_k(0)| + L_k (a_k ‖h_{k−1}‖_∞ + ‖b_k‖_∞)`` — for a bias-free ReLU
network it is the closed form ``‖x‖_∞ [(‖u‖_1 + 2ε̄_d) Π_{k<d}(a_k + ε̄_k) − ‖u‖_1 Π_{k<d}
a_k]``. Data ≤ product, always. Everything is computed in log space so that deep or wide
networks do not overflow.

This form is derived here (DESIGN §3.3) and sound; the paper's exact constants could not
be recovered, and none are attributed to it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike, Float, Int

from .. import graph as graph_lib
from ..sites import PureModel, split

__all__ = [
    "MarginChain",
    "margin_chain",
    "layer_budgets",
    "weight_margin_bound",
    "certified_accuracy",
    "loss_change_bound",
    "certified_radius",
    "generalization_term",
    "output_linf_bound",
    "margin_bound_and_logits",
    "FORMS",
]

FORMS = ("data", "product")


@dataclasses.dataclass(frozen=True)
class MarginChain:
    """A model read as a dense chain, with the values the bound needs.

    Attributes:
      kernels: the ``(n_in, n_out)`` kernels, in forward order.
      biases: the biases (``(n_out,)``) or ``None``.
      lipschitz: each hidden layer's activation constant (``len(kernels) − 1``).
      at_zero: each hidden activation's ``|σ(0)|``.
      activations: their names.
      sites: each kernel's weight-site name (``None`` if it is computed, not a parameter).
    """

    kernels: tuple[jax.Array, ...]
    biases: tuple[jax.Array | None, ...]
    lipschitz: tuple[float, ...]
    at_zero: tuple[float, ...]
    activations: tuple[str, ...]
    sites: tuple[str | None, ...]

    @property
    def depth(self) -> int:
        return len(self.kernels)


def _steps(pm: PureModel) -> tuple[graph_lib.DenseStep, ...]:
    try:
        return graph_lib.dense_chain(graph_lib.read(pm.structure))
    except graph_lib.GraphError as err:
        raise ValueError(str(err)) from None


def margin_chain(model: nnx.Module | PureModel) -> MarginChain:
    """Read ``model`` as a chain of dense layers and elementwise activations.

    Args:
      model: an NNX module or ``PureModel`` (any architecture that is such a chain:
        reshapes, activation sites and activations written as primitives are allowed).

    Returns:
      The :class:`MarginChain` with the model's current kernels and biases.

    Raises:
      ValueError: the model is not such a chain (a one-line message naming the operation).
    """
    pm = split(model)
    steps = _steps(pm)
    g = graph_lib.read(pm.structure)
    weights, rest = graph_lib.state_arrays(pm.structure, pm.params, pm.rest)
    need = [s.kernel for s in steps] + [s.bias for s in steps if isinstance(s.bias, int)]
    env = graph_lib.evaluate(g, weights, rest, None, const_only=True, capture=need)

    def bias(b):
        if b is None:
            return None
        v = b.value if isinstance(b, graph_lib.Lit) else env[b]
        return jnp.asarray(v).reshape(-1)

    acts = [s.activation or ("identity", 1.0, 0.0) for s in steps[:-1]]
    return MarginChain(
        kernels=tuple(env[s.kernel] for s in steps),
        biases=tuple(bias(s.bias) for s in steps),
        lipschitz=tuple(a[1] for a in acts),
        at_zero=tuple(a[2] for a in acts),
        activations=tuple(a[0] for a in acts),
        sites=tuple(s.site for s in steps),
    )


def _linf(kernel: jax.Array) -> jax.Array:
    """‖W‖_∞ of W = Kᵀ: the largest ℓ1 norm of a column of K."""
    return jnp.max(jnp.sum(jnp.abs(kernel), axis=0))


def layer_budgets(chain: MarginChain, eps, layers: Sequence[int], *, relative: bool
                  ) -> tuple[jax.Array, ...]:
    """ε̄_k for every layer: ``eps`` (or ``eps · ‖W_k‖_∞``) on the listed layers, else 0.

    Args:
      chain: from :func:`margin_chain`.
      eps: a scalar, or one value per listed layer.
      layers: 0-based indices of the perturbed dense layers.
      relative: budgets relative to ``‖W_k‖_∞``.

    Returns:
      One scalar budget per layer.

    Raises:
      ValueError: a layer index out of range or repeated, or a wrong number of budgets.
    """
    layers = tuple(int(k) for k in layers)
    d = chain.depth
    if any(k < 0 or k >= d for k in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct indices of the {d} dense layers "
                         f"(0..{d - 1}), got {list(layers)}")
    e = jnp.asarray(eps)
    if e.ndim == 0:
        per = [e] * len(layers)
    elif e.shape == (len(layers),):
        per = [e[i] for i in range(len(layers))]
    else:
        raise ValueError(f"eps must be a scalar or one value per listed layer "
                         f"({len(layers)}), got shape {tuple(e.shape)}")
    dtype = jnp.result_type(chain.kernels[0].dtype, e.dtype, jnp.float32)
    out = [jnp.zeros((), dtype)] * d
    for k, ek in zip(layers, per, strict=True):
        ek = jnp.asarray(ek, dtype)
        out[k] = ek * _linf(chain.kernels[k]) if relative else ek
    return tuple(out)


def _log(v) -> jax.Array:
    v = jnp.asarray(v)
    return jnp.where(v > 0, jnp.log(jnp.where(v > 0, v, 1.0)), -jnp.inf)


def _logsum(*terms: jax.Array) -> jax.Array:
    out = terms[0]
    for t in terms[1:]:
        out = jnp.logaddexp(out, t)
    return out


def _log_gamma(chain: MarginChain, budgets, hidden_norms, x_norm, y, *, form: str,
               input_eps) -> jax.Array:
    """log Γ per example and class ``(B, k)``; ``hidden_norms[k]`` is ``‖h_k‖_∞`` (B,)
    (``h_0 = x``) for the data form."""
    log_delta, log_h = _log_delta_last(chain, budgets, hidden_norms, x_norm, form=form,
                                       input_eps=input_eps)
    last = chain.kernels[-1]
    # ‖u_j‖_1 = ‖K[:, y] − K[:, j]‖_1 for every pair of classes.
    pair = jnp.sum(jnp.abs(last[:, :, None] - last[:, None, :]), axis=0)  # (k, k)
    u = pair[y]  # (B, k)
    e_d = budgets[-1]
    log_g = _logsum(_log(u + 2 * e_d) + log_delta[:, None],
                    _log(2 * e_d) + log_h[:, None])
    k = last.shape[1]
    return jnp.where(jax.nn.one_hot(y, k, dtype=bool), -jnp.inf, log_g)


def _log_delta_last(chain: MarginChain, budgets, hidden_norms, x_norm, *, form: str,
                    input_eps) -> tuple[jax.Array, jax.Array]:
    """(log δ_{d−1}, log ‖h_{d−1}‖_∞ or its bound) per example: the recursion up to the
    last layer's input."""
    a = [_linf(k) for k in chain.kernels]
    log_eps = [_log(e) for e in budgets]
    log_h = _log(x_norm)
    log_delta = _log(jnp.broadcast_to(jnp.asarray(input_eps, x_norm.dtype), x_norm.shape))
    for k in range(chain.depth - 1):
        lip = math.log(chain.lipschitz[k])
        log_delta = lip + _logsum(_log(a[k] + budgets[k]) + log_delta, log_eps[k] + log_h)
        if form == "data":
            log_h = _log(hidden_norms[k + 1])
        else:
            b = chain.biases[k]
            log_b = _log(jnp.max(jnp.abs(b))) if b is not None else -jnp.inf
            log_h = _logsum(jnp.full_like(log_h, _log(chain.at_zero[k])),
                            lip + _logsum(_log(a[k]) + log_h, jnp.full_like(log_h, log_b)))
    return log_delta, log_h


def output_linf_bound(model, x, *, eps, layers: Sequence[int], relative: bool = False,
                      form: Literal["data", "product"] = "data",
                      input_eps: float = 0.0) -> Float[Array, " batch"]:
    """A certified bound on ``‖f(Ŵ, x̂) − f(W, x)‖_∞`` under the same perturbations as
    :func:`weight_margin_bound`: ``(a_d + ε̄_d) δ_{d−1} + ε̄_d ‖h_{d−1}‖_∞``.

    Args:
      model: a dense-chain model.
      x: inputs ``(batch, ...)``.
      eps: the budget (scalar or per listed layer).
      layers: the perturbed dense layers.
      relative: budgets relative to ``‖W_k‖_∞``.
      form: ``"data"`` or ``"product"``.
      input_eps: a joint ℓ∞ input radius.

    Returns:
      ``(batch,)`` bounds on the largest change of any output.
    """
    pm = split(model)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    chain = margin_chain(pm)
    budgets = layer_budgets(chain, eps, layers, relative=relative)
    xf = x.reshape(x.shape[0], -1)
    norms = _hidden_norms(pm, x) if form == "data" else None
    log_delta, log_h = _log_delta_last(chain, budgets, norms, jnp.max(jnp.abs(xf), axis=-1),
                                       form=form, input_eps=input_eps)
    e_d = budgets[-1]
    return jnp.exp(_logsum(_log(_linf(chain.kernels[-1]) + e_d) + log_delta,
                           _log(e_d) + log_h))


def _norms_and_logits(pm: PureModel, x: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """:func:`_hidden_norms` and the flattened logits, from the same forward pass."""
    g = graph_lib.read(pm.structure, x.dtype)
    try:
        steps = graph_lib.dense_chain(g)
    except graph_lib.GraphError as err:
        raise ValueError(str(err)) from None
    weights, rest = graph_lib.state_arrays(pm.structure, pm.params, pm.rest)
    capture = [v for v in (g.nodes[s.node].inputs[0] for s in steps) if isinstance(v, int)]

    def one(x1):
        env = graph_lib.evaluate(g, weights, rest, x1[None], capture=capture)
        out = jnp.concatenate([env[o].reshape(-1) for o in g.outputs])
        return [jnp.max(jnp.abs(env[v])) for v in capture], out

    norms, logits = jax.vmap(one)(x.reshape(x.shape[0], *pm.input_shape))
    return list(norms), logits


def margin_bound_and_logits(model, x, y, *, eps, layers: Sequence[int], relative: bool = False,
                            form: Literal["data", "product"] = "data"
                            ) -> tuple[Float[Array, "batch k"], Float[Array, "batch k"]]:
    """:func:`weight_margin_bound` and the clean logits, from one forward pass (what a
    training loss needs).

    Args:
      model: a dense-chain model.
      x: inputs ``(batch, ...)``.
      y: integer labels.
      eps: the budget (scalar or per listed layer).
      layers: the perturbed dense layers.
      relative: budgets relative to ``‖W_k‖_∞``.
      form: ``"data"`` or ``"product"``.

    Returns:
      ``(Γ, logits)``, both ``(batch, num_classes)``.
    """
    pm, x, y = _prepare(model, x, y)
    chain = margin_chain(pm)
    budgets = layer_budgets(chain, eps, layers, relative=relative)
    norms, logits = _norms_and_logits(pm, x)
    x_norm = jnp.max(jnp.abs(x.reshape(x.shape[0], -1)), axis=-1)
    log_g = _log_gamma(chain, budgets, norms if form == "data" else None, x_norm, y,
                       form=form, input_eps=0.0)
    return jnp.exp(log_g), logits


def _hidden_norms(pm: PureModel, x: jax.Array) -> list[jax.Array]:
    """``‖h_k(x)‖_∞`` of every dense layer's input (``h_0 = x``), per example."""
    return _norms_and_logits(pm, x)[0]


def _prepare(model, x, y) -> tuple[PureModel, jax.Array, jax.Array]:
    pm = split(model)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    y = jnp.asarray(y)
    if x.ndim < 1 or y.shape != (x.shape[0],) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must be integer labels of shape ({x.shape[0]},), got {y.dtype} "
                         f"{tuple(y.shape)}")
    return pm, x, y


def weight_margin_bound(
    model: nnx.Module | PureModel,
    x: Float[ArrayLike, "batch ..."],
    y: Int[ArrayLike, " batch"],
    *,
    eps: float | Float[ArrayLike, " n"],
    layers: Sequence[int],
    relative: bool = False,
    form: Literal["data", "product"] = "data",
    input_eps: float | Float[ArrayLike, ""] = 0.0,
) -> Float[Array, "batch k"]:
    """Γ_j: a certified bound on how much every margin ``f_y − f_j`` can change.

    For every perturbation ``‖Δ_k‖_∞ ≤ ε_k`` of the listed dense layers (max row ℓ1 sum;
    biases fixed) and every input within ``‖x̂ − x‖_∞ ≤ input_eps``:
    ``|(f_y − f_j)(Ŵ, x̂) − (f_y − f_j)(W, x)| ≤ Γ_j``. The prediction is certified when
    ``f_y − f_j > Γ_j`` for every ``j ≠ y``. See the module docstring for the recursion;
    computed in log space (a bound too large for the dtype is ``inf``, never wrong).

    Args:
      model: an NNX module or ``PureModel`` that is a chain of dense layers and elementwise
        activations (see :func:`margin_chain`).
      x: inputs ``(batch, ...)``.
      y: integer labels ``(batch,)``.
      eps: the budget: a scalar or one value per listed layer.
      layers: 0-based indices of the perturbed dense layers, in forward order.
      relative: budgets relative to each layer's ``‖W_k‖_∞``.
      form: ``"data"`` (the clean hidden norms; tighter) or ``"product"`` (only ``‖x‖_∞``).
      input_eps: radius of an ℓ∞ ball around the input perturbed jointly.

    Returns:
      Γ of shape ``(batch, num_classes)``, zero in the column of the true class.

    Raises:
      ValueError: a model that is not a dense chain, bad layers or budgets, bad labels or
        an unknown form.
    """
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not a margin-bound form; choose one of "
                         f"{list(FORMS)}")
    pm, x, y = _prepare(model, x, y)
    chain = margin_chain(pm)
    budgets = layer_budgets(chain, eps, layers, relative=relative)
    xf = x.reshape(x.shape[0], -1)
    norms = _hidden_norms(pm, x) if form == "data" else None
    x_norm = jnp.max(jnp.abs(xf), axis=-1)
    log_g = _log_gamma(chain, budgets, norms, x_norm, y, form=form, input_eps=input_eps)
    return jnp.exp(log_g)


def _margins(pm: PureModel, x, y) -> jax.Array:
    out = pm.apply(x.reshape(x.shape[0], *pm.input_shape)).reshape(x.shape[0], -1)
    return jnp.take_along_axis(out, y[:, None], axis=1) - out  # f_y − f_j


def certified_accuracy(model, x, y, *, eps, layers: Sequence[int], relative: bool = False,
                       form: Literal["data", "product"] = "data",
                       input_eps: float = 0.0) -> jax.Array:
    """Fraction of examples whose prediction is certified correct under the budget.

    Args:
      model: a dense-chain model (see :func:`weight_margin_bound`).
      x: inputs ``(batch, ...)``.
      y: integer labels.
      eps: the budget (scalar or per listed layer).
      layers: the perturbed dense layers.
      relative: budgets relative to ``‖W_k‖_∞``.
      form: ``"data"`` or ``"product"``.
      input_eps: a joint ℓ∞ input radius.

    Returns:
      A scalar in [0, 1]: the examples with ``f_y − f_j > Γ_j`` for every ``j ≠ y``.
    """
    pm, x, y = _prepare(model, x, y)
    gamma = weight_margin_bound(pm, x, y, eps=eps, layers=layers, relative=relative,
                                form=form, input_eps=input_eps)
    m = _margins(pm, x, y)
    ok = jnp.all((m > gamma) | jax.nn.one_hot(y, m.shape[1], dtype=bool), axis=1)
    return jnp.mean(ok.astype(jnp.float32))


def loss_change_bound(model, x, y, *, eps, layers: Sequence[int], relative: bool = False,
                      form: Literal["data", "product"] = "data",
                      input_eps: float = 0.0) -> Float[Array, " batch"]:
    """A certified bound on the rise of the cross-entropy under the joint perturbation.

    CE = log Σ_j exp(−m_j) with margins m_j = f_y − f_j; every m_j falls by at most Γ_j,
    so the perturbed CE is at most ``log Σ_j exp(Γ_j − m_j)``.

    Args:
      model: a dense-chain model.
      x: inputs ``(batch, ...)``.
      y: integer labels.
      eps: the weight budget (scalar or per listed layer).
      layers: the perturbed dense layers.
      relative: budgets relative to ``‖W_k‖_∞``.
      form: ``"data"`` or ``"product"``.
      input_eps: the ℓ∞ input radius.

    Returns:
      ``(batch,)`` upper bounds on CE(perturbed) − CE(clean), ≥ 0.
    """
    pm, x, y = _prepare(model, x, y)
    gamma = weight_margin_bound(pm, x, y, eps=eps, layers=layers, relative=relative,
                                form=form, input_eps=input_eps)
    m = _margins(pm, x, y)
    clean = jax.nn.logsumexp(-m, axis=1)
    return jax.nn.logsumexp(gamma - m, axis=1) - clean


def certified_radius(model, x, y, *, layers: Sequence[int], relative: bool = True,
                     form: Literal["data", "product"] = "data", iterations: int = 48,
                     limits: tuple[float, float] = (1e-9, 1e3)) -> Float[Array, " batch"]:
    """Per example, the largest budget ε (the same on every listed layer) under which
    the prediction is certified: how far those weights can move before it can change.

    Γ grows with ε, so the radius is found by bisection on log ε within ``limits``:
    misclassified examples get 0, examples certified at the upper limit get it.

    Args:
      model: a dense-chain model.
      x: inputs ``(batch, ...)``.
      y: integer labels.
      layers: the perturbed dense layers.
      relative: ε relative to each ``‖W_k‖_∞`` (else absolute).
      form: ``"data"`` or ``"product"``.
      iterations: bisection steps (48 resolve log ε to ~1e-13 of its range).
      limits: the smallest and largest ε considered.

    Returns:
      ``(batch,)`` certified radii.
    """
    pm, x, y = _prepare(model, x, y)
    m = _margins(pm, x, y)
    true = jax.nn.one_hot(y, m.shape[1], dtype=bool)

    def certified(log_e):
        gamma = jax.vmap(lambda le, x1, y1: weight_margin_bound(
            pm, x1[None], y1[None], eps=jnp.exp(le), layers=layers, relative=relative,
            form=form)[0])(log_e, x, y)
        return jnp.all((m > gamma) | true, axis=1)

    lo = jnp.full(x.shape[:1], math.log(limits[0]), m.dtype)
    hi = jnp.full(x.shape[:1], math.log(limits[1]), m.dtype)
    correct = jnp.all((m > 0) | true, axis=1)
    ok_lo, ok_hi = certified(lo), certified(hi)

    def step(bounds_, _):
        a, b = bounds_
        mid = 0.5 * (a + b)
        ok = certified(mid)
        return (jnp.where(ok, mid, a), jnp.where(ok, b, mid)), None

    (lo, _), _ = jax.lax.scan(step, (lo, hi), None, length=iterations)
    radius = jnp.where(ok_hi, limits[1], jnp.where(ok_lo, jnp.exp(lo), 0.0))
    return jnp.where(correct, radius, 0.0)


def generalization_term(model, x, *, eps=0.0, layers: Sequence[int] = (),
                        relative: bool = False, num_examples: int | None = None) -> dict:
    """Rademacher-complexity bound of the class of perturbed networks.

    Golowich, Rakhlin, Shamir (COLT 2018), Theorem 1: for depth-d networks with
    positive-homogeneous 1-Lipschitz activations (ReLU), inputs ‖x‖₂ ≤ B and
    ‖W_k‖_F ≤ M_k, the empirical Rademacher complexity over m examples is at most
    ``B (√(2 d log 2) + 1) Π_k M_k / √m``. Biases are folded in as an extra input of
    value 1 carried through every layer (B² + 1; ``M_k² = ‖W_k‖_F² + ‖b_k‖² (+1 for the
    hidden layers)``). The perturbed class has ``M_k + √(rows_k) ε̄_k``: every row of
    ``Δ_k`` has ‖·‖₂ ≤ ‖·‖₁ ≤ ε̄_k. The folding and the perturbation radii are derived
    here, not taken from the papers.

    Args:
      model: a dense-chain ReLU model.
      x: the sample (the training set) ``(m, ...)``; B is its largest ‖x‖₂.
      eps: the weight budget (scalar or per listed layer).
      layers: the perturbed dense layers (none: the clean class).
      relative: budgets relative to ``‖W_k‖_∞``.
      num_examples: m (default: ``len(x)``).

    Returns:
      ``{"complexity", "input_radius", "frobenius_radii", "depth", "num_examples"}``.

    Raises:
      ValueError: a hidden activation other than ReLU (or identity).
    """
    pm = split(model)
    chain = margin_chain(pm)
    bad = [a for a in chain.activations if a not in ("relu", "identity")]
    if bad:
        raise ValueError(f"the Rademacher bound of Golowich et al. needs positive-homogeneous "
                         f"activations (ReLU); the model has {sorted(set(bad))}")
    budgets = layer_budgets(chain, eps, layers, relative=relative)
    xs = jnp.asarray(x).reshape(len(x), -1)
    has_bias = any(b is not None for b in chain.biases)
    b_x = jnp.sqrt(jnp.max(jnp.sum(jnp.square(xs), axis=1)) + (1.0 if has_bias else 0.0))
    radii = []
    for k, (w, b) in enumerate(zip(chain.kernels, chain.biases, strict=True)):
        sq = jnp.sum(jnp.square(w))
        if b is not None:
            sq = sq + jnp.sum(jnp.square(b))
        if has_bias and k < chain.depth - 1:
            sq = sq + 1.0
        radii.append(jnp.sqrt(sq) + math.sqrt(w.shape[1]) * budgets[k])
    m = int(num_examples if num_examples is not None else xs.shape[0])
    d = chain.depth
    log_c = (jnp.log(b_x) + math.log(math.sqrt(2 * d * math.log(2)) + 1)
             + sum(jnp.log(r) for r in radii) - 0.5 * math.log(m))
    return {"complexity": float(jnp.exp(log_c)), "input_radius": float(b_x),
            "frobenius_radii": [float(r) for r in radii], "depth": d, "num_examples": m}
