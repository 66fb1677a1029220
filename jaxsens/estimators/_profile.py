"""``profile``: every site × noise level × estimator, one compiled call per estimator."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jaxtyping import Array, Float, Int

from .. import noise as noise_lib
from ..moments import METHODS, check_method
from ..sites import INPUT, PureModel
from ._attack import check_attack_law
from ._bound import bound_applies, check_site, lipschitz_constants
from ._common import (
    Shards,
    as_input,
    check_key,
    check_labels,
    check_law,
    check_positive_int,
    deviation_specs,
    input_dtype,
    prepare,
    quantile_levels,
    sharded,
)
from ._common import plan as plan_shards
from ._deviation import DEFAULT_QUANTILES, Deviation
from ._linearized import example_chunk
from ._moments import check_moments
from ._registry import DEFAULT_ESTIMATORS, ESTIMATORS, REGISTRY, TableArgs, TableOptions
from ._sampled import check_options

__all__ = ["Profile", "profile"]


@dataclasses.dataclass(frozen=True)
class Profile:
    """A typed table: output deviations with site, level and estimator axes.

    ``deviation`` is a :class:`Deviation` whose every leaf has the leading axes
    ``(site, level, estimator)`` followed by the per-example shape (``mean``:
    ``(S, L, E, B)``, ``delta_cov``: ``(S, L, E, B, k, k)`` ...). Entries an estimator
    does not produce are NaN, as in every Deviation; ``present[s][e]`` says whether
    estimator ``e`` applies at site ``s`` at all (the bound needs a Lipschitz rule for
    every operation after the site, the moments apply to Gaussian input noise only) and
    ``reasons[s][e]`` why not.
    :meth:`to_records` turns it into flat records (batch averages) for reports, and
    :meth:`skipped` lists what could not run.

    Attributes:
      deviation: the stacked results.
      present: ``present[s][e]``, per site and estimator.
      reasons: ``reasons[s][e]``: why estimator ``e`` could not run at site ``s`` ("" if
        it ran).
      sites: site names (axis 0).
      kinds: ``"input"``, ``"activation"`` or ``"weight"`` per site.
      levels: noise levels (axis 1).
      estimators: estimator names (axis 2).
      laws: ``laws[s][l]``, the description of the law at site s and level l.
      num_samples: Monte Carlo draws per example (sampled).
    """

    deviation: Deviation
    present: tuple[tuple[bool, ...], ...]
    reasons: tuple[tuple[str, ...], ...]
    sites: tuple[str, ...]
    kinds: tuple[str, ...]
    levels: tuple[float, ...]
    estimators: tuple[str, ...]
    laws: tuple[tuple[str, ...], ...]
    num_samples: int

    @property
    def num_examples(self) -> int:
        return int(self.deviation.mean.shape[3])

    def select(self, *, site: str, level: float, estimator: str) -> Deviation:
        """The :class:`Deviation` of one (site, level, estimator), labelled."""
        for name, values in (("site", self.sites), ("level", self.levels),
                             ("estimator", self.estimators)):
            value = {"site": site, "level": level, "estimator": estimator}[name]
            if value not in values:
                raise ValueError(f"{name}={value!r} is not in this profile; allowed: "
                                 f"{list(values)}")
        s, lv, e = self.sites.index(site), self.levels.index(level), \
            self.estimators.index(estimator)
        dev = jax.tree.map(lambda a: a[s, lv, e], self.deviation)
        return dev.labelled(estimator=estimator, site=site, law=self.laws[s][lv])

    def skipped(self) -> list[dict]:
        """What could not run: ``[{site, kind, estimator, reason}, ...]``.

        Returns:
          One entry per (site, estimator) the estimator does not apply to.
        """
        return [{"site": site, "kind": kind, "estimator": est, "reason": self.reasons[s][e]}
                for s, (site, kind) in enumerate(zip(self.sites, self.kinds, strict=True))
                for e, est in enumerate(self.estimators) if not self.present[s][e]]

    def to_records(self) -> list[dict]:
        """Flat records, one per (site, level, estimator) present: batch averages.

        Keys: ``site, kind, level, estimator, law, num_examples, num_samples, mean, rms,
        stderr, flip_rate, loss_change, accuracy, upper, lower, factor`` and ``qNN`` quantile
        columns (rms: root mean square over the batch; stderr: of the batch mean; NaN
        where an estimator does not produce a field).
        """
        d = jax.tree.map(lambda a: np.asarray(a, np.float64), self.deviation)  # one transfer
        batch = self.num_examples
        order = sorted(range(len(self.sites)),
                       key=lambda i: (self.sites[i] != INPUT, i))
        records = []
        with np.errstate(invalid="ignore"):
            for s in order:
                for lv in sorted(range(len(self.levels)), key=lambda i: self.levels[i]):
                    level = self.levels[lv]
                    for e in sorted(range(len(self.estimators)),
                                    key=lambda e: ESTIMATORS.index(self.estimators[e])):
                        if not self.present[s][e]:
                            continue
                        name = self.estimators[e]
                        row = {
                            "site": self.sites[s], "kind": self.kinds[s], "level": level,
                            "estimator": name, "law": self.laws[s][lv],
                            "num_examples": batch,
                            "num_samples": self.num_samples if name == "sampled" else 0,
                        }

                        def get(f, s=s, lv=lv, e=e):
                            return getattr(d, f)[s, lv, e]

                        row["mean"] = float(np.mean(get("mean")))
                        row["rms"] = float(np.sqrt(np.mean(np.square(get("rms")))))
                        row["stderr"] = float(np.sqrt(np.sum(np.square(get("stderr"))))
                                              / batch)
                        for f in ("flip_rate", "loss_change", "accuracy", "upper",
                                  "lower", "factor"):
                            row[f] = float(np.mean(get(f)))
                        if name == "sampled":
                            qs = np.mean(get("quantiles"), axis=0)
                            for q, value in zip(get("quantile_levels")[0:len(qs)], qs,
                                                strict=True):
                                row[f"q{round(100 * q):02d}"] = float(value)
                        records.append(row)
        return records


def _flatten(p: Profile):
    meta = (p.present, p.reasons, p.sites, p.kinds, p.levels, p.estimators, p.laws,
            p.num_samples)
    return (p.deviation,), meta


def _unflatten(meta, children) -> Profile:
    return Profile(children[0], *meta)


jax.tree_util.register_pytree_node(Profile, _flatten, _unflatten)


@functools.partial(jax.jit, static_argnames=("adapter", "estimator", "options", "shards"))
def _table_kernel(adapter, arrays, x, laws, levels, key, labels, lips, *, estimator,
                  options, shards=None):
    def local(arrays, x, laws, levels, key, labels, lips):
        params, rest = adapter.unpack(arrays)
        struct = adapter.structure
        args = TableArgs(struct, params, rest, as_input(struct, x), laws, levels, key,
                         labels, lips)
        dev, _ = REGISTRY[estimator].table(args, options)
        return dev

    # Split like the batch of x (each device profiles its own examples), see _common.
    out = deviation_specs(shards, lead=2) if shards is not None else None
    return sharded(local, shards, (arrays, x, laws, levels, key, labels, lips),
                   (False, True, False, False, False, True, False), out)


@jax.jit
def _stack(devs):
    return jax.tree.map(lambda *a: jnp.stack(a, axis=2), *devs)


def _batch_only(shards: Shards | None) -> Shards | None:
    """The plan of an estimator that draws nothing: the batch split only."""
    if shards is None or shards.batch is None:
        return None
    return shards._replace(draws=())


def _reasons(struct, estimator: str, plan) -> tuple[str, ...]:
    """Per site, why ``estimator`` cannot run there ("" where it can)."""
    out = []
    for site, law in plan:
        reason = ""
        if estimator == "bound":
            try:
                check_site(struct, site)
            except ValueError as err:
                reason = str(err)
        elif estimator == "moments" and site != INPUT:
            reason = "the analytic moments propagate input noise only (site 'input')"
        elif estimator == "attack":
            reason = check_attack_law(law, struct.site(site))
        out.append(reason)
    return tuple(out)


def profile(
    model: nnx.Module | PureModel,
    x: Float[Array, "batch ..."],
    *,
    noise: noise_lib.NoiseLaw,
    levels: Sequence[float],
    key: jax.Array | None = None,
    sites: Sequence[str] | None = None,
    weight_noise: noise_lib.NoiseLaw | None = None,
    weight_sites: Sequence[str] | None = None,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    num_samples: int = 256,
    labels: Int[Array, " batch"] | None = None,
    chunk_size: int | None = None,
    moments_method: str = "two_stage",
    split_at: str | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    common_random_numbers: bool = False,
    draw_sharding: NamedSharding | None = None,
) -> Profile:
    """All sites × noise levels × estimators, as a typed table.

    One compiled call per estimator covers every site and level. The linearized
    prediction and the bound are homogeneous in the level (every law's covariance
    scales with level², its radius with level), so both are computed at level 1 — with
    all sites' Jacobians from one reverse sweep — and rescaled. Monte Carlo and the
    moments run once per site and level inside their one call; site ``i`` at level
    index ``j`` draws with ``fold_in(fold_in(key, i), j)``.

    Args:
      model: an NNX module or ``PureModel``.
      x: inputs ``(batch, *input_shape)``.
      noise: the law for input/activation sites (its own level is ignored).
      levels: noise levels ε (or σ) to evaluate.
      key: PRNG key of the Monte Carlo draws (needed only with ``"sampled"``).
      sites: input/activation sites (default: all activation sites).
      weight_noise: law for weight sites; weight sites are profiled only if given.
      weight_sites: weight paths (default with ``weight_noise``: every kernel, ndim ≥ 2).
      estimators: names from the registry (:data:`jaxsens.estimators.ESTIMATORS`);
        "moments" (analytic Gaussian-input moments) applies to the input site with a
        Gaussian law, "bound" to sites whose path to the output has a
        Lipschitz rule for every operation (see :mod:`jaxsens.graph`).
      num_samples: Monte Carlo draws per example.
      labels: optional labels for the loss change and accuracy.
      chunk_size: examples per step of the Jacobian sweep (memory bound).
      moments_method: the :func:`~jaxsens.estimators.moments` method.
      split_at: the two-stage split site of the moments.
      quantiles: quantile levels of the sampled estimator.
      common_random_numbers: share noise directions across the batch (sampled).
      draw_sharding: split the Monte Carlo draws over these mesh axes (see
        :func:`~jaxsens.estimators.sampled`). With ``x`` split along its batch over a
        mesh, every estimator runs on each device's examples and the table's per-example
        fields come back split the same way (batch axis 3).

    Returns:
      A :class:`Profile`; ``.to_records()`` gives flat records for reports.
    """
    bad = [e for e in estimators if e not in REGISTRY]
    if bad or not estimators:
        raise ValueError(f"estimators must be a non-empty subset of {list(ESTIMATORS)}, "
                         f"got {list(estimators)}")
    estimators = tuple(dict.fromkeys(estimators))
    if isinstance(levels, str | bytes) or not isinstance(levels, Sequence | np.ndarray):
        raise ValueError(f"levels must be a non-empty list of finite numbers >= 0, got "
                         f"{levels!r}")
    try:
        levels = tuple(float(v) for v in levels)
    except (TypeError, ValueError):
        raise ValueError(f"levels must be a non-empty list of finite numbers >= 0, got "
                         f"{levels!r}") from None
    if not levels or any(not math.isfinite(v) or v < 0 for v in levels):
        raise ValueError(f"levels must be a non-empty list of finite numbers >= 0, got "
                         f"{list(levels)}")
    if moments_method not in METHODS:
        raise ValueError(f"moments_method={moments_method!r} is not a moments method; "
                         f"choose one of {list(METHODS)}")
    p = prepare(model, x)
    shards = plan_shards(x, draw_sharding)
    struct = p.structure
    batch = x.shape[0]
    itemsize = jnp.dtype(x.dtype).itemsize if jnp.issubdtype(x.dtype, jnp.floating) else 4
    if "sampled" in estimators:  # fail before any work, not after
        num_samples, sample_chunk, qlevels = check_options(
            struct, batch, itemsize, num_samples=num_samples, chunk_size=None,
            quantiles=quantiles)
        if key is None:
            raise ValueError("profile with the 'sampled' estimator needs key=..., e.g. "
                             "jax.random.key(0); the other estimators draw nothing")
        check_key(key)
    else:
        sample_chunk, qlevels = 1, quantile_levels(quantiles)
    labels = check_labels(labels, batch)
    if key is None and "attack" in estimators:
        key = jax.random.key(0)  # the attack's random restarts
    act_sites = tuple(sites) if sites is not None else struct.activation_sites
    plan: list[tuple[str, noise_lib.NoiseLaw]] = [(s, noise) for s in act_sites]
    if weight_noise is not None:
        wsites = tuple(weight_sites) if weight_sites is not None else tuple(
            n for n in struct.weight_sites if len(struct.site(n).shape) >= 2)
        plan += [(s, weight_noise) for s in wsites]
    elif weight_sites:
        raise ValueError("weight_sites were given but weight_noise is None; pass a weight law")
    if not plan:
        raise ValueError("nothing to profile: give sites (or a weight_noise for weight sites)")
    for s, law in plan:
        check_law(struct, s, law)
        if "moments" in estimators and s == INPUT:
            check_moments(s, law, moments_method)
            check_method(PureModel(struct, None, None), moments_method, split_at)
    names = tuple(s for s, _ in plan)
    laws = tuple(law for _, law in plan)
    chunk = chunk_size or example_chunk(struct, names, batch, itemsize)
    options = TableOptions(
        sites=names, qlevels=qlevels, num_samples=num_samples if "sampled" in estimators
        else 0, sample_chunk=sample_chunk, crn=bool(common_random_numbers),
        example_chunk=check_positive_int("chunk_size", chunk), method=moments_method,
        split_at=split_at)
    lips = None
    if "bound" in estimators and any(bound_applies(struct, s) for s in names):
        lips = lipschitz_constants(p.adapter, p.arrays, input_dtype(p.x))
    level_array = np.asarray(levels, jax.dtypes.canonicalize_dtype(np.float64))
    results = [
        _table_kernel(p.adapter, p.arrays, p.x, laws, level_array, key, labels, lips,
                      estimator=e, options=options,
                      shards=shards if REGISTRY[e].random else _batch_only(shards))
        for e in estimators
    ]
    reasons = tuple(zip(*[_reasons(struct, e, plan) for e in estimators], strict=True))
    return Profile(
        deviation=_stack(results),
        present=tuple(tuple(not r for r in row) for row in reasons),
        reasons=reasons,
        sites=names,
        kinds=tuple(struct.site(s).kind for s in names),
        levels=levels,
        estimators=estimators,
        laws=tuple(tuple(law.with_level(v).describe() for v in levels) for law in laws),
        num_samples=num_samples if "sampled" in estimators else 0,
    )
