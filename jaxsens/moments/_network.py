"""Moments of deep networks under Gaussian input (Bibi et al. 2018), on any model.

* Two-stage linearization: split F at a ReLU site r = relu(z). By automatic
  differentiation at the clean input, z ≈ A x + c1 (A = ∂z/∂x), and
  F ≈ B r + C x + c2 (B = ∂F/∂r; C = ∂F/∂x holding r fixed, non-zero when a residual
  connection goes around the site). The exact Affine-ReLU-Affine moments give the
  first term; the bypass adds C Σ Cᵀ and the cross-covariance of r and x, which Stein's
  lemma gives exactly: Cov(relu(z), x) = diag(Φ(μ_z/σ_z)) A Σ.
* Layerwise propagation: carry (mean, covariance) through the chain of affine steps
  (dense, convolution, average pooling, inference-mode normalization, reshapes) and
  ReLUs read from the model's traced computation — exact through affine maps, exact
  first and second moments through each ReLU given a Gaussian pre-activation (full
  covariance), or with the covariance kept diagonal. Residual additions are refused:
  their branches are correlated.

Inputs are per example (no batch axis); the covariance is over the flattened input.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .. import graph as graph_lib
from ..precision import exact
from ..quadrature import rule as quadrature_rule
from ..quadrature import weights as quadrature_weights
from ..sites import PureModel, split
from ._gaussian import GaussianMoments, affine_relu_affine, relu_mean, relu_moments
from ._gaussian import relu_second_moment as _relu_m2

__all__ = [
    "TwoStage",
    "two_stage_linearization",
    "split_sites",
    "two_stage_moments",
    "bypass_terms",
    "layerwise_moments",
    "propagate_graph",
    "output_moments",
    "check_method",
    "METHODS",
]

METHODS = ("two_stage", "layerwise_full", "layerwise_diag")


class TwoStage(NamedTuple):
    """F(x) ≈ B relu(A x + c1) + C x + c2 around a clean input (x flattened).

    Attributes:
      A: ``(p, d)`` Jacobian of the pre-activation at the split w.r.t. the input.
      c1: ``(p,)`` so that A x0 + c1 is the clean pre-activation.
      B: ``(k, p)`` Jacobian of the output w.r.t. the split's ReLU output.
      c2: ``(k,)`` so that B relu(z0) + C x0 + c2 is the clean output.
      C: ``(k, d)`` Jacobian of the output w.r.t. the input along paths that bypass the
        split (residual connections); zeros when every path passes through it.
    """

    A: Float[Array, "p d"]
    c1: Float[Array, " p"]
    B: Float[Array, "k p"]
    c2: Float[Array, " k"]
    C: Float[Array, "k d"]


def split_sites(pm: PureModel) -> tuple[str, ...]:
    """Activation sites usable as a two-stage split: sites whose value is ``relu(z)``.

    Args:
      pm: the split model (its traced computation is read).

    Returns:
      The site names, in forward order (empty without such a site).
    """
    return tuple(graph_lib.relu_sites(graph_lib.read(pm.structure)))


def _split_site(pm: PureModel, split_at: str | None) -> str:
    allowed = split_sites(pm)
    if not allowed:
        raise ValueError("the model has no activation site whose value is relu(...) to split "
                         "the two-stage moments at; mark a ReLU output with self.perturb")
    name = allowed[-1] if split_at is None else split_at
    if name not in allowed:
        raise ValueError(f"split={name!r} is not a ReLU site; allowed: {list(allowed)}")
    return name


def _flat_outputs(g: graph_lib.Graph, env) -> jax.Array:
    return jnp.concatenate([env[o].reshape(-1) for o in g.outputs])


def two_stage_linearization(model, x1: jax.Array, *, split_at: str | None = None) -> TwoStage:
    """First-order expansions of the two halves of the network around ``x1``.

    Any architecture works as long as the split site's value is the output of a ReLU:
    A, B and C come from automatic differentiation of the model's own computation.

    Args:
      model: an NNX module or ``PureModel`` with a ReLU site.
      x1: one clean input (no batch axis).
      split_at: the ReLU site to split at (default: the last one).

    Returns:
      A :class:`TwoStage` ``(A, c1, B, c2, C)``.
    """
    pm = split(model)
    site = _split_site(pm, split_at)
    struct, params, rest = pm.structure, pm.params, pm.rest
    x1 = jnp.asarray(x1)
    g = graph_lib.read(struct, x1.dtype)
    z_var = graph_lib.relu_sites(g)[site]
    weights, rest_leaves = graph_lib.state_arrays(struct, params, rest)
    xf = x1.reshape(-1)

    def pre_activation(xv):
        env = graph_lib.evaluate(g, weights, rest_leaves, xv.reshape(1, *struct.input_shape),
                                 capture=[z_var], until=z_var)
        return env[z_var].reshape(-1)

    z0 = pre_activation(xf)
    jac = jax.jacfwd if xf.size <= z0.size else jax.jacrev
    A = jac(pre_activation)(xf)
    c1 = z0 - jnp.matmul(A, xf, precision="highest")

    out0, vals0 = struct.apply_one_with_values(params, rest, x1)
    h0 = vals0[site]

    def head(delta):
        return struct.apply_one(params, rest, x1, {site: delta.reshape(h0.shape)}).reshape(-1)

    zero = jnp.zeros(h0.size, h0.dtype)
    k = out0.size
    B = jax.jacrev(head)(zero) if k <= h0.size else jax.jacfwd(head)(zero)
    if graph_lib.bypasses(g, site):
        held = {g.site_vars[site][1]: h0[None]}

        def around(xv):
            env = graph_lib.evaluate(g, weights, rest_leaves,
                                     xv.reshape(1, *struct.input_shape), override=held)
            return _flat_outputs(g, env)

        C = jax.jacrev(around)(xf) if k <= xf.size else jax.jacfwd(around)(xf)
    else:
        C = jnp.zeros((k, xf.size), B.dtype)
    c2 = (out0.reshape(-1) - jnp.matmul(B, h0.reshape(-1), precision="highest")
          - jnp.matmul(C, xf, precision="highest"))
    return TwoStage(A, c1, B, c2, C)


@exact
def bypass_terms(ts: TwoStage, mu: jax.Array, sigma_ct: jax.Array, pre_mean: jax.Array,
                 pre_sd: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What the bypass ``C x`` adds to the two-stage output mean and covariance.

    With y = B r + C x + c2, r = relu(z), z = A x + c1 and x ~ N(μ, Σ):
    E[C x] = C μ, and Cov y gains C Σ Cᵀ + B K Cᵀ + C Kᵀ Bᵀ with the cross-covariance
    K = Cov(r, x) = diag(Φ(μ_z/σ_z)) A Σ (Stein's lemma, exact for Gaussian x).

    Args:
      ts: the expansion (its ``C`` may be zero).
      mu: ``(d,)`` input mean.
      sigma_ct: ``(d, k)`` Σ Cᵀ.
      pre_mean: ``(p,)`` mean of the pre-activation z.
      pre_sd: ``(p,)`` its standard deviations.

    Returns:
      ``(mean term (k,), covariance term (k, k))``.
    """
    active = jax.scipy.special.ndtr(
        jnp.where(pre_sd > 0, pre_mean / jnp.where(pre_sd > 0, pre_sd, 1.0),
                  jnp.where(pre_mean > 0, jnp.inf, -jnp.inf)))
    k_ct = ts.A @ sigma_ct  # A Σ Cᵀ, (p, k)
    cross = ts.B @ (active[:, None] * k_ct)  # B K Cᵀ
    return ts.C @ mu, ts.C @ sigma_ct + cross + cross.T


def two_stage_moments(model, x1, mean_shift, cov, *, split_at: str | None = None
                      ) -> GaussianMoments:
    """Output mean and covariance for input ~ N(x1 + mean_shift, cov), two-stage linearized.

    Args:
      model: an NNX module or ``PureModel`` with a ReLU site.
      x1: the clean input (no batch axis), the expansion point.
      mean_shift: shift of the input mean (input shape).
      cov: ``(d, d)`` input covariance over the flattened input.
      split_at: the ReLU site to split at (default: the last one).

    Returns:
      ``GaussianMoments(mean: (k,), cov: (k, k))`` of the flattened output.
    """
    ts = two_stage_linearization(model, x1, split_at=split_at)
    mu = jnp.asarray(x1).reshape(-1) + jnp.asarray(mean_shift).reshape(-1)
    base = affine_relu_affine(ts.A, ts.c1, ts.B, ts.c2, mu, cov)
    with jax.default_matmul_precision("highest"):
        pre_mean = ts.A @ mu + ts.c1
        pre_sd = jnp.sqrt(jnp.clip(jnp.sum((ts.A @ cov) * ts.A, axis=1), 0.0, None))
        dm, dc = bypass_terms(ts, mu, cov @ ts.C.T, pre_mean, pre_sd)
    return GaussianMoments(base.mean + dm, base.cov + dc)


# --------------------------------------------------------------------------- layerwise
def _vals(step: graph_lib.MomentStep, consts, live) -> list:
    return [live if j == step.live else (a.value if isinstance(a, graph_lib.Lit)
                                         else consts[a])
            for j, a in enumerate(step.node.inputs)]


def _affine(step, consts, v):
    return graph_lib.evaluate_node(step.node, _vals(step, consts, v))


def _linear(step, consts, t):
    """The linear part of an affine step applied to ``t``."""
    name = step.node.name
    if name in ("add", "sub"):
        return -t if name == "sub" and step.live == 1 else t
    if name in ("pad", "concatenate"):
        vals = [jnp.zeros_like(v) if j != step.live else t
                for j, v in enumerate(_vals(step, consts, t))]
        return graph_lib.evaluate_node(step.node, vals)
    return _affine(step, consts, t)


def _linear_flat(step, consts, shape, t):
    return _linear(step, consts, t.reshape(shape)).reshape(-1)


def _variance(step, consts, var):
    """Variances after an affine step, units taken as independent (diagonal mode)."""
    name = step.node.name
    if name in ("add", "sub"):
        return var
    vals = _vals(step, consts, var)
    if name in ("dot_general", "conv_general_dilated", "mul", "div"):
        vals = [v if j == step.live else jnp.square(v) for j, v in enumerate(vals)]
    elif name in ("pad", "concatenate"):
        vals = [v if j == step.live else jnp.zeros_like(v) for j, v in enumerate(vals)]
    elif name == "neg":
        return var
    return graph_lib.evaluate_node(step.node, vals)


def _dense_rows(step, consts, sd):
    """Rows of diag(sd) pushed through ``x @ W`` without forming diag(sd): sd_i W[i]."""
    node = step.node
    if node.name != "dot_general" or step.live != 0:
        return None
    (cl, cr), (bl, br) = node.params["dimension_numbers"]
    w = node.inputs[1]
    if bl or br or tuple(cl) != (1,) or tuple(cr) != (0,):
        return None
    wv = w.value if isinstance(w, graph_lib.Lit) else consts[w]
    if wv.ndim != 2:
        return None
    return (sd[:, None] * wv)[:, None, :]


@exact
def propagate_graph(pm: PureModel, mu: jax.Array, *, full: bool, cov: jax.Array | None = None,
                    rows: jax.Array | None = None, var: jax.Array | None = None
                    ) -> GaussianMoments:
    """Carry (mean, covariance) through the model's affine steps and ReLUs.

    The input covariance is given one of three ways: ``cov`` (d, d); ``rows`` F (r, d)
    with Σ = FᵀF (a few noise directions, e.g. one pixel); or ``var`` (d,), Σ = diag(var).
    Until the first ReLU the covariance is carried exactly in that form; after it, in
    full (``full``) or as variances only.

    Args:
      pm: the model (its traced computation is read).
      mu: the input mean (any shape of size d).
      full: keep full covariances after the first ReLU (else variances only).
      cov: a full input covariance.
      rows: directions F with Σ = FᵀF.
      var: input variances (diagonal Σ).

    Returns:
      ``GaussianMoments(mean: (k,), cov: (k, k))`` (diagonal ``cov`` unless ``full``).

    Raises:
      ValueError: a residual addition, or an operation neither affine nor a ReLU.
    """
    struct = pm.structure
    mu = jnp.asarray(mu)
    g = graph_lib.read(struct, mu.dtype)
    steps = graph_lib.moment_steps(g)
    weights, rest_leaves = graph_lib.state_arrays(struct, pm.params, pm.rest)
    need = [a for st in steps for j, a in enumerate(st.node.inputs)
            if isinstance(a, int) and j != st.live]
    consts = graph_lib.evaluate(g, weights, rest_leaves, None, const_only=True, capture=need)
    m = mu.reshape(1, *struct.input_shape)
    d = m.size
    # The covariance: ("full", Σ (n, n)), ("rows", F (r, *shape)), ("diag", var (shape)),
    # or after a ReLU in diagonal mode ("var", var (shape)).
    if cov is not None:
        state, c = "full", jnp.asarray(cov, m.dtype).reshape(d, d)
    elif rows is not None:
        state, c = "rows", jnp.asarray(rows, m.dtype).reshape(-1, *m.shape)
    else:
        state, c = "diag", jnp.broadcast_to(jnp.asarray(var, m.dtype), (d,)).reshape(m.shape)
    for step in steps:
        if step.kind == "relu":
            n = m.size
            if state == "full":
                sigma = c if full else jnp.diagonal(c)
            elif state == "rows":
                f = c.reshape(c.shape[0], n)
                sigma = f.T @ f if full else jnp.sum(f * f, axis=0)
            elif state == "diag":
                sigma = jnp.diag(c.reshape(n)) if full else c.reshape(n)
            else:
                sigma = c.reshape(n)
            if full and sigma.ndim == 1:
                sigma = jnp.diag(sigma)
            if full:
                mom = relu_moments(m.reshape(n), sigma)
                m_new, c = mom.mean, mom.cov
                state = "full"
            else:
                sd = jnp.sqrt(jnp.clip(sigma, 0.0, None))
                m_new = relu_mean(m.reshape(n), sd)
                c = jnp.clip(_relu_m2(m.reshape(n), sd) - m_new**2, 0.0, None).reshape(m.shape)
                state = "var"
            m = m_new.reshape(m.shape)
            continue
        m_out = _affine(step, consts, m)
        if state == "full":
            lin = jax.vmap(functools.partial(_linear_flat, step, consts, m.shape))
            half = lin(c)  # rows: L Σ[i]  → (n_in, n_out) = Σ Lᵀ
            c = lin(half.T)  # L (Σ Lᵀ) columns → (n_out, n_out)
            c = 0.5 * (c + c.T)
        elif state == "rows":
            c = jax.vmap(functools.partial(_linear, step, consts))(c)
        elif state == "diag":
            if step.node.name in ("dot_general", "conv_general_dilated"):
                sd = jnp.sqrt(c.reshape(-1))
                dense = _dense_rows(step, consts, sd)
                if dense is None:
                    eye = jnp.diag(sd).reshape(-1, *m.shape)
                    dense = jax.vmap(functools.partial(_linear, step, consts))(eye)
                state, c = "rows", dense
            else:
                c = _variance(step, consts, c)
        else:
            c = _variance(step, consts, c)
        m = m_out
    n = m.size
    if state == "rows":
        f = c.reshape(c.shape[0], n)
        out = f.T @ f if full else jnp.diag(jnp.sum(f * f, axis=0))
    elif state == "full":
        out = c if full else jnp.diag(jnp.diagonal(c))
    else:
        out = jnp.diag(c.reshape(n))
    return GaussianMoments(m.reshape(-1), out)


@exact
def layerwise_moments(model, x1, mean_shift, cov, *,
                      covariance: Literal["full", "diag"] = "full") -> GaussianMoments:
    """Propagate (mean, covariance) through the model's layers one by one.

    Affine steps (dense, convolution, average pooling, inference-mode normalization,
    reshapes) are exact; each ReLU gets the exact moments of relu(u) for a Gaussian u
    with the propagated mean and covariance (the Gaussian assumption is the
    approximation). ``covariance="diag"`` keeps only variances after the first ReLU
    (cheaper, ignores correlations between units; the input's own correlations still
    enter the first layer's variances). Residual additions are refused (their branches
    are correlated): use the two-stage method there.

    Args:
      model: an NNX module or ``PureModel`` made of affine steps and ReLUs.
      x1: the clean input (no batch axis).
      mean_shift: shift of the input mean (input shape).
      cov: ``(d, d)`` input covariance over the flattened input.
      covariance: ``"full"`` or ``"diag"``.

    Returns:
      ``GaussianMoments(mean: (k,), cov: (k, k))`` (diagonal ``cov`` for ``"diag"``).
    """
    pm = split(model)
    mu = jnp.asarray(x1).reshape(-1) + jnp.asarray(mean_shift).reshape(-1)
    return propagate_graph(pm, mu, full=covariance == "full", cov=cov)


def check_method(pm: PureModel, method: str, split_at: str | None = None) -> None:
    """A one-line ValueError, before any work, if ``method`` cannot run on ``pm``.

    Args:
      pm: the split model.
      method: one of :data:`METHODS`.
      split_at: the two-stage split site (``None``: the last ReLU site).

    Raises:
      ValueError: unknown method; no ReLU site (or ``split_at`` is not one) for the
        two-stage method; a residual addition or an operation that is neither affine nor
        a ReLU for the layerwise methods.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a moments method; choose one of "
                         f"{list(METHODS)}")
    if method == "two_stage":
        _split_site(pm, split_at)
    else:
        try:
            graph_lib.moment_steps(graph_lib.read(pm.structure))
        except graph_lib.GraphError as err:
            raise ValueError(str(err)) from None


def output_moments(model, x1, mean_shift, cov, *, method: str = "two_stage",
                   split_at: str | None = None) -> GaussianMoments:
    """Output mean and covariance under input ~ N(x1 + mean_shift, cov) by ``method``.

    Args:
      model: an NNX module or ``PureModel``.
      x1: the clean input (no batch axis).
      mean_shift: shift of the input mean (input shape).
      cov: ``(d, d)`` input covariance over the flattened input.
      method: ``"two_stage"``, ``"layerwise_full"`` or ``"layerwise_diag"``.
      split_at: the two-stage split site (default: the last ReLU site).

    Returns:
      ``GaussianMoments(mean: (k,), cov: (k, k))`` of the flattened output.

    Raises:
      ValueError: unknown method, or a model the method cannot handle.
    """
    if method == "two_stage":
        return two_stage_moments(model, x1, mean_shift, cov, split_at=split_at)
    if method == "layerwise_full":
        return layerwise_moments(model, x1, mean_shift, cov, covariance="full")
    if method == "layerwise_diag":
        return layerwise_moments(model, x1, mean_shift, cov, covariance="diag")
    raise ValueError(f"method={method!r} is not a moments method; choose one of {list(METHODS)}")


@exact
def noncentral_norm_mean(m: Float[Array, " k"], c: Float[Array, "k k"]) -> Float[Array, ""]:
    """E‖z‖ for z ~ N(m, C), by the same 1-D integral as the centred case.

    E‖z‖ = 1/(2√π) ∫ (1 − E e^{−t‖z‖²}) t^{−3/2} dt with
    E e^{−t‖z‖²} = det(I + 2tC)^{−½} exp(−t mᵀ(I + 2tC)^{−1} m). A Cholesky factor per node
    keeps it differentiable for singular C; where 2t‖C‖ < 1e-4 both terms use their
    power series instead, since the factor's rounding (~1e-16) would be amplified by the
    weight t^{-1/2} there.

    Args:
      m: ``(k,)`` the mean of z.
      c: ``(k, k)`` its covariance (symmetric PSD, possibly singular).

    Returns:
      E‖z‖ (a scalar), differentiable in ``m`` and ``c``.
    """
    k = m.shape[0]
    scale = jnp.trace(c) + jnp.sum(m**2)
    safe = jnp.where(scale > 0, scale, 1.0)
    cn, mn = c / safe, m / jnp.sqrt(safe)
    nodes, step = quadrature_rule(m.dtype)
    u = jnp.asarray(nodes, m.dtype)
    t = jnp.exp(u)
    eye = jnp.eye(k, dtype=m.dtype)
    powers = [eye]
    for _ in range(4):
        powers.append(powers[-1] @ cn)
    tr = [jnp.trace(p) for p in powers]  # tr C^j
    quad = [mn @ p @ mn for p in powers]  # mᵀ C^j m

    def node(tt):
        chol = jnp.linalg.cholesky(eye + 2.0 * tt * cn)
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
        y = jax.scipy.linalg.solve_triangular(chol, mn, lower=True)
        exact = -0.5 * logdet - tt * jnp.sum(y * y)
        x = 2.0 * tt
        # log det(I + xC) = Σ_j (−1)^{j+1} x^j tr C^j / j;  (I + xC)^{-1} = Σ_j (−xC)^j
        series_logdet = x * tr[1] - x**2 * tr[2] / 2 + x**3 * tr[3] / 3 - x**4 * tr[4] / 4
        series_q = quad[0] - x * quad[1] + x**2 * quad[2] - x**3 * quad[3]
        series = -0.5 * series_logdet - tt * series_q
        # A singular C has eigenvalues of about −k·eps after rounding: once x·k·eps ≳ 1
        # the Cholesky factorization fails (NaN) though I + xC is positive definite. There
        # E e^{-t‖z‖²} is small and so is the node's weight e^{-u/2}: count it as 0 (an
        # error ≲ 1e-13 relative in float64; ≲ 1e-6 in float32, where the factorization's
        # own rounding is larger). A NaN at smaller x (C itself indefinite) stays NaN; the
        # gradient at a singular C is not finite.
        rounding = x * k * jnp.finfo(m.dtype).eps >= 0.5
        exact = jnp.where(jnp.isnan(exact) & rounding, -jnp.inf, exact)
        return jnp.where(x * jnp.maximum(tr[1], 1e-30) < 1e-4, series, exact)

    logp = jax.vmap(node)(t)
    val = jnp.sum(quadrature_weights(u, step) * -jnp.expm1(logp))
    return jnp.where(scale > 0, jnp.sqrt(safe) * val, 0.0)
