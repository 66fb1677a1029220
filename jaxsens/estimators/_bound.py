"""The bound estimator: a certified Lipschitz bound on ‖ΔF‖."""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from .. import noise as noise_lib
from ..chain import ActivationStep, LinearStep, PoolStep, SiteStep, param
from ..linalg import conv_operator_norm_bound, spectral_norm_bound
from ..sites import INPUT, Adapter, PureModel, Structure
from ._common import check_inputs, compiled_kernel, safe_norm
from ._deviation import DEFAULT_QUANTILES, Deviation, deviation

__all__ = ["bound", "bound_body", "chain_lipschitz", "lipschitz_constants", "chain_or_error"]


def chain_or_error(struct: Structure) -> tuple:
    """The model's layer chain; a one-line ValueError if it has none."""
    if struct.chain is None:
        raise ValueError(
            "bound needs the model's layer chain: give the module a layer_chain() method "
            "returning jaxsens.models chain steps (SiteStep, LinearStep, ActivationStep, "
            "PoolStep), as jaxsens.models.MLP does"
        )
    return struct.chain


def _step_lipschitz(step, params) -> jax.Array:
    if isinstance(step, LinearStep):
        k = param(params, step.kernel)
        if step.kind == "conv":
            return conv_operator_norm_bound(k)
        return spectral_norm_bound(k)
    if isinstance(step, ActivationStep | PoolStep):
        return jnp.asarray(step.lipschitz)
    return jnp.asarray(1.0)


def chain_lipschitz(struct: Structure, params) -> jax.Array:
    """Certified Lipschitz constant of every step of the chain, ``(len(chain),)``.

    Dense kernels: the Gram-iteration bound on ‖W‖₂; convolutions: the certified bound
    of :func:`jaxsens.linalg.conv_operator_norm_bound`; activations and pooling: their
    stated constants; sites: 1. Computed in the parameters' dtype.
    """
    chain = chain_or_error(struct)
    dtype = jnp.result_type(*[param(params, s.kernel) for s in chain
                              if isinstance(s, LinearStep)] or [jnp.float32])
    return jnp.stack([jnp.asarray(_step_lipschitz(s, params), dtype) for s in chain])


@functools.partial(jax.jit, static_argnames=("adapter",))
def _lipschitz_kernel(adapter: Adapter, arrays) -> jax.Array:
    params, _ = adapter.unpack(arrays)
    return chain_lipschitz(adapter.structure, params)


# Lipschitz constants of concrete parameters, keyed by the identity of the parameter
# arrays. JAX arrays are immutable, so the same objects mean the same values; weak
# references make sure an id is not reused by a new array.
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 32
_CACHE_LOCK = threading.Lock()


def _is_concrete(leaf) -> bool:
    return isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)


def lipschitz_constants(adapter: Adapter, arrays) -> jax.Array:
    """:func:`chain_lipschitz` of the model's current parameters, cached.

    Concrete parameters seen before (the same, immutable, arrays) reuse the constants of
    the earlier call, so that repeated bounds on one model cost a forward pass. Traced
    parameters (inside ``jax.grad``, ``jax.jit`` ...) compute them in the trace.
    """
    leaves = arrays if adapter.treedef is not None else jax.tree.leaves(arrays)
    if not all(_is_concrete(leaf) for leaf in leaves):
        return _lipschitz_kernel(adapter, arrays)
    key = (adapter, tuple(id(leaf) for leaf in leaves))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            refs, value = hit
            if all(r() is leaf for r, leaf in zip(refs, leaves, strict=True)):
                _CACHE.move_to_end(key)
                return value
    value = _lipschitz_kernel(adapter, arrays)
    with _CACHE_LOCK:
        _CACHE[key] = ([weakref.ref(leaf) for leaf in leaves], value)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return value


def _locate(chain, site: str, kind: str) -> tuple[int, str]:
    for i, step in enumerate(chain):
        if isinstance(step, SiteStep) and step.name == site:
            return i, "site"
        if isinstance(step, LinearStep) and kind == "weight":
            if step.kernel_name == site:
                return i, "kernel"
            if step.bias_name == site:
                return i, "bias"
    raise ValueError(f"site {site!r} does not appear in the model's layer chain")


def check_site(struct: Structure, site: str) -> None:
    """A one-line ValueError unless the chain covers ``site`` (and a bound exists)."""
    chain = chain_or_error(struct)
    pos, role = _locate(chain, site, struct.site(site).kind)
    if role != "site":
        j = pos - 1
        while not isinstance(chain[j], SiteStep):
            if isinstance(chain[j], LinearStep):
                raise ValueError(f"site {site!r}: its layer input is not a site value")
            j -= 1


def _radius_flag(law, info) -> bool:
    """The law's static almost-sure flag for this site (no computation)."""
    method = law.operator_radius if info.kind == "weight" else law.radius
    box = []

    def f(v):
        r, flag = method(v)
        box.append(flag)
        return r

    jax.eval_shape(f, jax.ShapeDtypeStruct(info.shape, jnp.float32))
    return bool(box[0])


def bound_body(struct: Structure, params, rest, x, law, lips, *, site: str,
               qlevels: tuple[float, ...] = DEFAULT_QUANTILES) -> Deviation:
    """The traceable certified bound at ``site`` given the chain's Lipschitz constants."""
    chain = chain_or_error(struct)
    info = struct.site(site)
    pos, role = _locate(chain, site, info.kind)
    after = jnp.prod(lips[pos + 1:])
    out, values = struct.apply_with_values(params, rest, x)
    batch = x.shape[0]
    k = math.prod(out.shape[1:])
    dtype = out.dtype
    if role == "site":
        v = x if site == INPUT else values[site]
        radius, a_s = jax.vmap(lambda vv: law.radius(vv)[0])(v), _radius_flag(law, info)
        upper = after * radius
    else:
        # A weight inside layer `pos`: ‖ΔF‖ ≤ L_after · ‖Δ(layer output)‖, and the layer
        # input is the last site before it pushed through parameter-free steps.
        j = pos - 1
        lip_between = jnp.asarray(1.0, dtype)
        while not isinstance(chain[j], SiteStep):
            if isinstance(chain[j], LinearStep):
                raise ValueError(f"site {site!r}: its layer input is not a site value")
            lip_between = lip_between * lips[j]
            j -= 1
        src = chain[j].name
        hv = x if src == INPUT else values[src]
        h_norm = lip_between * safe_norm(hv.reshape(hv.shape[0], -1), axis=-1)
        w = param(params, info.path)
        step = chain[pos]
        a_s = _radius_flag(law, info)
        if role == "kernel":
            op, _ = law.operator_radius(w)
            if step.kind == "conv":
                op = op * math.sqrt(w.shape[0] * w.shape[1])
            upper = after * op * h_norm
        else:
            r, _ = law.radius(w)
            if step.kind == "conv":
                # A stride-1 SAME conv bias is added at every spatial position of the grid.
                r = r * math.sqrt(math.prod(hv.shape[1:-1]))
            upper = after * r * jnp.ones_like(h_norm)
    return deviation(batch, k, dtype, quantile_levels=qlevels, almost_sure=a_s, upper=upper)


_kernel = compiled_kernel(bound_body, static=("site", "qlevels"))


def bound(
    model: nnx.Module | PureModel,
    x: Float[Array, "batch ..."],
    *,
    site: str,
    noise: noise_lib.NoiseLaw,
    key: jax.Array | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> Deviation:
    """Certified upper bound on ‖ΔF‖ per example (a product of Lipschitz constants).

    Activation/input site: ‖ΔF‖ ≤ Π_{steps after the site} L_step · ‖η‖, with L a
    certified upper bound on the spectral norm of dense kernels (Gram iteration, a few
    matmuls; never below the exact value), a certified bound for convolutions and the
    activations' Lipschitz constants. Weight site in layer ℓ: ‖ΔF‖ ≤ Π_{after ℓ} L ·
    ‖Δ‖₂ · ‖h_in‖. ‖η‖ (or ‖Δ‖₂) comes from the law: exact for bounded laws
    (``almost_sure=True``: the bound holds for every draw), the root mean square for
    Gaussian laws (then it bounds E‖ΔF‖ and its rms).

    The per-layer constants are computed once per set of parameters and cached (JAX
    arrays are immutable), so repeated bounds on one model cost about one forward pass.

    Requires the model's ``layer_chain()`` (the built-in models have one).

    Args:
      model: an NNX module or a ``PureModel``.
      x: inputs ``(batch, *input_shape)``.
      site: ``"input"``, an activation site or a weight path.
      noise: a law from :mod:`jaxsens.noise`.
      key: ignored (deterministic); accepted so that every estimator has one call shape.
      quantiles: levels of the (absent, NaN) quantiles, for stacking with sampled results.

    Returns:
      A :class:`Deviation` with ``upper`` and ``almost_sure``.
    """
    del key
    p = check_inputs(model, x, site, noise)
    check_site(p.structure, site)
    lips = lipschitz_constants(p.adapter, p.arrays)
    res = _kernel(p.adapter, p.arrays, p.x, noise, lips, site=site,
                  qlevels=tuple(float(q) for q in quantiles))
    return res.labelled(estimator="bound", site=site, law=noise.describe())


def bound_applies(struct: Structure, site: str) -> bool:
    """Whether the chain gives a bound at ``site`` (a model without one gives none)."""
    try:
        check_site(struct, site)
    except ValueError:
        return False
    return True


def bound_table(struct: Structure, params, rest, x, laws, levels, lips, *,
                sites: tuple[str, ...], qlevels: tuple[float, ...]
                ) -> tuple[Deviation, tuple[bool, ...]]:
    """Every site × level: the bound at level 1, times the level (radii are linear in
    it); sites the chain does not cover are absent."""
    rows, present = [], []
    for site, law in zip(sites, laws, strict=True):
        ok = bound_applies(struct, site)
        if ok:
            dev = bound_body(struct, params, rest, x, law.with_level(1.0), lips, site=site,
                             qlevels=qlevels)
        else:
            k = math.prod(struct.output_shape)
            dev = deviation(x.shape[0], k, x.dtype, quantile_levels=qlevels)
        lv = levels.astype(dev.upper.dtype)
        row = jax.tree.map(lambda a, n=lv.shape[0]: jnp.broadcast_to(a, (n, *a.shape)), dev)
        rows.append(dataclasses.replace(row, upper=lv[:, None] * dev.upper))
        present.append(ok)
    return jax.tree.map(lambda *a: jnp.stack(a), *rows), tuple(present)
