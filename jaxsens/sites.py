"""Where noise enters: activation sites, weight sites and the input.

The one adapter of jaxsens. :func:`split` turns any Flax NNX module whose hidden values
are marked with ``self.perturb(name, h)`` into a :class:`PureModel`: a pure function

    apply(params, x, deltas) -> outputs,      deltas: {site: array}, missing = clean

plus the names and shapes of its sites. Everything downstream is plain JAX on it.

Site names:
  * ``"input"``: the input ``x``;
  * activation sites: the ``perturb`` names, nested modules joined with ``/``
    (``"h0"``, ``"block/h"``);
  * weight sites: parameter paths joined with ``/`` (``"layers/0/kernel"``).

Deltas of activation sites and of the input are per example (no batch axis) in
:meth:`PureModel.apply_one`; weight deltas have the parameter's own shape.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import threading
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from . import flatten as flatten_lib
from .paths import param, path_name

__all__ = [
    "INPUT",
    "Adapter",
    "PureModel",
    "Structure",
    "SiteInfo",
    "adapt",
    "split",
    "activation_sites",
    "weight_sites",
    "activations",
]

INPUT = "input"

SiteKind = Literal["input", "activation", "weight"]


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """Static description of one site.

    Attributes:
      name: the site name.
      kind: ``"input"``, ``"activation"`` or ``"weight"``.
      shape: per-example shape for input/activation sites; the parameter shape for weights.
      path: the path of the value in the module tree.
    """

    name: str
    kind: SiteKind
    shape: tuple[int, ...]
    path: tuple[Any, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class _Probe:
    """Stands in for a stored perturbation: records the clean value, adds a delta.

    ``Module.perturb`` inside ``nnx.capture`` returns ``stored + value``; a probe as the
    stored value sees the clean ``value`` as it flows past and returns ``value + delta``.
    """

    def __init__(self, delta):
        self.delta = delta
        self.value = None

    def __add__(self, value):
        self.value = value
        return value if self.delta is None else value + self.delta

    __radd__ = __add__


def _nest(flat: Mapping[tuple[Any, ...], Any]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = leaf
    return out


@dataclasses.dataclass(frozen=True)
class Structure:
    """The static, hashable half of a split model: graph definition and sites.

    Hashable so that jitted estimators can take it as a static argument and compile
    once per model architecture; the arrays (params, rest) are passed separately.
    Structures are interned (one object per architecture and input shape) and hash in
    O(1) after the first time, so passing one to a jitted function costs nothing per call.

    Attributes:
      graphdef: the NNX graph definition.
      sites: ``((name, SiteInfo), ...)`` for the input, activation and weight sites.
      input_shape: per-example input shape.
      output_shape: per-example output shape.
      state_spec: what the arrays look like: ``(params, rest_treedef, rest_avals)``
        with ``params`` a tuple of ``(path, variable type, shape, dtype)`` in
        ``nnx.to_flat_state`` order (the weight sites' order) and the remaining state's
        tree definition and leaf shapes; :mod:`jaxsens.graph` traces the model from it.
    """

    graphdef: Any
    sites: tuple[tuple[str, SiteInfo], ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    state_spec: tuple[Any, ...]

    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.graphdef, self.sites, self.input_shape, self.output_shape,
                      self.state_spec))
            object.__setattr__(self, "_hash", h)
        return h

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if not isinstance(other, Structure) or hash(self) != hash(other):
            return False
        return (self.graphdef, self.sites, self.input_shape, self.output_shape,
                self.state_spec) == (other.graphdef, other.sites, other.input_shape,
                                     other.output_shape, other.state_spec)

    @property
    def site_map(self) -> dict[str, SiteInfo]:
        m = self.__dict__.get("_site_map")
        if m is None:
            m = dict(self.sites)
            object.__setattr__(self, "_site_map", m)
        return m

    @property
    def activation_sites(self) -> tuple[str, ...]:
        return tuple(n for n, s in self.sites if s.kind == "activation")

    @property
    def weight_sites(self) -> tuple[str, ...]:
        return tuple(n for n, s in self.sites if s.kind == "weight")

    def site(self, name: str) -> SiteInfo:
        """The :class:`SiteInfo` of ``name``; a one-line ``ValueError`` if unknown."""
        info = self.site_map.get(name) if isinstance(name, str) else None
        if info is not None:
            return info
        near = difflib.get_close_matches(str(name), list(self.site_map), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(
            f"site={name!r} is not a site of this model{hint}; allowed: 'input', activation "
            f"sites {list(self.activation_sites)}, or a weight path such as "
            f"{list(self.weight_sites)[:4]}"
        )

    def _run(self, params, rest, x, deltas, values: bool, state: bool = False):
        deltas = dict(deltas or {})
        weight = {}
        for name in list(deltas):
            info = self.site(name)
            if info.kind == "weight":
                weight[info.path] = deltas.pop(name)
        if INPUT in deltas:
            x = x + deltas.pop(INPUT)
        if weight:
            flat = nnx.to_flat_state(params)
            params = nnx.from_flat_state(
                [(p, v.replace(v.get_value() + weight[p]) if p in weight else v)
                 for p, v in flat]
            )
        module = nnx.merge(self.graphdef, params, rest, copy=True)
        act_names = self.activation_sites if values else tuple(deltas)
        probes = {}
        flat_init = {}
        for name in act_names:
            probe = _Probe(deltas.get(name))
            probes[name] = probe
            flat_init[self.site(name).path] = nnx.Perturbation(probe)
        out = nnx.capture(module, init=nnx.State(_nest(flat_init)) if flat_init else None)(x)
        if state:
            return out, _split3(module)[2]
        return out, {n: p.value for n, p in probes.items()}

    def apply(self, params, rest, x: jax.Array,
              deltas: Mapping[str, jax.Array] | None = None) -> jax.Array:
        """Batched forward pass with additive deltas at sites.

        Args:
          params: parameters (an ``nnx.State`` of ``nnx.Param``).
          rest: the remaining state.
          x: inputs ``(batch, *input_shape)``.
          deltas: ``{site: delta}``; activation/input deltas broadcast against the
            batched value (give a leading batch axis for per-example deltas).

        Returns:
          The outputs ``(batch, *output_shape)``.
        """
        return self._run(params, rest, x, deltas, False)[0]

    def apply_with_values(self, params, rest, x: jax.Array,
                          deltas: Mapping[str, jax.Array] | None = None
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """:meth:`apply`, and the clean values ``{site: (batch, *site_shape)}`` of every
        activation site (clean: before that site's own delta is added)."""
        return self._run(params, rest, x, deltas, True)

    def apply_with_state(self, params, rest, x: jax.Array,
                         deltas: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, Any]:
        """:meth:`apply`, and the module's non-parameter state after the call (BatchNorm
        running statistics, RNG counts ...): what a training step carries forward."""
        return self._run(params, rest, x, deltas, False, state=True)

    def apply_one(self, params, rest, x1: jax.Array,
                  deltas: Mapping[str, jax.Array] | None = None) -> jax.Array:
        """Forward pass of one example (no batch axis) with per-example deltas."""
        return self.apply(params, rest, x1[None], self._batched(deltas))[0]

    def apply_one_with_values(self, params, rest, x1: jax.Array,
                              deltas: Mapping[str, jax.Array] | None = None
                              ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """:meth:`apply_one` and the example's clean activation-site values."""
        out, values = self.apply_with_values(params, rest, x1[None], self._batched(deltas))
        return out[0], {k: v[0] for k, v in values.items()}

    def _batched(self, deltas):
        return {name: d if self.site(name).kind == "weight" else d[None]
                for name, d in (deltas or {}).items()}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params", "rest"],
                   meta_fields=["structure"])
@dataclasses.dataclass(frozen=True, eq=False)
class PureModel:
    """A Flax NNX module split once: a static :class:`Structure` plus its arrays.

    A pytree (the structure is its static part), so a ``PureModel`` can be an argument
    of a jitted, vmapped or differentiated function.

    Attributes:
      structure: graph definition and sites (hashable).
      params: the parameters (``nnx.State`` of ``nnx.Param``), the differentiable part.
      rest: all other state (batch statistics, RNG counters ...), held fixed.
    """

    structure: Structure
    params: Any
    rest: Any

    @property
    def sites(self) -> dict[str, SiteInfo]:
        return self.structure.site_map

    @property
    def activation_sites(self) -> tuple[str, ...]:
        return self.structure.activation_sites

    @property
    def weight_sites(self) -> tuple[str, ...]:
        return self.structure.weight_sites

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.structure.input_shape

    def site(self, name: str) -> SiteInfo:
        return self.structure.site(name)

    def with_params(self, params) -> PureModel:
        """The same model with other parameters (e.g. traced ones inside ``jax.grad``)."""
        return dataclasses.replace(self, params=params)

    def param(self, name: str) -> jax.Array:
        """The value of the weight site ``name``."""
        return param(self.params, self.site(name).path)

    def apply(self, x, deltas=None) -> jax.Array:
        """Batched forward pass at the current parameters (see :meth:`Structure.apply`)."""
        return self.structure.apply(self.params, self.rest, x, deltas)

    def apply_with_values(self, x, deltas=None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Outputs and clean activation-site values (:meth:`Structure.apply_with_values`)."""
        return self.structure.apply_with_values(self.params, self.rest, x, deltas)


def _split3(module: nnx.Module) -> tuple[Any, Any, Any]:
    """``nnx.split(module, nnx.Param, ...)``: graph definition, parameters, the rest."""
    graphdef, params, *rest = nnx.split(module, nnx.Param, ...)
    return graphdef, params, rest[0]


def _forward_order(graphdef, params, rest, input_shape, found: dict[str, SiteInfo]
                   ) -> list[str]:
    """The activation sites in the order the forward pass reaches them (a second abstract
    trace with probes that record when they are passed; ``nnx.capture`` sorts by name)."""
    order: list[str] = []

    class Recorder(_Probe):
        def __init__(self, name: str):
            super().__init__(None)
            self.name = name

        def __add__(self, value):
            if self.name not in order:
                order.append(self.name)
            return value

        __radd__ = __add__

    def run(params, x):
        m = nnx.merge(graphdef, params, rest, copy=True)
        init = {info.path: nnx.Perturbation(Recorder(name)) for name, info in found.items()}
        return nnx.capture(m, init=nnx.State(_nest(init)) if init else None)(x)

    jax.eval_shape(run, params, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return order + [name for name in found if name not in order]


def _discover(module: nnx.Module, x_shape: tuple[int, ...] | None) -> Structure:
    """Trace the module abstractly once to find its sites (``eval_shape``: no FLOPs)."""
    graphdef, params, rest = _split3(module)
    if x_shape is None:
        shape = getattr(module, "input_shape", None)
        if shape is None:
            raise ValueError(
                "cannot find the sites of a model without an example input: pass x=..., or "
                "give the module an `input_shape` attribute (per-example shape)"
            )
        x_shape = tuple(shape)
    input_shape = tuple(x_shape)

    def run(params, x):
        m = nnx.merge(graphdef, params, rest, copy=True)
        return nnx.capture(m, nnx.Perturbation)(x)

    out, perts = jax.eval_shape(run, params, jax.ShapeDtypeStruct((1, *input_shape),
                                                                  jnp.float32))
    sites: dict[str, SiteInfo] = {INPUT: SiteInfo(INPUT, "input", input_shape, ())}
    found = {path_name(tuple(path)): SiteInfo(path_name(tuple(path)), "activation",
                                             tuple(var.shape[1:]), tuple(path))
             for path, var in nnx.to_flat_state(perts)}
    for name in _forward_order(graphdef, params, rest, input_shape, found):
        sites[name] = found[name]
    for path, var in nnx.to_flat_state(params):
        name = path_name(tuple(path))
        if name in sites:
            raise ValueError(f"site name {name!r} is both an activation site and a parameter")
        sites[name] = SiteInfo(name, "weight", tuple(var.shape), tuple(path))
    rest_leaves, rest_def = jax.tree_util.tree_flatten(rest)
    state_spec = (
        tuple((tuple(path), type(var), tuple(var.get_value().shape), var.get_value().dtype)
              for path, var in nnx.to_flat_state(params)),
        rest_def,
        tuple(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in rest_leaves),
    )
    structure = Structure(
        graphdef=graphdef,
        sites=tuple(sites.items()),
        input_shape=input_shape,
        output_shape=tuple(out.shape[1:]),
        state_spec=state_spec,
    )
    try:
        hash(structure)
    except TypeError:
        raise _unhashable_error(module) from None
    with _LOCK:
        return _STRUCTURES.setdefault(structure, structure)


@dataclasses.dataclass(frozen=True, eq=False)
class Adapter:
    """How the estimators' compiled kernels receive a model: static half plus arrays.

    One adapter exists per model architecture (interned, compared by identity), so it
    is a free static argument of a jitted function. A Flax module reaches a kernel as
    the leaves of its pytree (flattening costs microseconds, ``nnx.split`` much more);
    the kernel rebuilds the module from them while tracing, once per compilation.

    Attributes:
      structure: graph definition and sites.
      treedef: the module's pytree definition when the arrays are its leaves; ``None``
        when they are the ``(params, rest)`` of a :class:`PureModel`.
      inference: the module is in training mode and the kernel runs it in inference
        mode (Flax's ``eval()``: running statistics, no dropout).
    """

    structure: Structure
    treedef: Any = None
    inference: bool = False

    def unpack(self, arrays) -> tuple[Any, Any]:
        """``(params, rest)`` from the arrays a kernel received (at trace time)."""
        if self.treedef is None:
            return arrays
        module = jax.tree_util.tree_unflatten(self.treedef, arrays)
        _, params, rest = _split3(module)
        return params, rest


_LOCK = threading.Lock()
_STRUCTURES: dict[Structure, Structure] = {}
_MODULE_ADAPTERS: dict[tuple[Any, tuple[int, ...] | None], Adapter] = {}
_PURE_ADAPTERS: dict[Structure, Adapter] = {}


def _pure_adapter(structure: Structure) -> Adapter:
    adapter = _PURE_ADAPTERS.get(structure)
    if adapter is None:
        with _LOCK:
            adapter = _PURE_ADAPTERS.setdefault(structure, Adapter(structure))
    return adapter


def _shape_key(module: nnx.Module, x) -> tuple[int, ...] | None:
    """The input shape that determines the sites: the module's own, else x's."""
    if getattr(module, "input_shape", None) is not None:
        return None
    if x is None:
        return None
    return tuple(x.shape[1:])


def adapt(model: nnx.Module | PureModel, x=None) -> tuple[Adapter, Any]:
    """The :class:`Adapter` of ``model`` and the arrays to pass with it to a kernel.

    Cached per architecture: a model seen before (same pytree structure, same input
    shape) costs one pytree flatten and a dictionary look-up, with no tracing; an
    unchanged live module is not even flattened again (:mod:`jaxsens.flatten`).

    Args:
      model: a Flax NNX module or a :class:`PureModel`.
      x: an example batch ``(batch, *input_shape)`` (only its shape is used); needed
        unless the module has an ``input_shape`` attribute.

    Returns:
      ``(adapter, arrays)``: the interned :class:`Adapter` of the architecture and the
      arrays a kernel receives with it, the module's pytree leaves (or ``(params, rest)``
      for a :class:`PureModel` or a module that is no pytree); ``adapter.unpack(arrays)``
      gives back ``(params, rest)``.

    Raises:
      ValueError: not a module, or the input shape cannot be determined.
    """
    if isinstance(model, PureModel):
        return _pure_adapter(model.structure), (model.params, model.rest)
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    leaves, treedef = flatten_lib.flatten(model)
    if len(leaves) == 1 and leaves[0] is model:
        # A module declared with pytree=False is no pytree: discover and split every time.
        structure = _discover(model, _shape_key(model, x))
        _, params, rest = _split3(model)
        return _pure_adapter(structure), (params, rest)
    return _module_adapter(model, x, leaves, treedef, warn=True), leaves


def _unhashable_attribute(model: nnx.Module) -> str:
    """``"path.attr (type)"`` of the first static attribute that cannot be hashed."""
    for path, sub in nnx.iter_modules(model):
        marks = getattr(sub, "_pytree__nodes", {})
        for name, value in vars(sub).items():
            if marks.get(name, False):
                continue
            try:
                hash(value)
            except Exception:  # noqa: BLE001 - any failure: this is the culprit
                where = ".".join([*map(str, path), name])
                return f"{where} ({type(value).__name__})"
    return "?"


def _unhashable_error(model: nnx.Module) -> ValueError:
    return ValueError(
        f"model attribute {_unhashable_attribute(model)} is not hashable; JAX keeps a "
        "module's non-array attributes as static, hashable metadata: store a tuple instead "
        "of a list (nnx.List / nnx.Dict for sub-modules and arrays)")


def _module_adapter(model, x, leaves, treedef, *, warn: bool) -> Adapter:
    key = (treedef, _shape_key(model, x))
    try:
        adapter = _MODULE_ADAPTERS.get(key)
    except TypeError:
        raise _unhashable_error(model) from None
    if adapter is None:
        training = training_mode_layers(model)
        if training:
            # Analyse what the model computes at inference: the structure (graph
            # definition) is that of Flax's eval() view; the state arrays are the same.
            view = jax.tree_util.tree_unflatten(treedef, leaves)
            view.eval()
            structure = _discover(view, key[1])
            if warn:
                warnings.warn(
                    f"jaxsens analyses this {type(model).__name__} in inference mode "
                    f"(Flax's eval(): {', '.join(training)}); call model.eval() first to "
                    "say so and silence this", stacklevel=4)
        else:
            structure = _discover(model, key[1])
        with _LOCK:
            adapter = _MODULE_ADAPTERS.setdefault(key, Adapter(structure, treedef,
                                                               bool(training)))
    return adapter


def inference_structure(model: nnx.Module, x=None) -> Structure:
    """The :class:`Structure` of ``model`` in inference mode (Flax's ``eval()``), without
    changing ``model``; its own structure if it is already in inference mode.

    Args:
      model: a Flax NNX module (a pytree).
      x: an example batch, needed unless the module has an ``input_shape`` attribute.

    Returns:
      The structure whose graph definition runs the model with running statistics and
      no dropout; its parameters and state are the model's own.
    """
    leaves, treedef = flatten_lib.flatten(model)
    return _module_adapter(model, x, leaves, treedef, warn=False).structure


def training_mode_layers(model: nnx.Module) -> list[str]:
    """The submodules that behave differently in training: BatchNorm-like layers using
    batch statistics, dropout-like layers that drop.

    Args:
      model: a Flax NNX module.

    Returns:
      ``"path (what)"`` for each submodule whose ``use_running_average`` or
      ``deterministic`` attribute is ``False`` (empty in inference mode).
    """
    out = []
    for path, sub in nnx.iter_modules(model):
        name = path_name(tuple(path)) or type(sub).__name__
        if getattr(sub, "use_running_average", None) is False:
            out.append(f"{name} (batch statistics)")
        if getattr(sub, "deterministic", None) is False:
            out.append(f"{name} (dropout)")
    return out


def split(model: nnx.Module | PureModel, x: jax.Array | None = None, *,
          inference: bool = True) -> PureModel:
    """Split an NNX module once into a :class:`PureModel`.

    The sites are found by an abstract trace the first time an architecture (and input
    shape) is seen, and reused afterwards. A module in training mode (batch statistics,
    active dropout) is split as Flax's ``eval()`` would run it, with a warning, unless
    ``inference=False``.

    Args:
      model: a Flax NNX module marking its hidden values with ``self.perturb``, or an
        already split :class:`PureModel` (returned as is).
      x: an example batch ``(batch, *input_shape)`` (only its shape is used); needed
        unless the module has an ``input_shape`` attribute.
      inference: analyse the model in inference mode (default); ``False`` keeps the
        module's own mode (what training uses).

    Returns:
      A :class:`PureModel`: the static :class:`Structure` (graph definition and sites)
      with the module's parameters and remaining state.

    Raises:
      ValueError: the input shape cannot be determined or does not fit the model.
    """
    if isinstance(model, PureModel):
        return model
    if not inference and isinstance(model, nnx.Module):
        _, params, rest = _split3(model)
        return PureModel(_discover(model, _shape_key(model, x)), params, rest)
    adapter, arrays = adapt(model, x)
    if adapter.treedef is None:
        params, rest = arrays
    else:
        _, params, rest = _split3(model)
    return PureModel(adapter.structure, params, rest)


def activation_sites(model: nnx.Module | PureModel,
                     x: Float[Array, " batch *input_shape"] | None = None) -> tuple[str, ...]:
    """Names of the activation sites of ``model``, in forward order.

    Args:
      model: a Flax NNX module marking its hidden values with ``self.perturb``, or a
        :class:`PureModel`.
      x: an example batch ``(batch, *input_shape)`` (only its shape is used); needed
        unless the module has an ``input_shape`` attribute.

    Returns:
      The ``perturb`` names, nested modules joined with ``/`` (``"h0"``, ``"block/h"``);
      empty when the model marks no site.

    Raises:
      ValueError: the input shape cannot be determined or does not fit the model.

    Examples:
      >>> import jaxsens as js
      >>> from flax import nnx
      >>> js.activation_sites(js.models.MLP(4, [8, 8], 2, rngs=nnx.Rngs(0)))
      ('h0', 'h1')
    """
    return split(model, x).activation_sites


def weight_sites(model: nnx.Module | PureModel,
                 x: Float[Array, " batch *input_shape"] | None = None) -> tuple[str, ...]:
    """Parameter paths of ``model`` usable as weight sites.

    Args:
      model: a Flax NNX module or a :class:`PureModel`.
      x: an example batch ``(batch, *input_shape)`` (only its shape is used); needed
        unless the module has an ``input_shape`` attribute.

    Returns:
      The path of every ``nnx.Param`` joined with ``/`` (``"layers/0/kernel"``), in the
      order of the flattened parameter state.

    Raises:
      ValueError: the input shape cannot be determined or does not fit the model.

    Examples:
      >>> import jaxsens as js
      >>> from flax import nnx
      >>> js.weight_sites(js.models.MLP(4, [8], 2, rngs=nnx.Rngs(0)))
      ('layers/0/bias', 'layers/0/kernel', 'layers/1/bias', 'layers/1/kernel')
    """
    return split(model, x).weight_sites


def activations(model: nnx.Module | PureModel, x: Float[Array, " batch *input_shape"]
                ) -> dict[str, Float[Array, " batch *site_shape"]]:
    """Clean values at the activation sites: ``{site: (batch, *site_shape)}``.

    One forward pass without noise, at the model's current parameters.

    Args:
      model: a Flax NNX module marking its hidden values with ``self.perturb``, or a
        :class:`PureModel`.
      x: inputs ``(batch, *input_shape)``.

    Returns:
      ``{site: value}`` for every activation site (in forward order), each value of shape
      ``(batch, *site_shape)``.

    Raises:
      ValueError: the input shape does not fit the model.
    """
    pm = split(model, x)
    _, values = pm.apply_with_values(jnp.asarray(x))
    return values

