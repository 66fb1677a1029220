"""The estimator protocol and the one registry of estimators."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax

from .. import noise as noise_lib
from ..sites import Structure
from ._attack import attack, attack_table
from ._bound import bound, bound_table
from ._deviation import Deviation
from ._linearized import linearized, linearized_table
from ._moments import moments, moments_table
from ._sampled import sampled, sampled_table

__all__ = ["Estimator", "EstimatorSpec", "TableArgs", "TableOptions", "REGISTRY", "ESTIMATORS",
           "DEFAULT_ESTIMATORS"]


class Estimator(Protocol):
    """The call shape every estimator has.

    ``estimator(model, x, *, site, noise, key=None, **options) -> Deviation``: ``model``
    a Flax NNX module or a :class:`~jaxsens.sites.PureModel`, ``x`` a batch of inputs,
    ``site`` where the noise enters, ``noise`` its law, ``key`` the PRNG key (accepted
    and ignored by deterministic estimators). One compiled call per invocation.
    """

    def __call__(self, model: Any, x: jax.Array, *, site: str, noise: noise_lib.NoiseLaw,
                 key: jax.Array | None = None, **options: Any) -> Deviation: ...


class TableArgs(NamedTuple):
    """The traced inputs of a profile table (inside one compiled call)."""

    struct: Structure
    params: Any
    rest: Any
    x: jax.Array
    laws: tuple
    levels: jax.Array
    key: jax.Array
    labels: jax.Array | None
    lips: jax.Array | None


class TableOptions(NamedTuple):
    """The static options of a profile table (hashable)."""

    sites: tuple[str, ...]
    qlevels: tuple[float, ...]
    num_samples: int
    sample_chunk: int
    crn: bool
    example_chunk: int
    method: str
    split_at: str | None


Table = Callable[[TableArgs, TableOptions], tuple[Deviation, tuple[bool, ...]]]


@dataclasses.dataclass(frozen=True)
class EstimatorSpec:
    """A registry entry.

    Attributes:
      name: the estimator's name (in configs, profiles and results).
      call: the public function, of the :class:`Estimator` call shape (its own options
        are keyword arguments beyond the protocol's, so it is typed as a callable).
      table: every site × level at once, traceable: a Deviation with leading axes
        (site, level) and, per site, whether the estimator applies there.
      random: whether it draws noise (needs a key).
      summary: one line for listings.
    """

    name: str
    call: Callable[..., Deviation]
    table: Table
    random: bool
    summary: str


def _sampled(a: TableArgs, o: TableOptions):
    return sampled_table(a.struct, a.params, a.rest, a.x, a.laws, a.levels, a.key, a.labels,
                         sites=o.sites, num_samples=o.num_samples, chunk=o.sample_chunk,
                         crn=o.crn, qlevels=o.qlevels)


def _linearized(a: TableArgs, o: TableOptions):
    return linearized_table(a.struct, a.params, a.rest, a.x, a.laws, a.levels, sites=o.sites,
                            chunk=o.example_chunk, qlevels=o.qlevels)


def _bound(a: TableArgs, o: TableOptions):
    return bound_table(a.struct, a.params, a.rest, a.x, a.laws, a.levels, a.lips,
                       sites=o.sites, qlevels=o.qlevels)


def _attack(a: TableArgs, o: TableOptions):
    return attack_table(a.struct, a.params, a.rest, a.x, a.laws, a.levels, a.key,
                        sites=o.sites, qlevels=o.qlevels)


def _moments(a: TableArgs, o: TableOptions):
    return moments_table(a.struct, a.params, a.rest, a.x, a.laws, a.levels, sites=o.sites,
                         method=o.method, split_at=o.split_at, qlevels=o.qlevels)


REGISTRY: dict[str, EstimatorSpec] = {
    spec.name: spec for spec in (
        EstimatorSpec("sampled", sampled, _sampled, True,
                      "Monte Carlo: draws through the network, chunked and scanned"),
        EstimatorSpec("linearized", linearized, _linearized, False,
                      "exact first-order propagation: J C Jᵀ, E‖Jη‖ from one reverse sweep"),
        EstimatorSpec("bound", bound, _bound, False,
                      "certified Lipschitz bound on ‖ΔF‖, read from the model's graph"),
        EstimatorSpec("moments", moments, _moments, False,
                      "analytic moments under Gaussian input noise (Bibi et al. 2018)"),
        EstimatorSpec("attack", attack, _attack, False,
                      "projected gradient ascent on ‖ΔF‖ in the law's ball: the worst case "
                      "from below"),
    )
}
"""Every estimator by name; :func:`jaxsens.profile` loops over it."""

ESTIMATORS: tuple[str, ...] = tuple(REGISTRY)
"""The registered estimator names, in profile order."""

DEFAULT_ESTIMATORS: tuple[str, ...] = ("sampled", "linearized", "bound", "moments")
"""What :func:`jaxsens.profile` runs unless told otherwise (the attack, an optimization
per example, is asked for by name)."""
