r"""Interclass confusion under Gaussian input noise, from the analytic output moments.

With the logits ``F ~ N(mu, Sigma)`` of an example of true class ``y`` (the moments of
Bibi, Alfadly, Ghanem, CVPR 2018), logit ``j`` overtakes logit ``y`` with probability

.. math::
    P_j = \Phi\!\left(\frac{\mu_j - \mu_y}{\sigma_{j-y}}\right), \qquad
    \sigma_{j-y}^2 = \Sigma_{jj} + \Sigma_{yy} - 2\Sigma_{jy},

since ``F_j - F_y`` is Gaussian when ``F`` is (for a network this treats its logits as
Gaussian with the analytic moments: an approximation, good at small noise). Averaged over
the examples of each true class this is a ``k x k`` confusion (flip) matrix:
:func:`confusion_matrix` predicts it from the moments, :func:`sampled_confusion_matrix`
measures it by Monte Carlo on the true network (the fraction of noisy draws in which logit
``j`` exceeds logit ``y``).

The ``P_j`` are pairwise probabilities: the events overlap, so a row does not sum to the
probability of a misclassification (it bounds it from above; its largest entry bounds it
from below).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from .. import montecarlo
from ..checks import positive_int
from ..precision import exact
from ..sites import PureModel, split
from ._common import (
    _PAIRS_PER_CHUNK,
    _check_method,
    _chunk,
    _concrete_float,
    _hidden_width,
    _num_outputs,
)
from ._gaussian import GaussianMoments
from ._maps import diagonal_output_moments

__all__ = [
    "Confusion",
    "overtake_probabilities",
    "confusion_matrix",
    "sampled_confusion_matrix",
]

# A difference variance at most this many ulps of Sigma_jj + Sigma_yy is rounding noise:
# F_j - F_y is treated as deterministic there (the sign rule).
_ZERO_VARIANCE_ULPS = 16.0
# Floats of (draws x examples x widest layer) per Monte Carlo step.
_FLOATS_PER_STEP = 2**23


class Confusion(NamedTuple):
    """A confusion (flip) matrix over a dataset.

    Attributes:
      matrix: ``(k, k)``; ``matrix[y, j]`` is the mean over the examples of true class
        ``y`` of the probability that logit ``j`` exceeds logit ``y`` (rows: true class,
        columns: overtaking class; the diagonal is 0). Rows of classes without examples
        are NaN.
      counts: ``(k,)`` number of examples of each true class.
      stderr: ``(k, k)`` binomial standard error of each Monte Carlo cell given the
        examples (NaN on empty rows), or ``None`` for a predicted matrix.
    """

    matrix: Float[Array, "k k"]
    counts: Int[Array, " k"]
    stderr: Float[Array, "k k"] | None = None


# --------------------------------------------------------------------------- one example
@exact
def overtake_probabilities(moments: GaussianMoments, label: Int[ArrayLike, ""]
                           ) -> Float[Array, " k"]:
    r"""Probability that each logit exceeds the ``label`` logit, for Gaussian logits.

    .. math::
        P_j = \Phi\!\left(\frac{\mu_j - \mu_y}{\sigma_{j-y}}\right),\qquad
        \sigma_{j-y}^2 = \Sigma_{jj} + \Sigma_{yy} - 2\Sigma_{jy},\qquad P_y = 0.

    Where ``sigma_{j-y}`` is 0 (up to rounding: at most a few ulps of
    ``Sigma_jj + Sigma_yy``) the difference is deterministic and ``P_j`` is 1 if
    ``mu_j > mu_y``, else 0. The zero-variance branch never divides by 0, so the result
    and its gradients are NaN-free. Jit-, vmap- and grad-able.

    Args:
      moments: ``GaussianMoments(mean: (k,), cov: (k, k))`` of the logits, e.g. from
        :func:`~jaxsens.moments.diagonal_output_moments`.
      label: the true class ``y`` (integer in ``[0, k)``).

    Returns:
      ``(k,)`` probabilities ``P_j`` (0 at ``j = label``).

    References:
      Bibi, Alfadly, Ghanem, CVPR 2018 (the moments).
    """
    m = jnp.asarray(moments.mean)
    c = jnp.asarray(moments.cov)
    label = jnp.asarray(label)
    diff = m - m[label]
    diag = jnp.diagonal(c)
    var = diag + c[label, label] - 2.0 * c[:, label]
    eps = jnp.finfo(var.dtype).eps
    noisy = var > _ZERO_VARIANCE_ULPS * eps * (jnp.abs(diag) + jnp.abs(c[label, label]))
    scale = jnp.sqrt(jnp.where(noisy, var, 1.0))
    p = jnp.where(noisy, jax.scipy.special.ndtr(diff / scale), (diff > 0).astype(diff.dtype))
    return jnp.where(jnp.arange(m.shape[0]) == label, 0.0, p)


# --------------------------------------------------------------------------- helpers
def _class_means(values: Array, y: Array, k: int) -> tuple[Array, Array, Array]:
    """Per-class sums and means of per-example ``(n, k)`` rows; NaN rows for empty classes."""
    onehot = jax.nn.one_hot(y, k, dtype=values.dtype)
    sums = onehot.T @ values
    counts = jnp.sum(onehot, axis=0)
    seen = counts > 0
    mean = jnp.where(seen[:, None], sums / jnp.where(seen, counts, 1.0)[:, None], jnp.nan)
    return mean, onehot, counts


def _prepare(model, x, y, num_classes, name: str) -> tuple[PureModel, Array, Array, int]:
    pm = split(model)
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{name}: x must be a batch (batch, *input_shape), got a scalar")
    n = x.shape[0]
    x = x.reshape(n, *pm.input_shape)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    y = jnp.asarray(y)
    if y.shape != (n,) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"{name}: y must be integer labels of shape ({n},), got "
                         f"{y.dtype} {tuple(y.shape)}")
    k = _num_outputs(pm.structure)
    if num_classes is not None and positive_int("num_classes", num_classes) != k:
        raise ValueError(f"{name}: num_classes={num_classes} but the model has {k} outputs")
    try:
        labels = np.asarray(y)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        labels = None  # traced labels: unchecked (out of range ones count for no class)
    if labels is not None and labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"{name}: labels must lie in [0, {k}), got {labels.min()}.."
                         f"{labels.max()}")
    return pm, x, y.astype(jnp.int32), k


# --------------------------------------------------------------------------- predicted
def confusion_matrix(
    model,
    x: Float[ArrayLike, "batch ..."],
    y: Int[ArrayLike, " batch"],
    *,
    sigma: float | Float[ArrayLike, ""],
    method: str = "two_stage",
    split_at: str | None = None,
    num_classes: int | None = None,
) -> Confusion:
    r"""Predicted confusion matrix under input noise ``N(0, sigma^2 I)``, from the moments.

    Per example, the logits' moments under ``x ~ N(x_i, sigma^2 I)`` come from
    :func:`~jaxsens.moments.diagonal_output_moments` (isotropic variance, no ``d x d``
    matrix; two-stage: linearized at ``x_i``) and the overtaking probabilities from
    :func:`overtake_probabilities`; ``M[y, j]`` is their mean over the examples of true
    class ``y``. Examples are mapped in chunks (``lax.map``) so memory stays bounded.
    Jit-able in ``x``, ``y`` and ``sigma`` (the argument checks are then skipped).

    Args:
      model: an NNX module or ``PureModel`` with a ReLU site (two-stage) or made of affine steps
        and ReLUs (layerwise).
      x: clean inputs ``(batch, *input_shape)``.
      y: their integer labels ``(batch,)``, in ``[0, k)``.
      sigma: input noise standard deviation, ``> 0``.
      method: one of :data:`jaxsens.moments.METHODS`.
      split_at: the two-stage ReLU site (default: the last one).
      num_classes: the number of classes, if given checked against the model's ``k``
        outputs (the matrix is always ``k x k``).

    Returns:
      A :class:`Confusion` ``(matrix (k, k), counts (k,), stderr=None)``; rows of classes
      without examples are NaN.

    Raises:
      ValueError: bad ``sigma``, ``method``, labels or ``num_classes``.

    References:
      Bibi, Alfadly, Ghanem, CVPR 2018.
    """
    _check_method(method)
    _concrete_float("sigma", sigma)
    pm, x, y, k = _prepare(model, x, y, num_classes, "confusion_matrix")
    matrix, counts = _predicted_core(pm.structure, pm.params, pm.rest, x, y,
                                     jnp.asarray(sigma, x.dtype), k=k, method=method,
                                     split_at=split_at)
    return Confusion(matrix, counts)


@functools.partial(jax.jit, static_argnames=("struct", "k", "method", "split_at"))
def _predicted_core(struct, params, rest, x, y, sigma, *, k, method, split_at):
    pm = PureModel(struct, params, rest)
    var = jnp.square(sigma)

    def per_example(xy):
        x1, y1 = xy
        mom = diagonal_output_moments(pm, x1, 0.0, var, method=method, split_at=split_at)
        return overtake_probabilities(mom, y1)

    p = _hidden_width(struct, method, split_at)
    size = _chunk(x.shape[0], p * p // 2 + p * x[0].size, _PAIRS_PER_CHUNK)
    probs = jax.lax.map(per_example, (x, y), batch_size=size)
    matrix, _, counts = _class_means(probs, y, k)
    return matrix, counts.astype(jnp.int32)


# --------------------------------------------------------------------------- sampled
def sampled_confusion_matrix(
    model,
    x: Float[ArrayLike, "batch ..."],
    y: Int[ArrayLike, " batch"],
    *,
    sigma: float | Float[ArrayLike, ""],
    key: jax.Array,
    num_samples: int,
    chunk: int | None = None,
) -> Confusion:
    r"""Monte Carlo confusion matrix of the true network under input noise ``N(0, sigma^2 I)``.

    Example ``i`` draws ``x_i + sigma eps``, ``eps ~ N(0, I)``, ``num_samples`` times with
    the key ``fold_in(key, i)`` (:func:`jaxsens.montecarlo.average`; results do not depend
    on ``chunk`` beyond summation order) and records, per class ``j``, the fraction
    ``r_ij`` of draws in which logit ``j`` exceeds logit ``y_i``. ``M[y, j]`` is the mean of
    ``r_ij`` over the ``n_y`` examples of class ``y``, and its binomial standard error given
    the examples is ``sqrt(sum_i r_ij (1 - r_ij) / N) / n_y`` (0 where every draw agreed:
    compare with some slack).

    Args:
      model: an NNX module or ``PureModel``.
      x: clean inputs ``(batch, *input_shape)``.
      y: their integer labels ``(batch,)``, in ``[0, k)``.
      sigma: input noise standard deviation, ``> 0``.
      key: the PRNG key of the draws.
      num_samples: draws per example ``N`` (``>= 1``).
      chunk: draws per vectorized forward pass (default ``min(num_samples, 1000)``).

    Returns:
      A :class:`Confusion` ``(matrix (k, k), counts (k,), stderr (k, k))``; rows of classes
      without examples are NaN.

    Raises:
      ValueError: bad ``sigma``, ``num_samples``, ``chunk`` or labels.
    """
    _concrete_float("sigma", sigma)
    n_draws = positive_int("num_samples", num_samples)
    size = min(n_draws, 1000) if chunk is None else min(positive_int("chunk", chunk), n_draws)
    pm, x, y, k = _prepare(model, x, y, None, "sampled_confusion_matrix")
    matrix, stderr, counts = _sampled_core(pm.structure, pm.params, pm.rest, x, y,
                                           jnp.asarray(sigma, x.dtype), key, k=k,
                                           num_samples=n_draws, chunk=size)
    return Confusion(matrix, counts, stderr)


@functools.partial(jax.jit, static_argnames=("struct", "k", "num_samples", "chunk"))
def _sampled_core(struct, params, rest, x, y, sigma, key, *, k, num_samples, chunk):
    def per_example(args):
        i, x1, y1 = args

        def draw(kk):
            eps = jax.random.normal(kk, x1.shape, x1.dtype)
            out = struct.apply_one(params, rest, x1 + sigma * eps).reshape(-1)
            return (out > out[y1]).astype(x1.dtype)

        return montecarlo.average(draw, jax.random.fold_in(key, i), num_samples=num_samples,
                                  chunk=chunk).mean

    n = x.shape[0]
    per_draw = x[0].size + 2 * _hidden_width(struct, "layerwise_diag", None) + k
    size = _chunk(n, chunk * per_draw, _FLOATS_PER_STEP)
    rates = jax.lax.map(per_example, (jnp.arange(n), x, y), batch_size=size)
    matrix, onehot, counts = _class_means(rates, y, k)
    var_sum = onehot.T @ (rates * (1.0 - rates) / num_samples)
    seen = counts > 0
    stderr = jnp.where(seen[:, None], jnp.sqrt(var_sum) / jnp.where(seen, counts, 1.0)[:, None],
                       jnp.nan)
    return matrix, stderr, counts.astype(jnp.int32)
