"""The bound estimator: a certified Lipschitz bound on ‖ΔF‖, read from the model's graph."""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from .. import graph as graph_lib
from .. import noise as noise_lib
from ..bounds import output_linf_bound
from ..paths import param
from ..sites import INPUT, Adapter, PureModel, Structure
from ._common import check_inputs, compiled_kernel, input_dtype, quantile_levels
from ._deviation import DEFAULT_QUANTILES, Deviation, deviation

__all__ = ["bound", "bound_body", "lipschitz_constants", "check_site", "bound_applies",
           "bound_table"]


@functools.partial(jax.jit, static_argnames=("adapter", "dtype"))
def _lipschitz_kernel(adapter: Adapter, arrays, dtype) -> jax.Array:
    params, rest = adapter.unpack(arrays)
    g = graph_lib.read(adapter.structure, dtype)
    weights, rest_leaves = graph_lib.state_arrays(adapter.structure, params, rest)
    return graph_lib.operator_norms(g, weights, rest_leaves)


# Operator norms of concrete parameters, keyed by the identity of the parameter arrays.
# JAX arrays are immutable, so the same objects mean the same values; weak references
# make sure an id is not reused by a new array.
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 32
_CACHE_LOCK = threading.Lock()


_CONCRETE_TYPES: set[type] = set()  # types found to be concrete JAX arrays


def _is_concrete(leaf) -> bool:
    if type(leaf) in _CONCRETE_TYPES:  # isinstance(·, jax.Array) is an ABC check: ~0.4 µs
        return True
    ok = isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
    if ok:
        _CONCRETE_TYPES.add(type(leaf))
    return ok


def lipschitz_constants(adapter: Adapter, arrays, dtype=jnp.float32) -> jax.Array:
    """The certified norms of the model's linear maps and scales, cached.

    One entry per constant operand the graph's Lipschitz rules need
    (:func:`jaxsens.graph.operator_norms`): Gram-iteration bounds on dense kernels,
    certified convolution bounds, and the extreme values of elementwise scales
    (inference-mode normalization). Concrete parameters seen before (the same,
    immutable, arrays) reuse the norms of the earlier call, so repeated bounds on one
    model cost a forward pass. Traced parameters (inside ``jax.grad``, ``jax.jit`` ...)
    compute them in the trace.

    Args:
      adapter: the model's adapter (:func:`jaxsens.sites.adapt`).
      arrays: the arrays that go with it.
      dtype: the floating dtype of the inputs the bound will see.

    Returns:
      The vector of norms.
    """
    dtype = jnp.dtype(dtype)
    leaves = arrays if adapter.treedef is not None else jax.tree.leaves(arrays)
    if not all(map(_is_concrete, leaves)):
        return _lipschitz_kernel(adapter, arrays, dtype)
    key = (adapter, dtype, tuple(map(id, leaves)))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            refs, value = hit
            if all(map(operator.is_, map(operator.call, refs), leaves)):  # same length
                _CACHE.move_to_end(key)
                return value
    value = _lipschitz_kernel(adapter, arrays, dtype)
    with _CACHE_LOCK:
        _CACHE[key] = ([weakref.ref(leaf) for leaf in leaves], value)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return value


def check_site(struct: Structure, site: str) -> None:
    """A one-line ValueError unless a certified bound exists at ``site``.

    Args:
      struct: the model's structure.
      site: a site name.

    Raises:
      ValueError: unknown site, or an operation between the site and the output without
        a Lipschitz rule (the message names it, its line and the sites it blocks).
    """
    struct.site(site)
    reason = graph_lib.bound_blocker(graph_lib.read(struct), site)
    if reason is not None:
        raise ValueError(reason)


def _margin_layer(struct: Structure, site: str, law) -> int | None:
    """The dense-layer index of ``site`` when ``law`` is ℓ∞-operator weight noise and the
    model is a dense chain (see :mod:`jaxsens.bounds`), else ``None``."""
    if not (isinstance(law, noise_lib.WeightRelative) and law.norm == "linf"):
        return None
    try:
        steps = graph_lib.dense_chain(graph_lib.read(struct))
    except graph_lib.GraphError:
        return None
    return next((i for i, st in enumerate(steps) if st.site == site), None)


def _radius_flag(law, info) -> bool:
    """The law's static almost-sure flag for this site (no computation)."""
    method = law.operator_radius if info.kind == "weight" and len(info.shape) >= 2 \
        else law.radius
    box = []

    def f(v):
        r, flag = method(v)
        box.append(flag)
        return r

    jax.eval_shape(f, jax.ShapeDtypeStruct(info.shape, jnp.float32))
    return bool(box[0])


def bound_body(struct: Structure, params, rest, x, law, lips, *, site: str,
               qlevels: tuple[float, ...] = DEFAULT_QUANTILES) -> Deviation:
    """The traceable certified bound at ``site`` given the model's operator norms."""
    check_site(struct, site)
    g = graph_lib.read(struct, x.dtype)
    info = struct.site(site)
    out, values = struct.apply_with_values(params, rest, x)
    batch = x.shape[0]
    k = math.prod(out.shape[1:])
    dtype = out.dtype
    need = graph_lib.data_vars(g, site)
    data = None
    if need:
        weights, rest_leaves = graph_lib.state_arrays(struct, params, rest)
        data = jax.vmap(lambda x1: graph_lib.evaluate(g, weights, rest_leaves, x1[None],
                                                      capture=need))(x)
    lip = jnp.asarray(graph_lib.site_lipschitz(g, site, lips, data), dtype)
    a_s = _radius_flag(law, info)
    if info.kind == "weight":
        w = param(params, info.path)
        radius, _ = law.operator_radius(w) if w.ndim >= 2 else law.radius(w)
        upper = jnp.broadcast_to(lip * radius, (batch,))
        layer = _margin_layer(struct, site, law)
        if layer is not None:
            # ℓ∞-operator weight noise in a dense chain: the margin theory's recursion
            # bounds ‖ΔF‖_∞; ‖ΔF‖₂ ≤ √k ‖ΔF‖_∞. Both bounds hold: keep the smaller.
            linf = output_linf_bound(PureModel(struct, params, rest), x, eps=law.level,
                                     layers=[layer], relative=True)
            upper = jnp.minimum(upper, math.sqrt(k) * linf.astype(upper.dtype))
    else:
        v = x if site == INPUT else values[site]
        upper = lip * jax.vmap(lambda vv: law.radius(vv)[0])(v)
    return deviation(batch, k, dtype, quantile_levels=qlevels, almost_sure=a_s,
                     upper=upper.astype(dtype))


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
    """Certified upper bound on ‖ΔF‖ per example, read from the model's own computation.

    Activation/input site: ‖ΔF‖ ≤ L · ‖η‖ with L the Lipschitz constant of the map from
    the site to the output, composed rule by rule over the traced computation
    (:mod:`jaxsens.graph`): dense kernels contribute a certified upper bound on their
    spectral norm (Gram iteration, a few matmuls; never below the exact value),
    convolutions a certified bound, activations their constants (gelu 1.129, silu 1.1,
    tanh 1, sigmoid ¼ ...), inference-mode normalization its largest scale, pooling its
    window overlap, and residual additions the sum of their branches' constants. Weight
    site W: ‖ΔF‖ ≤ L · ‖Δ‖₂ · ‖h_in‖, with h_in the layer's input; for ℓ∞-operator weight
    noise in a chain of dense layers, also √k times the margin theory's bound on ‖ΔF‖_∞
    (:func:`jaxsens.bounds.output_linf_bound`), whichever is smaller. Operations without a
    global Lipschitz constant (attention, LayerNorm) are refused in one line. ‖η‖ (or
    ‖Δ‖₂) comes from the law: exact for bounded laws
    (``almost_sure=True``: the bound holds for every draw), the root mean square for
    Gaussian laws (then it bounds E‖ΔF‖ and its rms).

    The per-layer constants are computed once per set of parameters and cached (JAX
    arrays are immutable), so repeated bounds on one model cost about one forward pass.

    Args:
      model: an NNX module or a ``PureModel``.
      x: inputs ``(batch, *input_shape)``.
      site: ``"input"``, an activation site or a weight path.
      noise: a law from :mod:`jaxsens.noise`.
      key: ignored (deterministic); accepted so that every estimator has one call shape.
      quantiles: levels of the (absent, NaN) quantiles, for stacking with sampled results.

    Returns:
      A :class:`Deviation` with ``upper`` and ``almost_sure``.

    Examples:
      The sphere law is bounded, so the bound holds for every draw:

      >>> import jax, jax.numpy as jnp, jaxsens as js
      >>> from flax import nnx
      >>> model = js.models.MLP(4, [8], 2, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(1), (3, 4))
      >>> eta = js.noise.RelativeNorm(0.05)
      >>> b = js.bound(model, x, site="h0", noise=eta)
      >>> bool(b.almost_sure)
      True
      >>> r = js.sampled(model, x, site="h0", noise=eta, key=jax.random.key(0),
      ...                num_samples=100, quantiles=[1.0])
      >>> bool(jnp.all(r.quantiles[:, 0] <= b.upper))
      True
    """
    del key
    p = check_inputs(model, x, site, noise)
    check_site(p.structure, site)
    lips = lipschitz_constants(p.adapter, p.arrays, input_dtype(p.x))
    res = _kernel(p.adapter, p.arrays, p.x, noise, lips, site=site,
                  qlevels=quantile_levels(quantiles))
    return res.labelled(estimator="bound", site=site, law=noise.describe())


def bound_applies(struct: Structure, site: str) -> bool:
    """Whether a certified bound exists at ``site``.

    Args:
      struct: the model's structure.
      site: a site name.

    Returns:
      ``False`` when an operation between the site and the output has no Lipschitz rule.
    """
    return graph_lib.bound_blocker(graph_lib.read(struct), site) is None


def bound_table(struct: Structure, params, rest, x, laws, levels, lips, *,
                sites: tuple[str, ...], qlevels: tuple[float, ...]
                ) -> tuple[Deviation, tuple[bool, ...]]:
    """Every site × level: the bound at level 1, times the level (radii are linear in
    it); sites without a certified bound are absent."""
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
