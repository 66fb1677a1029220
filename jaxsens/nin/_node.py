"""The Noise Injection Node (Levi, Bloch, Freytsis, Volansky 2022) and the explicit-key
dropout it is compared with.

A NIN is an extra input unit of a layer that emits noise: the layer's weight matrix gains
one column θ, trained with the network, so that the layer computes

    z = W x + b + σ ξ θ,        ξ of variance 1, i.i.d. per example

(DESIGN §3.6). For a convolution the node is pixel-wise: one ξ per example and output pixel,
θ one coupling per output channel (a 1×1 kernel from a noise channel). The node wraps the
layer (:func:`attach` replaces ``model.layers[i]`` by ``NoiseInjection(model.layers[i])``),
so any model built from ``nnx.Linear`` / ``nnx.Conv`` layers takes one without changes to
its code.

No hidden RNG: the node draws ξ from per-example PRNG keys that the caller stores in its
:class:`NoiseKeys` variable before each forward pass (:func:`example_keys` makes them from
one explicit key and the resampling policy). In inference mode (``model.eval()``, Flax's
``deterministic=True``) the node is off and the layer computes ``W x + b`` exactly.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, UInt

from ..paths import parse_path, path_name

__all__ = [
    "DISTRIBUTIONS",
    "RESAMPLE",
    "NoiseScale",
    "NoiseKeys",
    "NoiseInjection",
    "DropoutNode",
    "Node",
    "unit_noise",
    "couple",
    "example_keys",
    "attach",
    "attach_dropout",
    "nodes",
    "injection_layers",
]

DISTRIBUTIONS = ("gaussian", "uniform", "rademacher")
"""Unit-variance noise laws of ξ: N(0, 1), U(−√3, √3) and ±1 with equal probability."""

RESAMPLE = ("once", "epoch", "step")
"""When ξ is redrawn: once per example for the whole training, each epoch, each step."""

_SQRT3 = math.sqrt(3.0)


class NoiseScale(nnx.Variable):
    """The noise scale σ of a node: a non-trainable scalar array (a sweep vmaps over it)."""


class NoiseKeys(nnx.Variable):
    """Per-example PRNG key data ``(batch, *key_shape)`` of the current batch.

    Set by the caller before a forward pass in training mode (:func:`example_keys`); the
    node draws its noise from them. Empty (zero examples) until then.
    """


def unit_noise(key: jax.Array, shape: Sequence[int], distribution: str,
               dtype: Any = jnp.float32) -> Float[Array, "*shape"]:
    """Noise of mean 0 and variance 1 from one key.

    Args:
      key: a JAX PRNG key.
      shape: the shape of the draw.
      distribution: one of :data:`DISTRIBUTIONS`.
      dtype: the floating dtype.

    Returns:
      An array of ``shape``: N(0, 1), U(−√3, √3) or Rademacher ±1 entries.

    Raises:
      ValueError: an unknown distribution.
    """
    shape = tuple(shape)
    if distribution == "gaussian":
        return jax.random.normal(key, shape, dtype)
    if distribution == "uniform":
        return jax.random.uniform(key, shape, dtype, -_SQRT3, _SQRT3)
    if distribution == "rademacher":
        return jax.random.rademacher(key, shape, dtype)
    raise ValueError(f"distribution={distribution!r} is not a noise distribution; choose one "
                     f"of {list(DISTRIBUTIONS)}")


def example_keys(key: jax.Array, indices: UInt[Array, " batch"], *, resample: str,
                 step: jax.Array | int, epoch: jax.Array | int) -> jax.Array:
    """The per-example key data of one batch under a resampling policy.

    Example ``i`` draws from ``fold_in(base, i)`` with ``base = key`` (``"once"``: the same
    noise whenever the example is seen), ``fold_in(key, epoch)`` (``"epoch"``) or
    ``fold_in(key, step)`` (``"step"``). Traceable; ``step`` and ``epoch`` may be traced.

    Args:
      key: the node's PRNG key.
      indices: ``(batch,)`` integer indices of the batch's examples in the training set.
      resample: one of :data:`RESAMPLE`.
      step: the global step (0-based).
      epoch: the epoch (0-based).

    Returns:
      ``(batch, *key_shape)`` uint32 key data, the value of a node's :class:`NoiseKeys`.

    Raises:
      ValueError: an unknown policy.
    """
    if resample == "once":
        base = key
    elif resample == "epoch":
        base = jax.random.fold_in(key, epoch)
    elif resample == "step":
        base = jax.random.fold_in(key, step)
    else:
        raise ValueError(f"resample={resample!r} is not a resampling policy; choose one of "
                         f"{list(RESAMPLE)}")
    return jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(base, i)))(indices)


def _batch_keys(node: NoiseInjection | DropoutNode, batch: int, what: str) -> jax.Array:
    keys = node.keys.get_value()
    if keys.shape[0] != batch:
        raise ValueError(
            f"{what} in training mode got a batch of {batch} examples but noise keys for "
            f"{keys.shape[0]}; set them for every batch (jaxsens.nin.train_dynamics does) "
            "or call model.eval() to switch the node off")
    return keys


class NoiseInjection(nnx.Module):
    """A Noise Injection Node on the output of a dense or convolutional layer.

    Computes ``layer(x) + σ ξ θ``: for a dense layer ``ξ`` is one scalar per example, for a
    convolution one per example and output pixel (pixel-wise), and ``θ`` has one entry per
    output feature / channel. ``k`` nodes on one layer are one module with ``θ`` of shape
    ``(features, k)`` and ``k`` independent ξ: ``layer(x) + σ Θ ξ``. σ = 0 or inference
    mode (``deterministic``) gives ``layer(x)`` exactly.

    Attributes:
      layer: the wrapped ``nnx.Linear`` or ``nnx.Conv``.
      theta: the trainable coupling θ, ``(features,)`` or ``(features, k)`` (an
        ``nnx.Param``).
      sigma: the noise scale σ (a :class:`NoiseScale`, not trained).
      keys: the per-example keys of the current batch (a :class:`NoiseKeys`).
      distribution: the law of ξ, one of :data:`DISTRIBUTIONS`.
      resample: when ξ is redrawn, one of :data:`RESAMPLE`.
      deterministic: inference mode: the node adds nothing.

    Args:
      layer: the layer to wrap.
      theta: the initial coupling, ``(features,)`` or ``(features, k)``.
      sigma: the noise scale (≥ 0).
      distribution: the law of ξ.
      resample: the resampling policy.
    """

    def __init__(self, layer: nnx.Module, theta: jax.Array, *, sigma: float = 1.0,
                 distribution: str = "gaussian", resample: str = "step"):
        _check_choice("distribution", distribution, DISTRIBUTIONS)
        _check_choice("resample", resample, RESAMPLE)
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        self.layer = layer
        self.theta = nnx.Param(jnp.asarray(theta))
        self.sigma = NoiseScale(jnp.asarray(sigma, self.theta.get_value().dtype))
        self.keys = NoiseKeys(jnp.zeros((0, *_key_shape()), jnp.uint32))
        self.distribution = distribution
        self.resample = resample
        self.deterministic = False

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.layer(x)
        if self.deterministic:
            return y
        keys = _batch_keys(self, y.shape[0], "a NoiseInjection node")
        theta = self.theta.get_value()
        shape = (*y.shape[1:-1], *theta.shape[1:])  # pixels, then one ξ per column
        xi = jax.vmap(lambda k: unit_noise(jax.random.wrap_key_data(k), shape,
                                           self.distribution, y.dtype))(keys)
        return y + self.sigma.get_value() * couple(xi, theta)


def couple(xi: jax.Array, theta: jax.Array) -> jax.Array:
    """``ξ θ`` for one node (θ of shape ``(features,)``, ξ per pixel) or ``Θ ξ`` for
    several (θ of shape ``(features, k)``, ξ with a trailing axis of ``k``).

    Args:
      xi: ``(batch, *pixels)`` or ``(batch, *pixels, k)``.
      theta: ``(features,)`` or ``(features, k)``.

    Returns:
      ``(batch, *pixels, features)``.
    """
    if theta.ndim == 1:
        return xi[..., None] * theta
    return jnp.einsum("...k,fk->...f", xi, theta)


class DropoutNode(nnx.Module):
    """Inverted dropout on a layer's output, drawn from explicit per-example keys.

    Computes ``layer(x) ⊙ m / (1 − rate)`` with ``m`` Bernoulli(1 − rate) per example and
    output unit (every pixel and channel of a convolution); redrawn every step. Dropping
    before the activation equals dropping after it for ReLU (``relu(m z) = m relu(z)``,
    m ≥ 0). The baseline NIN regularization is compared with.

    Attributes:
      layer: the wrapped layer.
      rate: the drop probability.
      keys: the per-example keys of the current batch.
      resample: always ``"step"``.
      deterministic: inference mode: no dropout.

    Args:
      layer: the layer to wrap.
      rate: the drop probability, in [0, 1).
    """

    def __init__(self, layer: nnx.Module, *, rate: float):
        if not (isinstance(rate, int | float) and 0.0 <= rate < 1.0):
            raise ValueError(f"dropout rate must lie in [0, 1), got {rate!r}")
        self.layer = layer
        self.rate = float(rate)
        self.keys = NoiseKeys(jnp.zeros((0, *_key_shape()), jnp.uint32))
        self.resample = "step"
        self.deterministic = False

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.layer(x)
        if self.deterministic or self.rate == 0.0:
            return y
        keys = _batch_keys(self, y.shape[0], "a DropoutNode")
        keep = 1.0 - self.rate
        mask = jax.vmap(lambda k: jax.random.bernoulli(jax.random.wrap_key_data(k), keep,
                                                       y.shape[1:]))(keys)
        return jnp.where(mask, y / keep, jnp.zeros((), y.dtype))


Node = NoiseInjection | DropoutNode
"""A node that draws from per-example keys: a NIN or a dropout node."""


def _key_shape() -> tuple[int, ...]:
    return tuple(jax.random.key_data(jax.random.key(0)).shape)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"{name}={value!r} is not valid{hint}; choose one of {list(choices)}")


def nodes(model: nnx.Module) -> tuple[tuple[str, Node], ...]:
    """The NIN and dropout nodes of ``model``, in a fixed (module-tree) order.

    Args:
      model: a Flax NNX module.

    Returns:
      ``((path, node), ...)`` with the path of each node's wrapped position joined with
      ``/`` (``"layers/1"``); node ``j`` of this tuple is node ``j`` of the training
      programs (its noise key is ``fold_in(noise_key, j)``).
    """
    return tuple((path_name(tuple(path)), sub) for path, sub in nnx.iter_modules(model)
                 if isinstance(sub, NoiseInjection | DropoutNode))


def injection_layers(model: nnx.Module) -> tuple[str, ...]:
    """The layers a node can be attached to: every ``nnx.Linear`` and ``nnx.Conv``.

    Args:
      model: a Flax NNX module.

    Returns:
      Their paths joined with ``/`` (``"layers/0"``, ``"convs/1"``), in module-tree order,
      layers already wrapped by a node excluded.
    """
    wrapped = {id(node.layer) for _, node in nodes(model)}
    return tuple(path_name(tuple(path)) for path, sub in nnx.iter_modules(model)
                 if isinstance(sub, nnx.Linear | nnx.Conv) and id(sub) not in wrapped
                 and path)


def _replace(model: nnx.Module, layer: str, make) -> nnx.Module:
    """A copy of ``model`` whose layer at ``layer`` is ``make(old_layer)``."""
    allowed = injection_layers(model)
    if layer not in allowed:
        near = difflib.get_close_matches(str(layer), allowed, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"layer={layer!r} is not a dense or convolutional layer of this "
                         f"model without a node{hint}; choose one of {list(allowed)}")
    out = nnx.clone(model)
    *parents, last = parse_path(layer)
    holder: Any = out
    for part in parents:
        holder = holder[part] if isinstance(part, int) else getattr(holder, part)
    old = holder[last] if isinstance(last, int) else getattr(holder, last)
    new = make(old)
    if isinstance(last, int):
        holder[last] = new
    else:
        setattr(holder, last, new)
    return out


def _features(layer: Any) -> int:
    return int(layer.kernel.get_value().shape[-1])


def attach(model: nnx.Module, layer: str, *, key: jax.Array, sigma: float = 1.0,
           theta_scale: float = 1.0, theta: jax.Array | None = None, count: int = 1,
           distribution: str = "gaussian", resample: str = "step") -> nnx.Module:
    """A copy of ``model`` with a Noise Injection Node feeding the layer ``layer``.

    The layer's weight matrix gains the column θ: its output becomes
    ``W x + b + σ ξ θ`` (pixel-wise for a convolution). ``model`` is left unchanged.

    Args:
      model: a Flax NNX module built from ``nnx.Linear`` / ``nnx.Conv`` layers (the
        library's :class:`~jaxsens.models.MLP` and :class:`~jaxsens.models.LeNet`).
      layer: the path of the layer (:func:`injection_layers`, e.g. ``"layers/1"``).
      key: the PRNG key of θ's initial direction (unused when ``theta`` is given).
      sigma: the noise scale σ ≥ 0.
      theta_scale: ‖θ₀‖ (Frobenius for several nodes): θ₀ = theta_scale · g/‖g‖,
        g ~ N(0, I).
      theta: the initial coupling itself, ``(features,)`` or ``(features, count)``
        (overrides the draw).
      count: how many noise nodes feed the layer (columns of θ): 1 gives θ of shape
        ``(features,)``, more ``(features, count)``.
      distribution: the law of ξ (:data:`DISTRIBUTIONS`).
      resample: when ξ is redrawn (:data:`RESAMPLE`).

    Returns:
      The new module; its node sits at ``layer`` and the wrapped layer's parameters at
      ``layer + "/layer/..."``, θ at ``layer + "/theta"``.

    Raises:
      ValueError: ``layer`` is no dense or convolutional layer without a node (the message
        lists those there are), a bad ``theta`` shape, distribution, policy or σ.
    """

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")

    def make(old: Any) -> NoiseInjection:
        n = _features(old)
        dtype = old.kernel.get_value().dtype
        shape = (n,) if count == 1 else (n, count)
        if theta is None:
            g = jax.random.normal(key, shape, dtype)
            init = theta_scale * g / jnp.linalg.norm(g)
        else:
            init = jnp.asarray(theta, dtype)
            if init.shape != shape:
                raise ValueError(f"theta must have shape {shape} for layer {layer!r} and "
                                 f"count={count}, got {tuple(init.shape)}")
        return NoiseInjection(old, init, sigma=sigma, distribution=distribution,
                              resample=resample)

    return _replace(model, layer, make)


def attach_dropout(model: nnx.Module, layer: str, *, rate: float) -> nnx.Module:
    """A copy of ``model`` with inverted dropout on the output of ``layer``.

    Args:
      model: a Flax NNX module built from ``nnx.Linear`` / ``nnx.Conv`` layers.
      layer: the path of the layer (:func:`injection_layers`).
      rate: the drop probability, in [0, 1).

    Returns:
      The new module with a :class:`DropoutNode` at ``layer``.

    Raises:
      ValueError: ``layer`` is no dense or convolutional layer without a node, or a bad
        rate.
    """
    return _replace(model, layer, lambda old: DropoutNode(old, rate=rate))
