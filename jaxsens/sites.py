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
import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "INPUT",
    "PureModel",
    "Structure",
    "SiteInfo",
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


def _path_name(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


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

    Attributes:
      graphdef: the NNX graph definition.
      sites: ``((name, SiteInfo), ...)`` for the input, activation and weight sites.
      input_shape: per-example input shape.
      output_shape: per-example output shape.
      chain: the module's ``layer_chain()`` if it has one, else ``None``.
    """

    graphdef: Any
    sites: tuple[tuple[str, SiteInfo], ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    chain: tuple | None

    @property
    def site_map(self) -> dict[str, SiteInfo]:
        return dict(self.sites)

    @property
    def activation_sites(self) -> tuple[str, ...]:
        return tuple(n for n, s in self.sites if s.kind == "activation")

    @property
    def weight_sites(self) -> tuple[str, ...]:
        return tuple(n for n, s in self.sites if s.kind == "weight")

    def site(self, name: str) -> SiteInfo:
        """The :class:`SiteInfo` of ``name``; a one-line ``ValueError`` if unknown."""
        for n, info in self.sites:
            if n == name:
                return info
        raise ValueError(
            f"site={name!r} is not a site of this model; allowed: 'input', activation "
            f"sites {list(self.activation_sites)}, or a weight path such as "
            f"{list(self.weight_sites)[:4]}"
        )

    def apply(self, params, rest, x: jax.Array,
              deltas: Mapping[str, jax.Array] | None = None, *, return_values: bool = False):
        """Batched forward pass with additive deltas at sites.

        Args:
          params: parameters (an ``nnx.State`` of ``nnx.Param``).
          rest: the remaining state.
          x: inputs ``(batch, *input_shape)``.
          deltas: ``{site: delta}``; activation/input deltas broadcast against the
            batched value (give a leading batch axis for per-example deltas).
          return_values: also return the clean values ``{site: array}`` of the
            activation sites (batched).

        Returns:
          The outputs, or ``(outputs, values)``.
        """
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
        act_names = self.activation_sites if return_values else tuple(deltas)
        probes = {}
        flat_init = {}
        for name in act_names:
            probe = _Probe(deltas.get(name))
            probes[name] = probe
            flat_init[self.site(name).path] = nnx.Perturbation(probe)
        out = nnx.capture(module, init=nnx.State(_nest(flat_init)) if flat_init else None)(x)
        if return_values:
            return out, {n: p.value for n, p in probes.items()}
        return out

    def apply_one(self, params, rest, x1: jax.Array,
                  deltas: Mapping[str, jax.Array] | None = None, *,
                  return_values: bool = False):
        """Forward pass of one example (no batch axis); per-example deltas and values."""
        batched = {
            name: d if self.site(name).kind == "weight" else d[None]
            for name, d in (deltas or {}).items()
        }
        res = self.apply(params, rest, x1[None], batched, return_values=return_values)
        if return_values:
            out, values = res
            return out[0], {k: v[0] for k, v in values.items()}
        return res[0]


@dataclasses.dataclass(frozen=True, eq=False)
class PureModel:
    """A Flax NNX module split once: a static :class:`Structure` plus its arrays.

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
        info = self.site(name)
        return dict(nnx.to_flat_state(self.params))[info.path].get_value()

    def apply(self, x, deltas=None, *, return_values=False):
        """Batched forward pass at the current parameters (see :meth:`Structure.apply`)."""
        return self.structure.apply(self.params, self.rest, x, deltas,
                                    return_values=return_values)


def _discover(module: nnx.Module, x: jax.Array | None):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if x is None:
        shape = getattr(module, "input_shape", None)
        if shape is None:
            raise ValueError(
                "cannot find the sites of a model without an example input: pass x=..., or "
                "give the module an `input_shape` attribute (per-example shape)"
            )
        x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    input_shape = tuple(x.shape[1:])

    def run(params, x):
        m = nnx.merge(graphdef, params, rest, copy=True)
        return nnx.capture(m, nnx.Perturbation)(x)

    out, perts = jax.eval_shape(run, params, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sites: dict[str, SiteInfo] = {INPUT: SiteInfo(INPUT, "input", input_shape, ())}
    for path, var in nnx.to_flat_state(perts):
        name = _path_name(path)
        sites[name] = SiteInfo(name, "activation", tuple(var.shape[1:]), tuple(path))
    for path, var in nnx.to_flat_state(params):
        name = _path_name(path)
        if name in sites:
            raise ValueError(f"site name {name!r} is both an activation site and a parameter")
        sites[name] = SiteInfo(name, "weight", tuple(var.shape), tuple(path))
    chain = getattr(module, "layer_chain", None)
    structure = Structure(
        graphdef=graphdef,
        sites=tuple(sites.items()),
        input_shape=input_shape,
        output_shape=tuple(out.shape[1:]),
        chain=tuple(chain()) if callable(chain) else None,
    )
    return PureModel(structure, params, rest)


def split(model: nnx.Module | PureModel, x: jax.Array | None = None) -> PureModel:
    """Split an NNX module once into a :class:`PureModel`.

    Args:
      model: a Flax NNX module marking its hidden values with ``self.perturb``, or an
        already split :class:`PureModel` (returned as is).
      x: an example batch; needed unless the module has an ``input_shape`` attribute.

    Raises:
      ValueError: the input shape cannot be determined or does not fit the model.
    """
    if isinstance(model, PureModel):
        return model
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    return _discover(model, x)


def activation_sites(model: nnx.Module, x: jax.Array | None = None) -> tuple[str, ...]:
    """Names of the activation sites of ``model``, in forward order."""
    return split(model, x).activation_sites


def weight_sites(model: nnx.Module, x: jax.Array | None = None) -> tuple[str, ...]:
    """Parameter paths of ``model`` usable as weight sites."""
    return split(model, x).weight_sites


def activations(model: nnx.Module, x: jax.Array) -> dict[str, jax.Array]:
    """Clean values at the activation sites: ``{site: (batch, *site_shape)}``."""
    pm = split(model, x)
    _, values = pm.apply(jnp.asarray(x), return_values=True)
    return values

