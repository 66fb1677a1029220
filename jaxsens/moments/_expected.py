"""Expected cross-entropy of a Gaussian output, through the analytic moments.

:func:`expected_cross_entropy` is the second-order (delta-method) ``E CE(F, y)`` of logits
with given Gaussian moments; :func:`noisy_cross_entropy` applies it to a batch under
isotropic input noise, with the moments of :func:`~jaxsens.moments.diagonal_output_moments`
(Bibi, Alfadly, Ghanem, CVPR 2018). It is the per-example training loss behind
:class:`jaxsens.losses.ExpectedGaussianLoss`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from ..precision import exact
from ..sites import PureModel, split
from ._common import _PAIRS_PER_CHUNK, _check_method, _chunk, _concrete_float, _hidden_width
from ._gaussian import GaussianMoments
from ._maps import diagonal_output_moments

__all__ = [
    "expected_cross_entropy",
    "noisy_cross_entropy",
]


# --------------------------------------------------------------------------- expected losses
@exact
def expected_cross_entropy(moments: GaussianMoments, label: Int[ArrayLike, ""]
                           ) -> Float[Array, ""]:
    r"""Second-order (delta-method) ``E CE(F, label)`` for ``F`` with mean ``m``, cov ``C``.

    .. math::
        E\,\mathrm{CE}(F, y) \approx \mathrm{lse}(m) - m_y
            + \tfrac12\,\mathrm{tr}(H C),\qquad H = \mathrm{diag}(p) - p p^\top,\
            p = \mathrm{softmax}(m),

    i.e. ``CE(m, y) + (sum_i p_i C_ii - p^T C p) / 2``. ``E F_y = m_y`` is exact; only
    log-sum-exp is expanded. The first-order term vanishes in expectation, so if ``m`` and
    ``C`` are the exact moments the error is the expected Taylor remainder: the third
    directional derivative of lse is the third cumulant of ``delta`` under a softmax
    distribution, bounded by ``range^3 / 4`` (Popoviciu) with ``range <= sqrt(2) ||delta||``,
    so ``|error| <= (sqrt(2) / 12) E||F - m||^3``, which is ``O(sigma^3)`` for input noise
    of scale ``sigma``.

    Args:
      moments: ``GaussianMoments(mean: (k,), cov: (k, k))`` of the logits.
      label: integer class.

    Returns:
      The approximate expected cross-entropy (scalar).

    References:
      Bibi, Alfadly, Ghanem, CVPR 2018 (the moments).
    """
    m, c = moments.mean, moments.cov
    logp = jax.nn.log_softmax(m)
    p = jnp.exp(logp)
    curvature = 0.5 * (jnp.sum(p * jnp.diagonal(c)) - p @ c @ p)
    return -logp[label] + curvature


def noisy_cross_entropy(
    model,
    x: Float[ArrayLike, "batch ..."],
    y: Int[ArrayLike, " batch"],
    *,
    sigma: float | Float[ArrayLike, ""],
    method: str = "two_stage",
    split_at: str | None = None,
) -> Float[Array, " batch"]:
    r"""Per-example ``E CE(F(x + eta), y)``, ``eta ~ N(0, sigma^2 I)``, through the moments.

    The output moments of each example come from :func:`diagonal_output_moments` with the
    isotropic ``sigma^2 I`` (two-stage: ``Sigma~ = sigma^2 A A^T``; no ``d x d`` matrix), the
    expectation from the second-order :func:`expected_cross_entropy`. Examples are mapped in
    chunks (``lax.map`` with a ``batch_size`` sized to ~``2^20`` hidden pairs), so memory
    stays bounded for wide layers and large batches. Jit-able and differentiable with
    respect to the parameters (``model`` may be a ``PureModel`` with traced parameters).
    Cost per example: one two-stage linearization (``p`` VJPs) and ``p^2 / 2`` bivariate
    normal CDFs.

    Args:
      model: an NNX module or ``PureModel`` with a ReLU site (two-stage) or made of affine steps
        and ReLUs (layerwise).
      x: inputs ``(batch, *input_shape)`` (or any layout with the same size per example).
      y: integer labels ``(batch,)``.
      sigma: input noise standard deviation.
      method: one of :data:`jaxsens.moments.METHODS`.
      split_at: the two-stage ReLU site (default: the last one).

    Returns:
      ``(batch,)`` expected cross-entropies (second order).

    References:
      Bibi, Alfadly, Ghanem, CVPR 2018.
    """
    _check_method(method)
    _concrete_float("sigma", sigma)
    pm = split(model)
    x = jnp.asarray(x)
    x = x.reshape(x.shape[0], *pm.input_shape)
    return _noisy_ce_core(pm.structure, pm.params, pm.rest, x, jnp.asarray(y),
                          jnp.asarray(sigma, x.dtype), method=method, split_at=split_at)


@functools.partial(jax.jit, static_argnames=("struct", "method", "split_at"))
def _noisy_ce_core(struct, params, rest, x, y, sigma, *, method, split_at):
    pm = PureModel(struct, params, rest)
    var = jnp.square(sigma)

    def per_example(xy):
        x1, y1 = xy
        mom = diagonal_output_moments(pm, x1, 0.0, var, method=method, split_at=split_at)
        return expected_cross_entropy(mom, y1)

    p = _hidden_width(struct, method, split_at)
    size = _chunk(x.shape[0], p * p // 2 + p * x[0].size, _PAIRS_PER_CHUNK)
    return jax.lax.map(per_example, (x, y), batch_size=size)
