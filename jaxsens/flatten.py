"""A Flax NNX module's pytree leaves and definition, without re-flattening an unchanged one.

``jax.tree_util.tree_flatten(module)`` runs Flax's Python flatten on every node: about
1.3 µs a node, 35 µs for a three-layer MLP, and twice that on a busy CPU right after a
computation. For the estimators' sub-millisecond kernels that is most of the gap between
a public call and its compiled kernel. :func:`flatten` gives the same answer and caches
it per live module, together with a snapshot of everything Flax's flatten reads:

* every pytree node's attribute names and the identity of every attribute value (which
  covers its data/static annotations: Flax keeps them in an immutable mapping that it
  replaces on change);
* every ``Variable``'s raw value (by identity, through a weak reference, so that an old
  array is not kept alive) and its metadata (by value);
* the flags of every ``PytreeState``;
* by value, unhashable static attribute values of the built-in container types (list,
  dict, set, and tuples holding them).

A call on a module whose snapshot still matches returns the cached definition and the
current raw values (identical to the cached leaves) in a few microseconds; any change
(new parameter values, an attribute set, added or removed, ``eval()``, a list append)
makes it flatten again. A module the snapshot cannot describe (a data attribute that is
neither a module, a variable nor an array, a variable holding a pytree, an unhashable
static value of another type, a module reached twice, leaves that are tracers) is
flattened every time.

Not seen: changes made behind Flax's back with ``object.__setattr__`` (replacing a
node's ``__class__`` or ``__dict__``). A static attribute that refers back to the module
(a bound method, a closure over ``self``) keeps it alive while its entry is cached, as
the cached tree definition holds it; the cache keeps at most 64 modules.
"""

from __future__ import annotations

import copy
import functools
import operator
import threading
import weakref
from itertools import chain
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.nnx import pytreelib

__all__ = ["flatten", "clear"]

_MUTABLE_STATICS = (list, dict, set)
_MAX_ENTRIES = 64
_is = operator.is_


class _Uncacheable(Exception):
    """The snapshot cannot describe this module; flatten it every time."""


class _Entry:
    """A module's cached flatten and the snapshot that validates it (checked with C-level
    ``map`` loops: a few microseconds for a small network)."""

    __slots__ = ("model", "treedef", "dicts", "lengths", "names", "values", "states",
                 "flags", "statics", "variables", "types", "refs", "metas", "order", "getters")

    def __init__(self, model, treedef, dicts, states, statics, variables, getters, order):
        self.model = model  # weak reference to the module
        self.treedef = treedef
        self.dicts = dicts  # every pytree node's attribute dict
        self.lengths = tuple(map(len, dicts))
        self.names = tuple(chain.from_iterable(dicts))
        self.values = tuple(chain.from_iterable(map(dict.values, dicts)))
        self.states = states  # every PytreeState, and its flags
        self.flags = tuple(map(_state_flags, states))
        self.statics = statics  # (value, copy) for unhashable static containers
        self.variables = variables
        self.types = tuple(map(type, variables))
        self.refs = tuple(weakref.ref(_raw_value(v)) for v in variables)
        # Shallow copies: the tree definition holds these same value objects, so comparing
        # them by value here is what comparing tree definitions does.
        self.metas = [dict(v._var_metadata) for v in variables]
        self.order = order  # leaf i is the raw value of variables[order[i]] ...
        self.getters = getters  # ... or, when order is None, getters[i]()

    def leaves(self) -> list | None:
        """The module's current leaves if nothing it flattens from has changed."""
        dicts = self.dicts
        values = tuple(chain.from_iterable(map(dict.values, dicts)))
        if (len(values) != len(self.values) or not all(map(_is, values, self.values))
                or tuple(map(len, dicts)) != self.lengths
                or tuple(chain.from_iterable(dicts)) != self.names):
            return None
        if tuple(map(_state_flags, self.states)) != self.flags:
            return None
        variables = self.variables
        raws = list(map(_raw_value, variables))
        if (not all(map(_is, raws, map(operator.call, self.refs)))
                or tuple(map(type, variables)) != self.types):
            return None
        try:
            if list(map(_metadata, variables)) != self.metas or any(
                    value != copy for value, copy in self.statics):
                return None
        except Exception:  # values without a truth value (arrays): treat as changed
            return None
        if self.order is not None:
            return list(map(raws.__getitem__, self.order))
        return [get() for get in self.getters]


_raw_value = operator.attrgetter("_raw_value")  # what Flax's flatten reads
_metadata = operator.attrgetter("_var_metadata")
_state_flags = operator.attrgetter("initializing", "is_setup")


_LOCK = threading.Lock()
_ENTRIES: dict[int, _Entry] = {}


def clear() -> None:
    """Forget every cached flatten (the next call on each module flattens it again)."""
    with _LOCK:
        _ENTRIES.clear()


def flatten(module: Any) -> tuple[list, Any]:
    """``jax.tree_util.tree_flatten(module)``, cached per live, unchanged module.

    Args:
      module: a Flax NNX module (any pytree is accepted; only modules are cached).

    Returns:
      ``(leaves, treedef)``, equal to ``jax.tree_util.tree_flatten(module)``.
    """
    entry = _ENTRIES.get(id(module))
    if entry is not None and entry.model() is module:
        leaves = entry.leaves()
        if leaves is not None:
            return leaves, entry.treedef
    leaves, treedef = jax.tree_util.tree_flatten(module)
    if not isinstance(module, nnx.Pytree) or any(isinstance(x, jax.core.Tracer)
                                                 for x in leaves):
        if entry is not None:
            with _LOCK:
                _ENTRIES.pop(id(module), None)
    else:
        try:
            new = _snapshot(module, leaves, treedef)
        except Exception:  # noqa: BLE001 - a cache must never break the call: no entry
            new = None
        with _LOCK:
            if new is None:
                _ENTRIES.pop(id(module), None)
            else:
                if len(_ENTRIES) >= _MAX_ENTRIES:
                    _ENTRIES.clear()
                _ENTRIES[id(module)] = new
    return leaves, treedef


def _forget(key: int, ref, entries=_ENTRIES, lock=_LOCK) -> None:
    # The globals are bound as defaults: this runs from weak-reference callbacks, also
    # while the interpreter tears the module down.
    with lock:
        entry = entries.get(key)
        if entry is not None and entry.model is ref:
            del entries[key]


def _snapshot(module, leaves: list, treedef) -> _Entry:
    dicts: list = []
    states: list = []
    statics: list = []
    variables: list = []
    sources: dict[int, Any] = {}
    seen: set[int] = set()

    def static(value) -> None:
        try:
            hash(value)  # hashable: immutable by Python's contract, compared by identity
            return
        except Exception:  # noqa: BLE001 - unhashable, or a __hash__ that fails otherwise
            pass
        if not isinstance(value, (*_MUTABLE_STATICS, tuple)):
            raise _Uncacheable
        statics.append((value, copy.deepcopy(value)))  # keeps subclasses; handles cycles

    def data(value, d, name) -> None:
        if isinstance(value, nnx.Variable):
            raw = value.get_raw_value()
            if not isinstance(raw, (jax.Array, np.ndarray)):
                raise _Uncacheable
            sources.setdefault(id(raw), (len(variables), value.get_raw_value))
            variables.append(value)
        elif isinstance(value, pytreelib.PytreeState):
            states.append(value)
        elif isinstance(value, nnx.Pytree):
            node(value)
        elif isinstance(value, (jax.Array, np.ndarray)):
            sources.setdefault(id(value), (None, functools.partial(operator.getitem, d, name)))
        elif value is not None:
            raise _Uncacheable

    def node(obj) -> None:
        if id(obj) in seen:
            raise _Uncacheable  # shared or cyclic: flatten it every time
        seen.add(id(obj))
        if not type(obj)._pytree__is_pytree:
            raise _Uncacheable
        d = vars(obj)
        marks = obj._pytree__nodes
        dicts.append(d)  # not obj: the root stays collectable
        for name, value in d.items():
            if marks.get(str(name), False):
                data(value, d, name)
            else:
                static(value)

    node(module)
    picked = []
    for leaf in leaves:
        src = sources.get(id(leaf))
        if src is None:
            raise _Uncacheable
        picked.append(src)
    order = None if any(i is None for i, _ in picked) else tuple(i for i, _ in picked)
    ref = weakref.ref(module, functools.partial(_forget, id(module)))
    return _Entry(ref, treedef, tuple(dicts), tuple(states), tuple(statics),
                  tuple(variables), tuple(get for _, get in picked), order)
