"""Training dynamics of Noise Injection Nodes as one compiled program.

:func:`train_dynamics` trains a model that carries NIN (and dropout) nodes with SGD and
records, every ``record_every`` steps, what the reconstructed mechanism of DESIGN §3.6
speaks of: the training loss, ‖θ‖, θ's projection on the readout and the curvature of the
loss along θ. The whole run is a ``lax.scan`` over steps inside one ``jax.jit``;
:func:`sweep` vmaps that program over noise scales σ and PRNG keys, so a phase diagram
with its seeds is one compiled call.

What is measured at a step, on that step's batch and parameters (before the update):

* ``curvature`` λ = θ̂ᵀ H θ̂, the second derivative of the clean batch loss along the
  node's direction, ``d²/ds² L(z + s ξ θ̂)`` at s = 0 with ξ Rademacher per example (and
  per pixel for a convolution): a forward-over-reverse Hessian-vector product in s. For a
  dense node it is exact (ξ² = 1 and the loss is a sum over examples); for a
  convolutional one it is Hutchinson's unbiased estimate of Σ_pixels θ̂ᵀ H_pp θ̂, the
  curvature that the noise averages into the loss (only same-pixel blocks survive
  E[ξ_p ξ_q] = δ_pq). For k nodes on one layer (θ of shape ``(features, k)``, one ζ per
  column) it estimates tr(θ̂ᵀHθ̂) with ‖θ‖ the Frobenius norm, and ``readout`` is ‖Jθ‖_F.
* ``effective_curvature`` θ̂·∇_θL/(σ²‖θ‖), from the step's own (noisy) gradient: the
  drift of ‖θ‖ is −ησ²‖θ‖ times it, exactly. For Gaussian ξ its mean over ξ is
  θ̂ᵀ E[H(z + σξθ)] θ̂ (Stein's lemma: E[ξ ∇L(z + σξθ)] = σ E[H(z + σξθ)] θ), with H in
  the distributional sense, ReLU kinks included; it equals λ for a linear network and
  departs from it once σ‖θ‖ reaches the scale on which H changes.
* ``readout`` ‖J θ‖: the root mean square over the batch of the output change per unit
  of s, ``d/ds F(z + s ξ θ)`` (forward mode); for a linear two-layer model with one output
  it is |v·θ|, θ's projection on the readout v.
* ``loss``: the noisy training loss of the step; ``clean_loss``: the same batch with
  every node off.

Reconstruction under test (not the paper's text): averaging the loss over ξ adds
(σ²/2) θᵀHθ, so under SGD with learning rate η, d log‖Jθ‖/dt ≈ −η σ² λ.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float

from ._node import NoiseInjection, couple, example_keys, nodes, unit_noise

__all__ = ["LOSSES", "Schedule", "Trace", "Dynamics", "train_dynamics", "sweep",
           "with_params", "split_model"]

LOSSES = ("mse", "cross_entropy")
"""Training losses: ½‖F(x) − y‖² per example (regression), softmax cross-entropy."""

# fold_in constants that separate the streams drawn from a run's key.
_DATA, _NOISE, _PROBE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How a NIN program trains: plain SGD (optionally with momentum) for a fixed number of
    steps. Hashable: the compiled program is cached per schedule.

    Attributes:
      steps: number of SGD steps.
      learning_rate: η.
      batch_size: examples per step (``None``: the full training set every step); each
        epoch visits a fresh permutation, the last partial batch dropped.
      loss: ``"mse"`` (½‖F − y‖², float targets) or ``"cross_entropy"`` (integer labels).
      momentum: heavy-ball momentum (0: plain SGD, the setting of the decay-rate formula).
      weight_decay: L2 coefficient μ: the loss gains (μ/2) Σ‖W‖² over every parameter
        with at least two axes (kernels; not θ, not biases).
      record_every: measure every this many steps (divides ``steps``).
      probe: measure the readout, the curvature and the gradient drift (a few extra
        passes per NIN node and record); ``False`` records NaN for them (‖θ‖ and the
        losses are always recorded).
    """

    steps: int
    learning_rate: float
    batch_size: int | None = None
    loss: str = "mse"
    momentum: float = 0.0
    weight_decay: float = 0.0
    record_every: int = 1
    probe: bool = True

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not (isinstance(self.record_every, int) and self.record_every >= 1
                and self.steps % self.record_every == 0):
            raise ValueError(f"record_every must be an integer >= 1 that divides steps="
                             f"{self.steps}, got {self.record_every!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1 or None, got "
                             f"{self.batch_size!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not a NIN training loss; choose one of "
                             f"{list(LOSSES)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


class Trace(NamedTuple):
    """What a run recorded, at steps ``0, k, 2k, ..., steps`` (k = ``record_every``).

    Arrays have a leading axis of ``R = steps / k + 1`` records (after the sweep axes);
    node axes follow the order of :func:`jaxsens.nin.nodes`, dropout nodes included (NaN
    there: they have no θ).

    Attributes:
      step: ``(R,)`` the step of each record.
      loss: ``(R,)`` the noisy training loss on that step's batch.
      clean_loss: ``(R,)`` the loss on the same batch with every node off.
      theta_norm: ``(R, nodes)`` ‖θ‖.
      readout: ``(R, nodes)`` ‖Jθ‖, the rms over the batch of θ's effect on the output.
      curvature: ``(R, nodes)`` λ = θ̂ᵀ H θ̂ of the clean loss along θ.
      effective_curvature: ``(R, nodes)`` θ̂·∇_θL / (σ²‖θ‖), the curvature the step's
        own gradient applies along θ (see the module docstring).
    """

    step: jax.Array
    loss: jax.Array
    clean_loss: jax.Array
    theta_norm: jax.Array
    readout: jax.Array
    curvature: jax.Array
    effective_curvature: jax.Array


class Dynamics(NamedTuple):
    """The result of a NIN training program.

    Attributes:
      params: the final parameters (an ``nnx.State``; leading sweep axes in a sweep);
        :func:`with_params` puts them into a copy of the model.
      trace: the recorded :class:`Trace`.
    """

    params: Any
    trace: Trace


def split_model(model: nnx.Module) -> tuple[Any, Any, Any]:
    """``(graphdef, params, rest)``: the module split into its static graph, its
    ``nnx.Param`` state and all other state.

    Args:
      model: a Flax NNX module.

    Returns:
      The triple of ``nnx.split(model, nnx.Param, ...)``.
    """
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest[0]


def with_params(model: nnx.Module, params: Any) -> nnx.Module:
    """A copy of ``model`` holding ``params`` (e.g. :attr:`Dynamics.params` of one run).

    Args:
      model: the module the program trained (its graph and non-parameter state are used).
      params: parameters of the same structure, without sweep axes.

    Returns:
      A new module; ``model`` is unchanged.
    """
    graphdef, _, rest = split_model(model)
    return nnx.merge(graphdef, params, rest, copy=True)


def _per_example_loss(kind: str, out: jax.Array, y: jax.Array) -> jax.Array:
    flat = out.reshape(out.shape[0], -1)
    if kind == "mse":
        return 0.5 * jnp.sum(jnp.square(flat - y.reshape(y.shape[0], -1).astype(flat.dtype)),
                             axis=-1)
    return optax.softmax_cross_entropy_with_integer_labels(flat, y)


def _l2(params) -> jax.Array:
    leaves = [v.get_value() for _, v in nnx.to_flat_state(params)
              if v.get_value().ndim >= 2]
    return sum((jnp.sum(jnp.square(w)) for w in leaves), jnp.zeros(()))


class _Shift(nnx.Module):
    """A probe around a node's layer: adds ``s u ζ`` to its output, ζ Rademacher per example
    (pixel and column), ``u`` a direction shaped like θ. Used only inside the measurement."""

    def __init__(self, layer: nnx.Module, s: jax.Array, keys: jax.Array, u: jax.Array):
        self.layer = layer
        self.s = nnx.Variable(s)
        self.keys = nnx.Variable(keys)
        self.u = nnx.Variable(u)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.layer(x)
        u = self.u.get_value()
        shape = (*y.shape[1:-1], *u.shape[1:])
        zeta = jax.vmap(lambda k: unit_noise(jax.random.wrap_key_data(k), shape,
                                             "rademacher", y.dtype))(self.keys.get_value())
        return y + self.s.get_value() * couple(zeta, u)


_Probe = tuple[int, jax.Array, jax.Array]  # (node index, s, per-example key data of ζ)


def _forward(graphdef, params, rest, x, node_keys, sigma, probe: _Probe | None = None):
    """The model on ``x``: every node on with its keys (``node_keys``) or all off
    (``None``); with ``probe = (j, s, keys)``, NIN node ``j``'s layer output also gets
    ``s ζ θ̂_j`` (:class:`_Shift`)."""
    m = nnx.merge(graphdef, params, rest, copy=True)
    for j, (_, node) in enumerate(nodes(m)):
        node.deterministic = node_keys is None
        if node_keys is not None:
            node.keys.set_value(node_keys[j])
        if sigma is not None and isinstance(node, NoiseInjection):
            node.sigma.set_value(jnp.asarray(sigma, node.theta.get_value().dtype))
        if probe is not None and j == probe[0]:
            assert isinstance(node, NoiseInjection)
            theta = node.theta.get_value()
            tn = jnp.linalg.norm(theta)
            node.layer = _Shift(node.layer, probe[1], probe[2],
                                theta / jnp.where(tn > 0, tn, 1.0))
    return m(x)


def _program(graphdef, schedule: Schedule, params, rest, x, y, sigma, key) -> Dynamics:
    """One training run (traceable; see :func:`train_dynamics`)."""
    n = x.shape[0]
    batch = schedule.batch_size or n
    per_epoch = n // batch
    full = batch == n
    node_list = nodes(nnx.merge(graphdef, params, rest, copy=True))
    k_data, k_noise, k_probe = (jax.random.fold_in(key, c) for c in (_DATA, _NOISE, _PROBE))
    opt = optax.sgd(schedule.learning_rate, momentum=schedule.momentum or None)

    def batch_at(s):
        if full:
            return jnp.arange(n), s
        epoch = s // per_epoch
        perm = jax.random.permutation(jax.random.fold_in(k_data, epoch), n)
        return jax.lax.dynamic_slice_in_dim(perm, (s % per_epoch) * batch, batch), epoch

    def noise_keys(idx, s, epoch):
        return [example_keys(jax.random.fold_in(k_noise, j), idx, resample=node.resample,
                             step=s, epoch=epoch) for j, (_, node) in enumerate(node_list)]

    def objective(p, xb, yb, keys):
        out = _forward(graphdef, p, rest, xb, keys, sigma)
        loss = jnp.mean(_per_example_loss(schedule.loss, out, yb))
        if schedule.weight_decay:
            loss = loss + 0.5 * schedule.weight_decay * _l2(p)
        return loss

    def train_step(carry, s):
        p, opt_state = carry
        idx, epoch = batch_at(s)
        grads = jax.grad(objective)(p, x[idx], y[idx], noise_keys(idx, s, epoch))
        updates, opt_state = opt.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), None

    def measure(p, s):
        idx, epoch = batch_at(s)
        xb, yb = x[idx], y[idx]
        keys = noise_keys(idx, s, epoch)
        if schedule.probe:
            loss, grads = jax.value_and_grad(objective)(p, xb, yb, keys)
        else:
            loss, grads = objective(p, xb, yb, keys), p
        clean = jnp.mean(_per_example_loss(schedule.loss,
                                           _forward(graphdef, p, rest, xb, None, None), yb))
        m = nnx.merge(graphdef, p, rest, copy=True)
        g_nodes = nodes(nnx.merge(graphdef, grads, rest, copy=True))
        nan = jnp.full((), jnp.nan, clean.dtype)
        cols: list[list[jax.Array]] = [[], [], [], []]
        for j, (_, node) in enumerate(nodes(m)):
            if not isinstance(node, NoiseInjection):
                for col in cols:
                    col.append(nan)
                continue
            theta = node.theta.get_value()
            tn = jnp.linalg.norm(theta)
            cols[0].append(tn)
            if not schedule.probe:
                for col in cols[1:]:
                    col.append(nan)
                continue
            sig = node.sigma.get_value() if sigma is None else sigma
            g_node = g_nodes[j][1]
            assert isinstance(g_node, NoiseInjection)
            g_theta = g_node.theta.get_value()
            pk = jax.vmap(lambda i, j=j: jax.random.key_data(jax.random.fold_in(
                jax.random.fold_in(jax.random.fold_in(k_probe, s), j), i)))(idx)

            def out_of(sv, j=j, pk=pk):
                return _forward(graphdef, p, rest, xb, None, None, (j, sv, pk))

            def loss_of(sv, out_of=out_of):
                return jnp.mean(_per_example_loss(schedule.loss, out_of(sv), yb))

            zero, one = jnp.zeros((), tn.dtype), jnp.ones((), tn.dtype)
            # d²/ds² L(z + s ζ θ̂) at s = 0 is θ̂ᵀHθ̂: a forward-over-reverse HVP in s.
            curv = jax.jvp(jax.grad(loss_of), (zero,), (one,))[1]
            dout = jax.jvp(out_of, (zero,), (one,))[1]
            dout = dout.reshape(dout.shape[0], -1)
            ok = (tn > 0) & (sig > 0)
            cols[1].append(tn * jnp.sqrt(jnp.mean(jnp.sum(jnp.square(dout), axis=-1))))
            cols[2].append(jnp.where(tn > 0, curv, jnp.nan))
            cols[3].append(jnp.where(ok, jnp.vdot(theta, g_theta)
                                     / jnp.where(ok, sig**2 * tn**2, 1.0), jnp.nan))

        def stack(v):
            return jnp.stack(v) if v else jnp.zeros((0,), clean.dtype)

        return (loss, clean, *(stack(c) for c in cols))

    k = schedule.record_every

    def chunk(carry, c):
        s0 = c * k
        rec = measure(carry[0], s0)
        carry, _ = jax.lax.scan(train_step, carry, s0 + jnp.arange(k))
        return carry, rec

    opt_state = opt.init(params)
    (params, _), recs = jax.lax.scan(chunk, (params, opt_state),
                                     jnp.arange(schedule.steps // k))
    last = measure(params, jnp.asarray(schedule.steps))
    recs = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), recs, last)
    steps = jnp.arange(0, schedule.steps + 1, k)
    return Dynamics(params, Trace(steps, *recs))


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule"))
def _run(graphdef, schedule, params, rest, x, y, sigma, key):
    return _program(graphdef, schedule, params, rest, x, y, sigma, key)


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule"))
def _run_sweep(graphdef, schedule, params, rest, x, y, sigmas, keys):
    def one(sigma, key):
        return _program(graphdef, schedule, params, rest, x, y, sigma, key)

    return jax.vmap(lambda s: jax.vmap(lambda k: one(s, k))(keys))(sigmas)


def _check_data(model, x, y, schedule: Schedule) -> None:
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    if x.ndim < 2 or y.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be (n, ...) and y (n, ...) with the same n, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if schedule.batch_size is not None and schedule.batch_size > x.shape[0]:
        raise ValueError(f"batch_size={schedule.batch_size} exceeds the {x.shape[0]} "
                         "training examples")
    if schedule.loss == "cross_entropy" and not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"loss='cross_entropy' needs integer labels, got dtype {y.dtype}")


def train_dynamics(model: nnx.Module, x: Float[Array, "n ..."], y: jax.Array, *,
                   key: jax.Array, schedule: Schedule, sigma: float | None = None
                   ) -> Dynamics:
    """Train ``model`` (with its NIN and dropout nodes) and record the NIN dynamics.

    One compiled call: a ``lax.scan`` over steps. Step ``s`` uses the batch of
    ``fold_in(key, 0)`` (a fresh permutation per epoch; the whole set when
    ``batch_size`` is ``None``), node ``j`` draws its noise from
    ``fold_in(fold_in(key, 1), j)`` under its resampling policy
    (:func:`~jaxsens.nin.example_keys`), and the curvature probes from ``fold_in(key, 2)``.
    Same key, same trajectory. Compiled once per (model structure, schedule, shapes).

    Args:
      model: a Flax NNX module (:func:`~jaxsens.nin.attach` adds nodes); not modified.
      x: training inputs ``(n, *input_shape)``.
      y: targets: ``(n,)`` or ``(n, outputs)`` floats for ``"mse"``, ``(n,)`` integer
        labels for ``"cross_entropy"``.
      key: the run's PRNG key.
      schedule: the :class:`Schedule`.
      sigma: a noise scale for every NIN node (default: each node's own σ).

    Returns:
      :class:`Dynamics`: the final parameters and the :class:`Trace`.

    Raises:
      ValueError: inconsistent shapes, a batch larger than the data, non-integer labels
        for cross-entropy.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    _check_data(model, x, y, schedule)
    graphdef, params, rest = split_model(model)
    s = None if sigma is None else jnp.asarray(sigma, x.dtype)
    return _run(graphdef, schedule, params, rest, x, y, s, key)


def sweep(model: nnx.Module, x: Float[Array, "n ..."], y: jax.Array, *,
          sigmas: Float[Array, " S"] | np.ndarray | list[float], keys: jax.Array,
          schedule: Schedule) -> Dynamics:
    """:func:`train_dynamics` for every noise scale and key, as one vmapped program.

    Every NIN node of the run gets the swept σ; all runs start from ``model``'s
    parameters. The result equals a Python loop over ``train_dynamics(model, x, y,
    key=keys[r], sigma=sigmas[s], schedule=schedule)`` (to rounding: XLA may fuse the
    batched program differently).

    Args:
      model: a Flax NNX module with NIN nodes.
      x: training inputs ``(n, *input_shape)``.
      y: targets (see :func:`train_dynamics`).
      sigmas: ``(S,)`` noise scales.
      keys: ``(R,)`` PRNG keys (``jax.random.split(key, R)``): the seeds.
      schedule: the :class:`Schedule`.

    Returns:
      :class:`Dynamics` with leading axes ``(S, R)`` on every array.

    Raises:
      ValueError: as :func:`train_dynamics`, or ``sigmas`` / ``keys`` not 1-D.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    _check_data(model, x, y, schedule)
    sig = jnp.asarray(sigmas, x.dtype)
    if sig.ndim != 1 or keys.ndim != 1:
        raise ValueError(f"sigmas and keys must be 1-D, got shapes {tuple(sig.shape)} and "
                         f"{tuple(keys.shape)}")
    graphdef, params, rest = split_model(model)
    return _run_sweep(graphdef, schedule, params, rest, x, y, sig, keys)

