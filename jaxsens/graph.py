"""Read a model's network from its own traced computation.

jaxsens needs more than a forward pass for its certified bounds and its analytic moments:
it needs to know which linear maps, activations, additions and poolings lie between a site
and the output. Instead of asking the user for a second description of the network, the
graph reader traces the model's pure function once per architecture (and input dtype) to a
jaxpr, inlines nested calls (``jit``, ``custom_jvp`` ...), and keeps one flat list of
:class:`Node` s. Analyses read it with one rule per primitive (as jax_verify does):

* :func:`site_lipschitz`: a certified Lipschitz constant from a site to the output,
  composing through residual additions (sums of branch constants), elementwise
  activations (their constants), inference-mode normalization (its per-feature scale),
  pooling, reshapes and reductions;
* :func:`relu_sites`, :func:`evaluate` (with captures and overrides), :func:`bypasses`:
  two-stage moments by automatic differentiation at any ReLU site;
* :func:`moment_steps`: the chain of affine maps and ReLUs the layerwise moments walk.

An elementwise activation written as several primitives (``gelu``, ``silu``,
``leaky_relu`` ...) is recognized by evaluating the cluster of elementwise operations that
computes it from one value on a fixed grid and matching it against :data:`ACTIVATIONS`,
whose Lipschitz constants are certified (``tests/test_graph.py`` checks each against a
dense grid of derivatives). Operations without a global Lipschitz constant — products of
two perturbed values (attention, gating), LayerNorm's normalization, exponentials — are
refused with one line naming the primitive, the line of the model that made it and the
sites it blocks.
"""

from __future__ import annotations

import dataclasses
import linecache
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from .linalg import conv_operator_norm_bound, spectral_norm_bound
from .sites import INPUT, Structure

__all__ = [
    "ACTIVATIONS",
    "RULES",
    "Graph",
    "GraphError",
    "Node",
    "read",
    "state_arrays",
    "evaluate",
    "evaluate_node",
    "Lit",
    "operator_norms",
    "site_lipschitz",
    "bound_blocker",
    "relu_sites",
    "bypasses",
    "moment_steps",
    "MomentStep",
    "DenseStep",
    "dense_chain",
]


class GraphError(ValueError):
    """A model's computation holds an operation an analysis cannot read."""


# --------------------------------------------------------------------------- activations
ACTIVATIONS: dict[str, tuple[Callable[[jax.Array], jax.Array], float]] = {
    "relu": (jax.nn.relu, 1.0),
    "leaky_relu(0.01)": (lambda x: jax.nn.leaky_relu(x, 0.01), 1.0),
    "leaky_relu(0.1)": (lambda x: jax.nn.leaky_relu(x, 0.1), 1.0),
    "leaky_relu(0.2)": (lambda x: jax.nn.leaky_relu(x, 0.2), 1.0),
    "leaky_relu(0.3)": (lambda x: jax.nn.leaky_relu(x, 0.3), 1.0),
    "relu6": (jax.nn.relu6, 1.0),
    "hard_tanh": (jax.nn.hard_tanh, 1.0),
    "tanh": (jnp.tanh, 1.0),
    "sigmoid": (jax.nn.sigmoid, 0.25),
    "hard_sigmoid": (jax.nn.hard_sigmoid, 0.16667),
    "softplus": (jax.nn.softplus, 1.0),
    "log_sigmoid": (jax.nn.log_sigmoid, 1.0),
    "soft_sign": (jax.nn.soft_sign, 1.0),
    "elu": (jax.nn.elu, 1.0),
    "celu": (jax.nn.celu, 1.0),
    "selu": (jax.nn.selu, 1.7582),
    "gelu": (lambda x: jax.nn.gelu(x, approximate=False), 1.1290),
    "gelu_tanh": (lambda x: jax.nn.gelu(x, approximate=True), 1.1291),
    "silu": (jax.nn.silu, 1.0999),
    "mish": (jax.nn.mish, 1.0886),
    "hard_silu": (jax.nn.hard_silu, 1.5001),
}
"""Activations recognized inside a traced model: name → (function, Lipschitz constant).

Each constant is an upper bound on sup |σ'| (e.g. gelu: Φ(x) + xφ(x) peaks at 1.12890 at
x = √2; silu: 1.09984 at x ≈ 2.40; selu: scale·α = 1.75810 just below 0), rounded up."""

# The grid a cluster of elementwise operations is evaluated on to recognize it.
_GRID = np.concatenate([np.linspace(-12.0, 12.0, 193), [-40.0, -25.0, 25.0, 40.0]])

# Primitives applied one element at a time (shapes equal, scalars broadcast).
_ELEMENTWISE = frozenset("""
add sub mul div max min neg abs sign exp exp2 log log1p expm1 tanh logistic erf erfc sqrt
rsqrt cbrt integer_pow pow square select_n ge gt le lt eq ne and or not convert_element_type
sin cos atan is_finite clamp copy copy_p nextafter
""".split())
# Primitives whose Lipschitz rule keeps the constant (permutations, copies, selections).
_PASS = frozenset("""
reshape squeeze expand_dims transpose convert_element_type copy copy_p rev reduce_precision
slice dynamic_slice pad neg abs reduce_max reduce_min optimization_barrier split
""".split())
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_SCALAR_LIPSCHITZ = {"tanh": 1.0, "logistic": 0.25, "sin": 1.0, "cos": 1.0, "atan": 1.0,
                     "erf": 2.0 / math.sqrt(math.pi), "erfc": 2.0 / math.sqrt(math.pi)}


# --------------------------------------------------------------------------- the graph
@dataclasses.dataclass(frozen=True)
class Lit:
    """A constant operand (a literal or a constant captured by the trace)."""

    value: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Node:
    """One primitive application of the flattened computation.

    Attributes:
      primitive: the JAX primitive.
      params: its parameters.
      inputs: operands: variable ids (``int``) or constants (:class:`Lit`).
      outputs: ids of the variables it defines.
      where: the model's source line that made it (for error messages).
    """

    primitive: Any
    params: Mapping[str, Any]
    inputs: tuple[int | Lit, ...]
    outputs: tuple[int, ...]
    where: str

    @property
    def name(self) -> str:
        return str(self.primitive.name)


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """A model's computation for one example (batch axis of size 1), flattened.

    Attributes:
      structure: the model's structure.
      nodes: the primitive applications in execution order.
      avals: ``{var: (shape, dtype)}``.
      weight_vars: ``{weight site: var}`` of the parameter values.
      rest_vars: vars of the non-parameter state leaves (in ``jax.tree.leaves`` order).
      x_var: the input's var, ``(1, *input_shape)``.
      delta_vars: ``{activation site: var}`` of the delta added at the site.
      site_vars: ``{activation site: (clean var, perturbed var)}``.
      outputs: the output vars.
      producer: ``{var: index of the node that defines it}``.
      depends: ``{var: seeds it depends on}``; seeds are ``"input"``, activation sites
        and weight sites.
    """

    structure: Structure
    nodes: tuple[Node, ...]
    avals: Mapping[int, tuple[tuple[int, ...], Any]]
    weight_vars: Mapping[str, int]
    rest_vars: tuple[int, ...]
    x_var: int
    delta_vars: Mapping[str, int]
    site_vars: Mapping[str, tuple[int, int]]
    outputs: tuple[int, ...]
    producer: Mapping[int, int]
    depends: Mapping[int, frozenset[str]]
    memo: dict = dataclasses.field(default_factory=dict)

    def seed(self, site: str) -> int:
        """The var a perturbation at ``site`` enters through."""
        if site == INPUT:
            return self.x_var
        if site in self.delta_vars:
            return self.delta_vars[site]
        return self.weight_vars[site]

    def is_const(self, v: int | Lit) -> bool:
        """Whether ``v`` depends on parameters and constants only (not on the input)."""
        if isinstance(v, Lit):
            return True
        seeds = self.depends[v]
        return INPUT not in seeds and not any(s in self.delta_vars for s in seeds)

    def shape(self, v: int | Lit) -> tuple[int, ...]:
        if isinstance(v, Lit):
            return tuple(np.shape(v.value))
        return self.avals[v][0]


_LOCK = threading.Lock()
_GRAPHS: dict[tuple[Structure, Any], Graph] = {}  # keyed by dtype name, and as asked


def _where(eqn) -> str:
    """``file.py:12 (`code`)`` of the first frame outside JAX, Flax and jaxsens's adapter."""
    skip = (os.sep + "jax" + os.sep, os.sep + "flax" + os.sep, os.sep + "jaxlib" + os.sep,
            "jaxsens" + os.sep + "sites.py", "jaxsens" + os.sep + "graph.py")
    frames = getattr(getattr(eqn.source_info, "traceback", None), "frames", None) or []
    for fr in frames:
        if not any(s in fr.file_name for s in skip):
            code = linecache.getline(fr.file_name, fr.line_num).strip()
            where = f"{os.path.basename(fr.file_name)}:{fr.line_num}"
            return f"{where} (`{code}`)" if code else where
    return "an unknown line"


class _Builder:
    def __init__(self):
        self.nodes: list[Node] = []
        self.avals: dict[int, tuple[tuple[int, ...], Any]] = {}
        self.count = 0

    def new(self, aval) -> int:
        self.count += 1
        self.avals[self.count] = (tuple(aval.shape), aval.dtype)
        return self.count

    def inline(self, jaxpr, consts, args: Sequence[int | Lit]) -> list[int | Lit]:
        env: dict[Any, int | Lit] = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = Lit(c)
        for v, a in zip(jaxpr.invars, args, strict=True):
            env[v] = a

        def read(a):
            return Lit(a.val) if isinstance(a, jcore.Literal) else env[a]

        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            sub = next((eqn.params[k] for k in _CALLS if k in eqn.params), None)
            if sub is not None and eqn.primitive.name not in ("scan", "while", "cond"):
                inner = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
                inner_consts = sub.consts if isinstance(sub, jcore.ClosedJaxpr) else ()
                nin = len(inner.invars)
                outs = self.inline(inner, inner_consts, ins[len(ins) - nin:])
                for o, r in zip(eqn.outvars, outs, strict=True):
                    env[o] = r
                continue
            outs_ids = tuple(self.new(o.aval) for o in eqn.outvars)
            for o, i in zip(eqn.outvars, outs_ids, strict=True):
                env[o] = i
            self.nodes.append(Node(eqn.primitive, dict(eqn.params), tuple(ins), outs_ids,
                                   _where(eqn)))
        return [read(a) for a in jaxpr.outvars]


def state_arrays(struct: Structure, params, rest) -> tuple[list[jax.Array], list[Any]]:
    """The arrays a graph is evaluated with: the parameter values in the order of the
    structure's weight sites, and the leaves of the remaining state.

    Args:
      struct: the model's structure.
      params: its parameter state (``nnx.State``).
      rest: its remaining state.

    Returns:
      ``(weights, rest_leaves)``.
    """
    weights = [v.get_value() if hasattr(v, "get_value") else v
               for _, v in nnx.to_flat_state(params)]
    return weights, jax.tree.leaves(rest)


def read(struct: Structure, dtype=None) -> Graph:
    """The flattened computation of ``struct`` for one example of dtype ``dtype``, cached.

    Args:
      struct: a model's structure (from :func:`jaxsens.split`).
      dtype: the floating dtype of the input (default: the parameters' floating dtype).

    Returns:
      The :class:`Graph`: one trace per (structure, dtype), reused afterwards.
    """
    g = _GRAPHS.get((struct, dtype))  # a repeated call: one look-up
    if g is not None:
        return g
    asked = dtype
    if dtype is None:
        floats = [dt for _, _, _, dt in struct.state_spec[0] if jnp.issubdtype(dt, jnp.floating)]
        dtype = jnp.result_type(*floats) if floats else jnp.float32
    key = (struct, jnp.dtype(dtype).name)
    g = _GRAPHS.get(key)
    if g is not None:
        with _LOCK:
            return _GRAPHS.setdefault((struct, asked), g)
    with jax.ensure_compile_time_eval():
        g = _trace(struct, jnp.dtype(dtype))
    with _LOCK:
        g = _GRAPHS.setdefault(key, g)
        return _GRAPHS.setdefault((struct, asked), g)


def _trace(struct: Structure, dtype) -> Graph:
    param_spec, rest_def, rest_avals = struct.state_spec
    acts = struct.activation_sites

    def fn(weights, rest_leaves, x, deltas):
        params = nnx.from_flat_state([(path, typ(w)) for (path, typ, _, _), w
                                      in zip(param_spec, weights, strict=True)])
        rest = jax.tree_util.tree_unflatten(rest_def, rest_leaves)
        return struct.apply(params, rest, x, dict(zip(acts, deltas, strict=True)))

    w_avals = [jax.ShapeDtypeStruct(shape, dt) for _, _, shape, dt in param_spec]
    x_aval = jax.ShapeDtypeStruct((1, *struct.input_shape), dtype)
    d_avals = [jax.ShapeDtypeStruct((1, *struct.site(n).shape), dtype) for n in acts]
    closed = jax.make_jaxpr(fn)(w_avals, list(rest_avals), x_aval, d_avals)
    b = _Builder()
    invars = [b.new(v.aval) for v in closed.jaxpr.invars]
    outs = b.inline(closed.jaxpr, closed.consts, invars)
    nw, nr = len(w_avals), len(rest_avals)
    names = [n for n in struct.weight_sites]
    weight_vars = dict(zip(names, invars[:nw], strict=True))
    rest_vars = tuple(invars[nw:nw + nr])
    x_var = invars[nw + nr]
    delta_vars = dict(zip(acts, invars[nw + nr + 1:], strict=True))
    producer: dict[int, int] = {}
    for i, node in enumerate(b.nodes):
        for o in node.outputs:
            producer[o] = i
    depends: dict[int, frozenset[str]] = {v: frozenset() for v in invars}
    for name, v in weight_vars.items():
        depends[v] = frozenset((name,))
    depends[x_var] = frozenset((INPUT,))
    for name, v in delta_vars.items():
        depends[v] = frozenset((name,))
    site_vars: dict[str, tuple[int, int]] = {}
    delta_of = {v: n for n, v in delta_vars.items()}
    for node in b.nodes:
        first = node.inputs[0] if node.inputs else None
        if node.name == "convert_element_type" and isinstance(first, int) and first in delta_of:
            delta_of[node.outputs[0]] = delta_of[first]
        dep: frozenset[str] = frozenset()
        for a in node.inputs:
            if isinstance(a, int):
                dep = dep | depends[a]
        for o in node.outputs:
            depends[o] = dep
        if node.name == "add":
            ids = [a for a in node.inputs if isinstance(a, int)]
            hit = [a for a in ids if a in delta_of]
            if len(hit) == 1 and len(ids) == 2:
                other = ids[0] if ids[1] == hit[0] else ids[1]
                site_vars.setdefault(delta_of[hit[0]], (other, node.outputs[0]))
    out_ids = tuple(o for o in outs if isinstance(o, int))
    if len(out_ids) != len(outs):
        raise GraphError("the model's output does not depend on its input")
    return Graph(struct, tuple(b.nodes), b.avals, weight_vars, rest_vars, x_var, delta_vars,
                 site_vars, out_ids, producer, depends)


# --------------------------------------------------------------------------- evaluation
def _bind(node: Node, vals: Sequence[Any]) -> list[Any]:
    params = node.primitive.get_bind_params(dict(node.params))
    out = node.primitive.bind(*vals, **params)
    return list(out) if node.primitive.multiple_results else [out]


def evaluate_node(node: Node, vals: Sequence[Any]) -> Any:
    """Apply one node to operand values.

    Args:
      node: a node of a :class:`Graph`.
      vals: one value per operand (its :class:`Lit` constants included).

    Returns:
      The node's (first) output.
    """
    return _bind(node, vals)[0]


def evaluate(graph: Graph, weights: Sequence[jax.Array], rest_leaves: Sequence[Any],
             x: jax.Array | None, deltas: Mapping[str, jax.Array] | None = None, *,
             override: Mapping[int, jax.Array] | None = None,
             capture: Sequence[int] = (), until: int | None = None,
             const_only: bool = False) -> dict[int, Any]:
    """Run the graph on one example, returning the values of chosen vars.

    Args:
      graph: from :func:`read`.
      weights: parameter values in the structure's weight-site order (:func:`state_arrays`).
      rest_leaves: the remaining state's leaves.
      x: the example, ``(1, *input_shape)`` (``None`` with ``const_only``).
      deltas: ``{activation site: delta (1, *site_shape)}``; missing ones are zero.
      override: ``{var: value}`` replacing what the graph computes for those vars.
      capture: vars whose values to return (the outputs are always returned).
      until: stop once this var is computed.
      const_only: evaluate only the vars that do not depend on the input (deltas zero
        unless given).

    Returns:
      ``{var: value}`` for the captured vars and the outputs (those computed).
    """
    env: dict[int, Any] = dict(zip(graph.weight_vars.values(), weights, strict=True))
    env.update(zip(graph.rest_vars, rest_leaves, strict=True))
    override = dict(override or {})
    if not const_only:
        env[graph.x_var] = x
    for name, v in graph.delta_vars.items():
        d = (deltas or {}).get(name)
        shape, dt = graph.avals[v]
        env[v] = jnp.zeros(shape, dt) if d is None else d
    for node in graph.nodes:
        if const_only and any(isinstance(a, int) and INPUT in graph.depends[a]
                              for a in node.inputs):
            continue
        vals = [a.value if isinstance(a, Lit) else env[a] for a in node.inputs]
        for o, val in zip(node.outputs, _bind(node, vals), strict=True):
            env[o] = override.get(o, val)
        if until is not None and until in node.outputs:
            break
    want = set(capture) | set(graph.outputs)
    return {v: env[v] for v in want if v in env}


# --------------------------------------------------------------------------- Lipschitz
class _Unsupported(Exception):
    def __init__(self, node: Node, reason: str):
        super().__init__(reason)
        self.node = node
        self.reason = reason


def _scalar_value(graph: Graph, a: int | Lit) -> float | None:
    """The value of a constant operand that is one number broadcast, else ``None``."""
    if isinstance(a, Lit):
        v = np.asarray(a.value)
        return float(v) if v.size == 1 and np.issubdtype(v.dtype, np.number) else None
    i = graph.producer.get(a)
    if i is None:
        return None
    node = graph.nodes[i]
    if node.name in ("broadcast_in_dim", "convert_element_type", "reshape") and \
            isinstance(node.inputs[0], Lit):
        return _scalar_value(graph, node.inputs[0])
    return None


def _root(graph: Graph, v: int) -> int:
    """The var that ``v`` is an elementwise function of (with scalar constants only)."""
    memo = graph.memo.setdefault("root", {})
    if v in memo:
        return memo[v]
    r = v
    i = graph.producer.get(v)
    if i is not None:
        node = graph.nodes[i]
        if node.name in _ELEMENTWISE and len(node.outputs) == 1:
            roots = set()
            ok = True
            for a in node.inputs:
                if _scalar_value(graph, a) is not None:
                    continue
                if isinstance(a, Lit) or graph.shape(a) != graph.shape(v):
                    ok = False
                    break
                roots.add(_root(graph, a))
            if ok and len(roots) == 1:
                r = roots.pop()
    memo[v] = r
    return r


def _fingerprint(graph: Graph, v: int) -> tuple[str, float] | None:
    """The known activation ``v`` computes from its root, with its constant, if any."""
    memo = graph.memo.setdefault("fingerprint", {})
    if v in memo:
        return memo[v]
    root = _root(graph, v)
    dtype = graph.avals[v][1]
    found = None
    if jnp.issubdtype(dtype, jnp.floating):
        with jax.ensure_compile_time_eval():
            t = jnp.asarray(_GRID, dtype)
            values: dict[int, Any] = {root: t}

            def value(a):
                s = _scalar_value(graph, a)
                if s is not None and (isinstance(a, Lit) or a not in values):
                    return jnp.asarray(s, graph.avals[a][1] if isinstance(a, int) else None)
                assert isinstance(a, int)
                if a not in values:
                    node = graph.nodes[graph.producer[a]]
                    outs = _bind(node, [value(b) for b in node.inputs])
                    values.update(zip(node.outputs, outs, strict=True))
                return values[a]

            got = np.asarray(value(v), np.float64)
            tol = 2e-5 if jnp.finfo(dtype).bits <= 32 else 1e-9
            for name, (f, lip) in ACTIVATIONS.items():
                want = np.asarray(f(t), np.float64)
                if np.all(np.abs(got - want) <= tol * (1.0 + np.abs(want))):
                    found = (name, lip)
                    break
    memo[v] = found
    return found


def _matrix_norm(c: jax.Array, contract: Sequence[int], batch: Sequence[int]) -> jax.Array:
    """Certified ‖·‖₂ of the linear map ``c`` defines by contracting ``contract`` (max over
    the ``batch`` axes)."""
    free = [d for d in range(c.ndim) if d not in contract and d not in batch]
    m = jnp.transpose(c, (*batch, *contract, *free))
    nb = math.prod(c.shape[d] for d in batch)
    nc = math.prod(c.shape[d] for d in contract)
    m = m.reshape(nb, nc, -1)
    return jnp.max(jax.vmap(spectral_norm_bound)(m))


def _conv_taps(node: Node, rhs_shape: tuple[int, ...]) -> int:
    spec = node.params["dimension_numbers"].rhs_spec
    return math.prod(rhs_shape[d] for d in spec[2:])


def _conv_kernel_norm(node: Node, k: jax.Array) -> jax.Array:
    spec = node.params["dimension_numbers"].rhs_spec
    out_dim, in_dim, spatial = spec[0], spec[1], spec[2:]
    hwio = jnp.transpose(k, (*spatial, in_dim, out_dim))
    taps = math.prod(k.shape[d] for d in spatial)
    return conv_operator_norm_bound(hwio.reshape(taps, 1, k.shape[in_dim], k.shape[out_dim]))


def _slot_value(graph: Graph, node: Node, j: int, c: jax.Array) -> jax.Array:
    """The factor a constant operand ``j`` of ``node`` contributes (see :func:`_slots`)."""
    if node.name == "dot_general":
        (cl, cr), (bl, br) = node.params["dimension_numbers"]
        return _matrix_norm(c, cl if j == 0 else cr, bl if j == 0 else br)
    if node.name == "conv_general_dilated":
        if j == 1:
            return _conv_kernel_norm(node, c)
        taps = _conv_taps(node, graph.shape(node.inputs[1]))
        return math.sqrt(taps) * jnp.sqrt(jnp.sum(jnp.square(c)))
    if node.name == "mul":
        return jnp.max(jnp.abs(c))
    return 1.0 / jnp.min(jnp.abs(c))  # div by a constant


def _slots(graph: Graph) -> tuple[tuple[int, int], ...]:
    """(node index, operand) of every constant array operand whose norm a rule needs."""
    memo = graph.memo
    if "slots" not in memo:
        out = []
        for i, node in enumerate(graph.nodes):
            if node.name not in ("dot_general", "conv_general_dilated", "mul", "div"):
                continue
            for j, a in enumerate(node.inputs):
                if node.name == "div" and j == 0:
                    continue
                if isinstance(a, int) and graph.is_const(a) and math.prod(graph.shape(a)) > 1:
                    out.append((i, j))
        memo["slots"] = tuple(out)
    return memo["slots"]


def operator_norms(graph: Graph, weights: Sequence[jax.Array], rest_leaves: Sequence[Any]
                   ) -> jax.Array:
    """Certified norms of every constant operand the Lipschitz rules need.

    Dense maps: the Gram-iteration bound on ‖W‖₂ (max over batch axes of a batched
    contraction); convolutions: :func:`jaxsens.linalg.conv_operator_norm_bound`;
    elementwise scales: ``max |c|``; divisions: ``1 / min |c|``. They depend on the
    parameters only, so :func:`jaxsens.estimators` caches them per set of parameters.

    Args:
      graph: from :func:`read`.
      weights: parameter values (:func:`state_arrays`).
      rest_leaves: the remaining state's leaves.

    Returns:
      A vector with one entry per slot (possibly empty).
    """
    slots = _slots(graph)
    if not slots:
        return jnp.zeros((0,), jnp.float32)
    need = [graph.nodes[i].inputs[j] for i, j in slots]
    env = evaluate(graph, weights, rest_leaves, None, const_only=True,
                   capture=[a for a in need if isinstance(a, int)])
    vals = []
    for i, j in slots:
        a = graph.nodes[i].inputs[j]
        assert isinstance(a, int)  # slots are vars
        vals.append(_slot_value(graph, graph.nodes[i], j, env[a]))
    dtype = jnp.result_type(*[jnp.asarray(v).dtype for v in vals], jnp.float32)
    return jnp.stack([jnp.asarray(v, dtype) for v in vals])


@dataclasses.dataclass
class _Walk:
    """State of one Lipschitz propagation from one site."""

    graph: Graph
    norms: Any  # vector of operator_norms, or None (structure only)
    data: Mapping[int, Any] | None  # values of non-constant, unperturbed operands
    L: dict[int, Any]
    matrix: dict[int, bool]  # the var is the weight matrix itself (‖·‖ is the operator norm)
    need: set[int]  # data vars whose norms a rule needed (structure pass)


def _factor(w: _Walk, i: int, node: Node, j: int, kind: str) -> Any:
    """The norm a non-perturbed operand ``j`` of node ``i`` contributes."""
    a = node.inputs[j]
    s = _scalar_value(w.graph, a)
    if s is not None:
        s = abs(s)
        if kind == "inv":
            return 1.0 / s
        if kind == "frobenius":
            return s * math.sqrt(math.prod(w.graph.shape(a)))
        return s
    if isinstance(a, Lit):
        c = np.abs(np.asarray(a.value, np.float64))
        if kind == "inv":
            return 1.0 / float(c.min())
        if kind == "frobenius":
            return float(np.sqrt(np.sum(np.square(c))))
        if kind == "max":
            return float(c.max())
        # ‖·‖₂ ≤ ‖·‖_F for every matrix view; a convolution adds √taps.
        return float(np.sqrt(np.sum(np.square(c)))) * _conv_factor(w.graph, node, j)
    if kind != "frobenius" and w.graph.is_const(a) and (i, j) in _slots(w.graph):
        if w.norms is None:
            return 1.0
        return w.norms[_slots(w.graph).index((i, j))]
    # An operand that depends on the input but not on the perturbation (or a parameter
    # met by a perturbed weight): its norm from its value.
    w.need.add(a)
    if w.data is None:
        return 1.0
    v = w.data[a]
    v = v.reshape(v.shape[0], -1)
    if kind == "max":
        return jnp.max(jnp.abs(v), axis=-1)
    if kind == "inv":
        return 1.0 / jnp.min(jnp.abs(v), axis=-1)
    frob = jnp.sqrt(jnp.sum(jnp.square(v), axis=-1))
    return frob * _conv_factor(w.graph, node, j) if kind == "op" else frob


def _conv_factor(graph: Graph, node: Node, j: int) -> float:
    """√taps when operand ``j`` is the kernel of a convolution (‖conv‖ ≤ √taps ‖K‖_F)."""
    if node.name == "conv_general_dilated" and j == 1:
        return math.sqrt(_conv_taps(node, graph.shape(node.inputs[1])))
    return 1.0


def _to_frobenius(w: _Walk, v: int) -> Any:
    """The constant of ``v`` measured in its Frobenius norm (‖Δ‖_F ≤ √min(m, n) ‖Δ‖₂)."""
    if not w.matrix.get(v):
        return w.L[v]
    shape = w.graph.shape(v)
    rows = math.prod(shape[:-1])
    return w.L[v] * math.sqrt(min(rows, shape[-1]))


# --- Lipschitz rules, one per primitive. A rule gets the walk, the node's index, the node
# and the indices of its perturbed operands; it returns the constant of each output (the
# factor by which its change can exceed the perturbation's norm) or raises _Unsupported.
Rule = Callable[["_Walk", int, Node, list[int]], list[Any]]


def _lip(w: _Walk, node: Node, j: int) -> Any:
    a = node.inputs[j]
    assert isinstance(a, int)  # a perturbed operand is a var
    return _to_frobenius(w, a)


def _rule_pass(w, i, node, live):
    """Permutations, copies, selections and maxima: ‖Δout‖ ≤ ‖Δin‖."""
    if node.name == "dynamic_slice" and any(j > 0 for j in live):
        raise _Unsupported(node, "slices at positions that depend on the perturbation")
    return [_lip(w, node, live[0])] * len(node.outputs)


def _rule_sum(w, i, node, live):
    """Sums (residual additions) and elementwise max/min: the constants add."""
    return [sum(_lip(w, node, j) for j in live)]


def _rule_stack(w, i, node, live):
    """Concatenation, or an elementwise choice fixed by the clean values: √Σ L²."""
    if node.name == "select_n" and 0 in live:
        raise _Unsupported(node, "a choice decided by the perturbed value")
    return [sum(_lip(w, node, j) ** 2 for j in live) ** 0.5]


def _rule_broadcast(w, i, node, live):
    """Each entry copied n_out/n_in times: √(n_out/n_in)."""
    n_in = math.prod(w.graph.shape(node.inputs[0]))
    n_out = math.prod(w.graph.shape(node.outputs[0]))
    return [_lip(w, node, 0) * math.sqrt(n_out / max(n_in, 1))]


def _rule_reduce_sum(w, i, node, live):
    """A sum of m entries: |Σ a| ≤ √m ‖a‖ (Cauchy–Schwarz)."""
    n_in = math.prod(w.graph.shape(node.inputs[0]))
    n_out = math.prod(w.graph.shape(node.outputs[0]))
    return [_lip(w, node, 0) * math.sqrt(n_in / max(n_out, 1))]


def _rule_window(w, i, node, live):
    """Pooling: each entry lies in at most `overlap` windows; a window sum of m entries
    adds √m (average pooling's division is a later node), a window max nothing."""
    p = node.params
    dil = p.get("window_dilation") or (1,) * len(p["window_dimensions"])
    overlap = math.prod(min(wd, math.ceil(((wd - 1) * d + 1) / s)) for wd, d, s in
                        zip(p["window_dimensions"], dil, p["window_strides"], strict=True))
    size = math.prod(p["window_dimensions"]) if node.name == "reduce_window_sum" else 1
    return [_lip(w, node, 0) * math.sqrt(overlap * size)]


def _rule_scalar(w, i, node, live):
    """A smooth scalar function with a known bound on its derivative."""
    return [_lip(w, node, 0) * _SCALAR_LIPSCHITZ[node.name]]


def _rule_integer_pow(w, i, node, live):
    if node.params.get("y") == 1:
        return [_lip(w, node, 0)]
    return _rule_nonlinear(w, i, node, live)


def _products(node: Node) -> _Unsupported:
    return _Unsupported(node, "multiplies two values that both depend on the perturbation "
                        "(attention scores, gating or a normalization by the value's own "
                        "statistics have no global Lipschitz constant)")


def _rule_mul(w, i, node, live):
    """A scale by an unperturbed value: its largest magnitude (BatchNorm's scale)."""
    if len(live) == 2:
        raise _products(node)
    return [_lip(w, node, live[0]) * _factor(w, i, node, 1 - live[0], "max")]


def _rule_div(w, i, node, live):
    """Division by an unperturbed value: 1 / its smallest magnitude."""
    if 1 in live:
        raise _Unsupported(node, "divides by a value that depends on the perturbation "
                           "(e.g. LayerNorm), which has no global Lipschitz constant")
    return [_lip(w, node, 0) * _factor(w, i, node, 1, "inv")]


def _rule_dot(w, i, node, live):
    """A dense map: the certified spectral norm of the unperturbed operand."""
    if len(live) == 2:
        raise _products(node)
    j = live[0]
    a = node.inputs[j]
    assert isinstance(a, int)  # a perturbed operand is a var
    (cl, cr), (bl, br) = node.params["dimension_numbers"]
    contract, batch = (cl, bl) if j == 0 else (cr, br)
    shape = w.graph.shape(a)
    # The perturbed weight itself, contracted over its fan-in: ‖A Δ‖ ≤ ‖A‖_F ‖Δ‖₂.
    if w.matrix.get(a) and not batch and tuple(contract) == tuple(range(len(shape) - 1)):
        return [w.L[a] * _factor(w, i, node, 1 - j, "frobenius")]
    return [_lip(w, node, j) * _factor(w, i, node, 1 - j, "op")]


def _rule_conv(w, i, node, live):
    """A convolution: its certified operator norm; a perturbed kernel meets every input
    entry at most once per tap, so ‖conv(h, Δ)‖ ≤ √taps ‖h‖ ‖Δ‖₂."""
    if len(live) == 2:
        raise _products(node)
    if live == [0]:
        return [_lip(w, node, 0) * _factor(w, i, node, 1, "op")]
    taps = _conv_taps(node, w.graph.shape(node.inputs[1]))
    k = node.inputs[1]
    assert isinstance(k, int)  # a perturbed operand is a var
    return [w.L[k] * math.sqrt(taps) * _factor(w, i, node, 0, "frobenius")]


def _rule_step(w, i, node, live):
    raise _Unsupported(node, "a comparison of the perturbed value (a step function has no "
                       "Lipschitz constant)")


def _rule_nonlinear(w, i, node, live):
    raise _Unsupported(node, "is not globally Lipschitz in the perturbed value")


RULES: dict[str, Rule] = {
    **{name: _rule_pass for name in _PASS},
    **{name: _rule_sum for name in ("add", "sub", "add_any", "max", "min")},
    "concatenate": _rule_stack,
    "select_n": _rule_stack,
    "broadcast_in_dim": _rule_broadcast,
    "reduce_sum": _rule_reduce_sum,
    **{name: _rule_window for name in
       ("reduce_window_sum", "reduce_window_max", "reduce_window_min")},
    **{name: _rule_scalar for name in _SCALAR_LIPSCHITZ},
    "integer_pow": _rule_integer_pow,
    "mul": _rule_mul,
    "div": _rule_div,
    "dot_general": _rule_dot,
    "conv_general_dilated": _rule_conv,
    **{name: _rule_step for name in
       ("ge", "gt", "le", "lt", "eq", "ne", "sign", "and", "or", "not", "is_finite")},
}
"""Lipschitz rules by primitive name. Other elementwise primitives are accepted only as
part of a recognized activation; any other primitive on the path is refused."""


def _rule(w: _Walk, i: int, node: Node) -> list[Any]:
    live = [j for j, a in enumerate(node.inputs) if isinstance(a, int) and a in w.L]
    rule = RULES.get(node.name)
    if rule is not None:
        return rule(w, i, node, live)
    if node.name in _ELEMENTWISE:
        return _rule_nonlinear(w, i, node, live)
    raise _Unsupported(node, "has no Lipschitz rule (supported: dense, convolution, "
                       "elementwise activations, additions, pooling, reshapes, reductions, "
                       "inference-mode normalization)")


def _resolve(w: _Walk, v: int) -> Any:
    """The constant of ``v`` once a non-elementwise operation consumes it.

    A var computed from its root by elementwise operations with scalar constants is a
    scalar function of the root: a recognized activation gets its certified constant;
    otherwise the operations' own rules compose.
    """
    if v in w.L and not isinstance(w.L[v], _Deferred):
        return w.L[v]
    root = _root(w.graph, v)
    fp = _fingerprint(w.graph, v) if root != v else None
    if fp is not None and root in w.L:
        w.L[v] = _resolve(w, root) * fp[1]
        return w.L[v]
    i = w.graph.producer[v]
    node = w.graph.nodes[i]
    for a in node.inputs:
        if isinstance(a, int) and isinstance(w.L.get(a), _Deferred):
            w.L[a] = _resolve(w, a)
    outs = _rule(w, i, node)
    for o, val in zip(node.outputs, outs, strict=True):
        w.L[o] = val
    return w.L[v]


class _Deferred:
    pass


_DEFERRED = _Deferred()


def _propagate(graph: Graph, site: str, norms, data, *, matrix: bool) -> _Walk:
    seed = graph.seed(site)
    w = _Walk(graph, norms, data, {seed: 1.0}, {seed: matrix}, set())
    for i, node in enumerate(graph.nodes):
        if not any(isinstance(a, int) and a in w.L for a in node.inputs):
            continue
        if len(node.outputs) == 1 and node.name in _ELEMENTWISE:
            o = node.outputs[0]
            if _root(graph, o) != o and jnp.issubdtype(graph.avals[o][1], jnp.floating):
                w.L[o] = _DEFERRED  # part of an elementwise function of its root
                continue
            if not jnp.issubdtype(graph.avals[o][1], jnp.floating):
                w.L[o] = _DEFERRED
                continue
        for a in node.inputs:
            if isinstance(a, int) and isinstance(w.L.get(a), _Deferred):
                w.L[a] = _resolve(w, a)
        outs = _rule(w, i, node)
        for o, val in zip(node.outputs, outs, strict=True):
            w.L[o] = val
    for o in graph.outputs:
        if o in w.L and isinstance(w.L[o], _Deferred):
            w.L[o] = _resolve(w, o)
    return w


def _is_matrix_weight(graph: Graph, site: str) -> bool:
    return site in graph.weight_vars and len(graph.shape(graph.weight_vars[site])) >= 2


def site_lipschitz(graph: Graph, site: str, norms: jax.Array,
                   data: Mapping[int, jax.Array] | None = None) -> Any:
    """Certified Lipschitz constant of the output with respect to the value at ``site``.

    ‖F(v + δ) − F(v)‖ ≤ L ‖δ‖ for every δ, where v is the site's value (the input, an
    activation, or a parameter) and the output is flattened. For a matrix-shaped weight
    ‖δ‖ is the operator norm of δ seen as a ``(fan_in, out)`` matrix; otherwise the
    Euclidean norm. Through a linear map of a perturbed weight the constant involves the
    (unperturbed) layer input, so it is per example there.

    Args:
      graph: from :func:`read`.
      site: ``"input"``, an activation site or a weight site.
      norms: :func:`operator_norms` of the parameters.
      data: values (batched, ``(B, 1, ...)`` per var) of the vars :func:`bound_blocker`
        reported as needed; ``None`` when it reported none.

    Returns:
      The constant: a scalar, or ``(B,)`` when it depends on the example.

    Raises:
      GraphError: an operation between the site and the output has no Lipschitz rule.
    """
    try:
        w = _propagate(graph, site, norms, data, matrix=_is_matrix_weight(graph, site))
    except _Unsupported as err:
        raise GraphError(_message(graph, site, err)) from None
    total = sum(_to_frobenius(w, o) ** 2 for o in graph.outputs if o in w.L)
    return jnp.sqrt(jnp.asarray(total)) if graph.outputs else 0.0


def data_vars(graph: Graph, site: str) -> tuple[int, ...]:
    """Vars whose per-example values :func:`site_lipschitz` needs at ``site`` (sorted)."""
    memo = graph.memo.setdefault("data_vars", {})
    if site not in memo:
        w = _propagate(graph, site, None, None, matrix=_is_matrix_weight(graph, site))
        memo[site] = tuple(sorted(w.need))
    return memo[site]


def bound_blocker(graph: Graph, site: str) -> str | None:
    """Why no certified bound exists at ``site``, in one line; ``None`` if one does.

    Args:
      graph: from :func:`read`.
      site: a site of the model.

    Returns:
      ``None``, or a message naming the operation, the model line that made it, what to
      do, and every site it blocks.
    """
    memo = graph.memo.setdefault("blocker", {})
    if site not in memo:
        try:
            data_vars(graph, site)
            memo[site] = None
        except _Unsupported as err:
            memo[site] = _message(graph, site, err)
    return memo[site]


def _blocked_by(graph: Graph, node: Node) -> list[str]:
    sites = [INPUT, *graph.structure.activation_sites, *graph.structure.weight_sites]
    out = []
    for s in sites:
        try:
            _propagate(graph, s, None, None, matrix=_is_matrix_weight(graph, s))
        except _Unsupported as err:
            if err.node is node:
                out.append(s)
    return out


def _message(graph: Graph, site: str, err: _Unsupported) -> str:
    blocked = _blocked_by(graph, err.node)
    shown = ", ".join(repr(s) for s in blocked[:6]) + (" ..." if len(blocked) > 6 else "")
    return (f"no certified bound at site {site!r}: {err.node.name!r} at {err.node.where} "
            f"{err.reason}; it blocks the bound at sites [{shown}] — use the sampled or "
            "linearized estimators there")


# --------------------------------------------------------------------------- moments
def _relu_pre(graph: Graph, v: int) -> int | None:
    """z if ``v = max(z, 0)`` (a ReLU), else ``None``."""
    i = graph.producer.get(v)
    if i is None:
        return None
    node = graph.nodes[i]
    if node.name != "max" or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if _scalar_value(graph, b) == 0.0 and isinstance(a, int):
        return a
    if _scalar_value(graph, a) == 0.0 and isinstance(b, int):
        return b
    return None


def relu_sites(graph: Graph) -> dict[str, int]:
    """Activation sites whose clean value is ``relu(z)``, with the var of ``z``.

    Args:
      graph: from :func:`read`.

    Returns:
      ``{site: var of its pre-activation}``, in forward order.
    """
    out = {}
    for name in graph.structure.activation_sites:
        if name in graph.site_vars:
            z = _relu_pre(graph, graph.site_vars[name][0])
            if z is not None and INPUT in graph.depends[z]:
                out[name] = z
    return out


def bypasses(graph: Graph, site: str) -> bool:
    """Whether the output depends on the input through a path that avoids ``site``.

    Args:
      graph: from :func:`read`.
      site: an activation site.

    Returns:
      ``True`` when a residual connection (or any other path) goes around the site.
    """
    cut = graph.site_vars[site][1]
    reach = {graph.x_var}
    for node in graph.nodes:
        if any(isinstance(a, int) and a in reach and a != cut for a in node.inputs):
            reach.update(o for o in node.outputs if o != cut)
    return any(o in reach for o in graph.outputs)


@dataclasses.dataclass(frozen=True)
class MomentStep:
    """One step of the layerwise moments: a node with one input-dependent operand.

    Attributes:
      node: the node.
      kind: ``"relu"`` or ``"affine"``.
      live: the index of its input-dependent operand.
    """

    node: Node
    kind: str
    live: int


_AFFINE = frozenset("""
reshape squeeze expand_dims transpose convert_element_type copy copy_p rev slice pad
broadcast_in_dim reduce_sum reduce_window_sum neg add sub mul div dot_general
conv_general_dilated concatenate
""".split())


def moment_steps(graph: Graph) -> tuple[MomentStep, ...]:
    """The chain the layerwise moments walk: affine steps and ReLUs, in order.

    Args:
      graph: from :func:`read`.

    Returns:
      One :class:`MomentStep` per node that depends on the input.

    Raises:
      GraphError: a node has two input-dependent operands (a residual addition, whose
        branches are correlated), or is neither affine in its input nor a ReLU.
    """
    memo = graph.memo
    if "moment_steps" in memo:
        return memo["moment_steps"]
    steps = []
    for node in graph.nodes:
        live = [j for j, a in enumerate(node.inputs)
                if isinstance(a, int) and INPUT in graph.depends[a]]
        if not live:
            continue
        if len(live) > 1:
            raise GraphError(
                f"layerwise moments: {node.name!r} at {node.where} combines two values that "
                "depend on the input (a residual connection: its branches are correlated); "
                "use method='two_stage'")
        out = node.outputs[0]
        if _relu_pre(graph, out) is not None:
            steps.append(MomentStep(node, "relu", live[0]))
            continue
        if node.name not in _AFFINE or (node.name == "div" and live[0] == 1):
            raise GraphError(
                f"layerwise moments: {node.name!r} at {node.where} is neither affine nor a "
                "ReLU; layerwise propagation covers dense, convolution, ReLU, average pooling, "
                "inference-mode normalization and reshapes — use method='two_stage'")
        steps.append(MomentStep(node, "affine", live[0]))
    memo["moment_steps"] = tuple(steps)
    return memo["moment_steps"]


# --------------------------------------------------------------------------- dense chains
@dataclasses.dataclass(frozen=True)
class DenseStep:
    """One dense layer of a chain ``h_k = σ_k(h_{k−1} K_k + b_k)``.

    Attributes:
      kernel: the var of the ``(n_in, n_out)`` kernel (constant).
      site: the weight site of the kernel, if it is a parameter as is.
      bias: the var (or constant) added after the product, broadcast to ``(1, n_out)``,
        or ``None``.
      activation: ``(name, Lipschitz constant, |σ(0)|)`` of the elementwise function
        applied after the layer, ``None`` for the last layer (or a linear layer).
      node: the index of the ``dot_general`` node.
    """

    kernel: int
    site: str | None
    bias: int | Lit | None
    activation: tuple[str, float, float] | None
    node: int


_ALIAS = frozenset("reshape squeeze expand_dims convert_element_type copy copy_p".split())


def _chain_error(node: Node, what: str) -> GraphError:
    return GraphError(f"the weight-margin bound reads chains of dense layers and elementwise "
                      f"activations; {node.name!r} at {node.where} {what}")


def dense_chain(graph: Graph) -> tuple[DenseStep, ...]:
    """The model read as ``f = W_d σ(… σ(W_1 x + b_1) …) + b_d``, if it is one.

    Reshapes of the hidden values, the (zero) deltas of activation sites and activations
    written as several primitives are looked through.

    Args:
      graph: from :func:`read`.

    Returns:
      The dense layers in forward order.

    Raises:
      GraphError: another operation depends on the input (a convolution, a residual
        addition, a normalization ...), in one line naming it.
    """
    memo = graph.memo
    if "dense_chain" in memo:
        return memo["dense_chain"]
    alias: dict[int, int] = {}

    def resolve(a: int | Lit) -> int:
        assert isinstance(a, int)  # operands that depend on the input are vars
        while a in alias:
            a = alias[a]
        return a

    delta_ids = set(graph.delta_vars.values())
    steps: list[DenseStep] = []
    pre: int | None = None  # the current layer's output (after its bias)
    bias: int | Lit | None = None
    for idx, node in enumerate(graph.nodes):
        live = [j for j, a in enumerate(node.inputs)
                if isinstance(a, int) and INPUT in graph.depends[a]]
        if not live:
            continue
        out = node.outputs[0]
        if node.name in _ALIAS:
            alias[out] = resolve(node.inputs[0])
            continue
        others = [a for j, a in enumerate(node.inputs) if j not in live]
        if node.name == "add" and len(live) == 1 and all(
                isinstance(a, int) and a in delta_ids for a in others):
            alias[out] = resolve(node.inputs[live[0]])
            continue
        if node.name == "dot_general":
            (cl, cr), (bl, br) = node.params["dimension_numbers"]
            k = node.inputs[1]
            if (live != [0] or bl or br or tuple(cl) != (1,) or tuple(cr) != (0,)
                    or not isinstance(k, int) or not graph.is_const(k)
                    or len(graph.shape(k)) != 2 or len(graph.shape(node.inputs[0])) != 2):
                raise _chain_error(node, "is not a dense layer x @ W with a constant W")
            h = resolve(node.inputs[0])
            if steps:
                steps[-1] = dataclasses.replace(steps[-1], bias=bias,
                                                activation=_activation_of(graph, h, pre))
            elif h != graph.x_var:
                raise _chain_error(node, "is not fed by the input")
            site = next((n for n, v in graph.weight_vars.items() if v == _const_root(graph, k)),
                        None)
            steps.append(DenseStep(k, site, None, None, idx))
            pre, bias = out, None
            continue
        if node.name == "add" and pre is not None and len(live) == 1 and bias is None \
                and resolve(node.inputs[live[0]]) == pre:
            b = node.inputs[1 - live[0]]
            if isinstance(b, int) and not graph.is_const(b):
                raise _chain_error(node, "adds a value that is not a constant bias")
            bias, pre = b, out
            continue
        if node.name in _ELEMENTWISE and len(node.outputs) == 1 and pre is not None:
            continue  # part of an activation; checked where the next layer reads it
        raise _chain_error(node, "is neither a dense layer, a bias nor an elementwise "
                           "activation")
    if not steps:
        raise GraphError("the weight-margin bound needs at least one dense layer")
    outs = [resolve(o) for o in graph.outputs]
    if outs != [pre]:
        raise GraphError("the weight-margin bound needs the logits to be the last dense "
                         "layer's output (no activation or softmax after it)")
    steps[-1] = dataclasses.replace(steps[-1], bias=bias)
    memo["dense_chain"] = tuple(steps)
    return memo["dense_chain"]


def _const_root(graph: Graph, v: int) -> int:
    """``v`` with conversions and reshapes of a constant looked through."""
    while v in graph.producer:
        node = graph.nodes[graph.producer[v]]
        if node.name in _ALIAS and isinstance(node.inputs[0], int):
            v = node.inputs[0]
        else:
            break
    return v


def _activation_of(graph: Graph, h: int, pre: int | None) -> tuple[str, float, float]:
    """(name, Lipschitz constant, |σ(0)|) of the elementwise map from ``pre`` to ``h``."""
    if h == pre:
        return ("identity", 1.0, 0.0)
    node = graph.nodes[graph.producer[h]]
    if _relu_pre(graph, h) == pre:
        return ("relu", 1.0, 0.0)
    if _root(graph, h) == pre:
        if node.name in _SCALAR_LIPSCHITZ and node.inputs[0] == pre:
            s0 = {"tanh": 0.0, "logistic": 0.5, "sin": 0.0, "cos": 1.0, "atan": 0.0,
                  "erf": 0.0, "erfc": 1.0}[node.name]
            return (node.name, _SCALAR_LIPSCHITZ[node.name], s0)
        fp = _fingerprint(graph, h)
        if fp is not None:
            f = ACTIVATIONS[fp[0]][0]
            with jax.ensure_compile_time_eval():
                s0 = abs(float(f(jnp.zeros((), jnp.float32))))
            return (fp[0], fp[1], s0)
    raise _chain_error(node, "is not a recognized elementwise activation of the layer "
                       "before (see jaxsens.graph.ACTIVATIONS)")
