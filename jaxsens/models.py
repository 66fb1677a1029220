"""Flax NNX models whose hidden outputs are activation sites.

Every hidden output is marked with Flax's own ``self.perturb(name, h)``, so the models
work with :mod:`jaxsens` exactly like any user module that marks its sites the same way.

Nothing else is declared: the certified bounds and the analytic moments read these
models, like any user model, from their traced computation (:mod:`jaxsens.graph`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "LeNet",
    "mark_site",
]


def _relu(x):
    return jax.nn.relu(x)


# name -> (function, Lipschitz constant). The constants are upper bounds on |σ'|:
# relu/tanh 1, sigmoid 1/4, gelu max|Φ(x) + xφ(x)| = 1.12890 at x = ±√2 (rounded up).
ACTIVATIONS: dict[str, tuple[Callable[[jax.Array], jax.Array], float]] = {
    "relu": (_relu, 1.0),
    "tanh": (jnp.tanh, 1.0),
    "sigmoid": (jax.nn.sigmoid, 0.25),
    "gelu": (lambda x: jax.nn.gelu(x, approximate=False), 1.1290),
    "identity": (lambda x: x, 1.0),
}


def mark_site(module: nnx.Module, name: str, value: Float[Array, "*shape"]
              ) -> Float[Array, "*shape"]:
    """``module.perturb(name, value)`` inside ``nnx.capture``, the identity outside.

    jaxsens always runs models inside ``nnx.capture``. A plain call (training,
    inference) skips ``perturb``, which outside a capture would warn and attach a
    ``Perturbation`` variable to the module.

    Args:
      module: the module that owns the site (``self`` in ``__call__``).
      name: the site name, unique within ``module`` (``"h0"``).
      value: the clean hidden value, ``(batch, *site_shape)``.

    Returns:
      Inside ``nnx.capture``, ``value`` plus the perturbation stored under ``name`` (the
      noise jaxsens injects at that site); outside, ``value`` itself. Same shape as
      ``value``; use the returned array downstream.
    """
    if hasattr(module, "__captures__"):
        return module.perturb(name, value)
    return value


def _activation(name: str) -> tuple[Callable[[jax.Array], jax.Array], float]:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation={name!r} is not supported; choose one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


class MLP(nnx.Module):
    """A fully connected network ``din -> widths... -> dout``.

    The output of hidden layer ``i`` (after its activation) is the activation site
    ``f"h{i}"``. The last layer is linear (logits).

    Args:
      din: input size (inputs of shape ``(batch, din)``; other shapes are flattened).
      widths: hidden widths.
      dout: output size.
      activation: one of :data:`ACTIVATIONS`.
      use_bias: whether the linear layers have biases.
      kernel_init: optional Flax initializer for the kernels (default: Flax's LeCun normal).
      param_dtype: parameter dtype.
      rngs: the NNX random streams used for initialization only.
    """

    def __init__(
        self,
        din: int,
        widths: Sequence[int],
        dout: int,
        *,
        activation: str = "relu",
        use_bias: bool = True,
        kernel_init: nnx.Initializer | None = None,
        bias_init: nnx.Initializer | None = None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if din <= 0 or dout <= 0 or any(int(w) <= 0 for w in widths):
            raise ValueError(
                f"MLP sizes must be positive integers, got din={din}, widths={list(widths)}, "
                f"dout={dout}"
            )
        self.activation_name = activation
        self._act, _ = _activation(activation)
        self.input_shape = (int(din),)
        sizes = [int(din), *map(int, widths), int(dout)]
        extra: dict[str, Any] = {}
        if kernel_init is not None:
            extra["kernel_init"] = kernel_init
        if bias_init is not None:
            extra["bias_init"] = bias_init
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, use_bias=use_bias, param_dtype=param_dtype, rngs=rngs, **extra)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )
        self.use_bias = use_bias

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers[:-1]):
            x = mark_site(self, f"h{i}", self._act(layer(x)))
        return self.layers[-1](x)


class LeNet(nnx.Module):
    """A LeNet-style CNN: two conv blocks, then fully connected layers.

    Sites: ``"c0"`` and ``"c1"`` are the outputs of the conv blocks (convolution,
    activation, 2×2 average pooling), ``"h0"``, ``"h1"`` the hidden dense outputs.

    Args:
      input_shape: per-example input shape ``(H, W, C)``; H and W divisible by 4.
      num_classes: number of outputs.
      channels: conv channels of the two blocks.
      hidden: widths of the dense hidden layers.
      kernel_size: conv kernel size.
      activation: one of :data:`ACTIVATIONS`.
      rngs: the NNX random streams used for initialization only.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        num_classes: int = 10,
        *,
        channels: Sequence[int] = (6, 16),
        hidden: Sequence[int] = (120, 84),
        kernel_size: int = 5,
        activation: str = "relu",
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(input_shape) != 3 or input_shape[0] % 4 or input_shape[1] % 4:
            raise ValueError(
                f"input_shape must be (H, W, C) with H and W divisible by 4, got {input_shape}"
            )
        self.activation_name = activation
        self._act, _ = _activation(activation)
        self.input_shape = tuple(int(s) for s in input_shape)
        h, w, c = self.input_shape
        chans = [c, *map(int, channels)]
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, (kernel_size, kernel_size), padding="SAME",
                         param_dtype=param_dtype, rngs=rngs)
                for a, b in zip(chans[:-1], chans[1:], strict=True)
            ]
        )
        flat = (h // 2 ** len(channels)) * (w // 2 ** len(channels)) * chans[-1]
        sizes = [flat, *map(int, hidden), int(num_classes)]
        self.dense = nnx.List(
            [
                nnx.Linear(a, b, param_dtype=param_dtype, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 2:
            x = x.reshape(x.shape[0], *self.input_shape)
        for i, conv in enumerate(self.convs):
            x = self._act(conv(x))
            x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
            x = mark_site(self, f"c{i}", x)
        x = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.dense[:-1]):
            x = mark_site(self, f"h{i}", self._act(layer(x)))
        return self.dense[-1](x)
