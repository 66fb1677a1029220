"""Noise laws: how a perturbation η is drawn from a clean value v.

Every law is an immutable pytree with one data field, ``level`` (ε or σ), and:

* ``sample(key, value)`` — one draw of η with ``value``'s shape (explicit key);
* ``covariance(value)`` — E[η ηᵀ] over the flattened value, as an :class:`Isotropic`,
  :class:`Diagonal` or :class:`Full` covariance (what the predictors need);
* ``mean_rule`` — how the exact E‖Jη‖ follows from J C Jᵀ: ``"gaussian"`` (Jη is
  Gaussian), ``"sphere"`` (η uniform on a sphere: exact via E‖Jg‖/E‖g‖), or
  ``"approx"`` (a Gaussian with the same covariance; stated in results);
* ``radius(value)`` — a bound on ‖η‖₂ and whether it holds almost surely (bounded laws)
  or for the root mean square only (Gaussian laws);
* ``operator_radius(value)`` — for a weight, a bound on the ℓ2 operator norm of Δ seen
  as the matrix ``value.reshape(-1, out)`` (same almost-sure flag).

All covariances are homogeneous of degree 2 in ``level``; predictions at several levels
reuse one Jacobian.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol, cast, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from .checks import safe_norm as _norm
from .linalg import spectral_norm_bound
from .precision import exact

__all__ = [
    "NoiseLaw",
    "LawDefaults",
    "RelativeNorm",
    "Absolute",
    "FullCovariance",
    "WeightRelative",
    "Multiplicative",
    "Isotropic",
    "Diagonal",
    "Full",
    "LAWS",
]

MeanRule = Literal["gaussian", "sphere", "approx"]


# --------------------------------------------------------------------------- covariances
@functools.partial(jax.tree_util.register_dataclass, data_fields=["scale2"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Isotropic:
    """C = scale2 · I."""

    scale2: jax.Array

    @exact
    def sandwich(self, jac: jax.Array) -> jax.Array:
        """J C Jᵀ for ``jac`` of shape ``(k, *value_shape)``."""
        j = jac.reshape(jac.shape[0], -1)
        return self.scale2 * (j @ j.T)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["var"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Diagonal:
    """C = diag(var), ``var`` with the value's shape."""

    var: jax.Array

    @exact
    def sandwich(self, jac: jax.Array) -> jax.Array:
        j = jac.reshape(jac.shape[0], -1)
        return (j * self.var.reshape(1, -1)) @ j.T


@functools.partial(jax.tree_util.register_dataclass, data_fields=["matrix"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Full:
    """A full covariance over the flattened value."""

    matrix: jax.Array

    @exact
    def sandwich(self, jac: jax.Array) -> jax.Array:
        j = jac.reshape(jac.shape[0], -1)
        return j @ self.matrix @ j.T


Covariance = Isotropic | Diagonal | Full


# --------------------------------------------------------------------------- helpers
def _check_level(name: str, level) -> None:
    if isinstance(level, str | bool):
        raise ValueError(f"{name} must be a finite number >= 0, got {level!r}")
    try:
        value = float(level)
    except ValueError:
        raise ValueError(f"{name} must be a finite number >= 0, got {level!r}") from None
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # traced or a pytree placeholder: nothing concrete to check
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {level!r}")


def _fmt(level) -> str:
    """The level for a description; ``traced`` inside a transformation."""
    try:
        return f"{float(level):g}"
    except (TypeError, jax.errors.ConcretizationTypeError):
        return "traced"


def _sq_norm(v: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(v))


def _matrix(value: jax.Array) -> jax.Array:
    """A weight seen as the matrix (fan_in, out); a vector as a (1, n) row."""
    if value.ndim <= 1:
        return value.reshape(1, -1)
    return value.reshape(-1, value.shape[-1])


def spectral_norm(value: jax.Array) -> jax.Array:
    """ℓ2 operator norm of ``value`` seen as the matrix ``(fan_in, out)``."""
    return jnp.linalg.norm(_matrix(value), ord=2)


def linf_operator_norm(value: jax.Array) -> jax.Array:
    """ℓ∞ operator norm of the map the weight implements (max row ℓ1 sum, Tsai et al.).

    The layer computes ``x @ K`` with K of shape ``(fan_in, out)``, i.e. W = Kᵀ, whose
    max row ℓ1 sum is the max over output units of Σ_in |K[in, out]|.
    """
    return jnp.max(jnp.sum(jnp.abs(_matrix(value)), axis=0))


@functools.lru_cache(maxsize=64)
def _norm_ratio_constant(shape: tuple[int, ...], norm: str, rel_tol: float = 1e-3,
                         max_elements: int = 2**20) -> float:
    """E[‖G‖_F² / ‖G‖²] / N for G ~ N(0, I) of ``shape``, by a fixed-seed estimate.

    By the symmetries of G (sign flips and permutations of rows and columns, and for the
    spectral norm also rotations) E[G/‖G‖ ⊗ G/‖G‖] is a multiple of the identity; this is
    that multiple. The ratio concentrates for large weights but not for small ones (the
    ℓ∞ ratio of a 3×4 weight spreads by ~25%), so draws continue, in batches of at least
    32, until the standard error is below ``rel_tol`` of the mean or ``max_elements``
    Gaussian numbers were drawn (then: 32 draws, ~0.4% for a square 256×256 weight).
    """
    rng = np.random.default_rng(20240607)
    n = int(np.prod(shape))
    rows, cols = (1, n) if len(shape) <= 1 else (n // shape[-1], shape[-1])
    batch = int(max(32, min(4096, max_elements // max(n, 1))))
    total = total_sq = 0.0
    count = 0
    while True:
        g = rng.standard_normal((batch, rows, cols))
        if norm == "spectral" and n > 4096:
            op = np.array([np.linalg.norm(m, 2) for m in g])  # faster than batched SVD here
        elif norm == "spectral":
            op = np.linalg.norm(g, ord=2, axis=(1, 2))
        else:
            op = np.abs(g).sum(axis=1).max(axis=1)
        r = np.sum(g * g, axis=(1, 2)) / op**2
        total += float(r.sum())
        total_sq += float(np.sum(r * r))
        count += batch
        mean = total / count
        se = math.sqrt(max(total_sq / count - mean**2, 0.0) / count)
        if se <= rel_tol * mean or count * n >= max_elements:
            return mean / n


# --------------------------------------------------------------------------- laws
@runtime_checkable
class NoiseLaw(Protocol):
    """What every noise law provides (see the module docstring).

    Laws are frozen dataclasses registered as pytrees whose data is ``level`` (and a
    covariance matrix where there is one), so a new level needs no recompilation. The
    laws here share their defaults through :class:`LawDefaults`; a user law may
    implement the protocol directly.
    """

    applies_to: ClassVar[tuple[str, ...]]

    @property
    def level(self) -> Any:
        """ε or σ: the law's scale (data of the pytree)."""

    @property
    def mean_rule(self) -> MeanRule: ...

    def with_level(self, level) -> NoiseLaw: ...

    def describe(self) -> str: ...

    def sample(self, key: jax.Array, value: jax.Array) -> jax.Array: ...

    def covariance(self, value: jax.Array) -> Covariance: ...

    def radius(self, value: jax.Array) -> tuple[jax.Array, bool]: ...

    def operator_radius(self, value: jax.Array) -> tuple[jax.Array, bool]: ...

    def mean_factor(self, value: jax.Array) -> jax.Array: ...

    def check_shape(self, shape: tuple[int, ...]) -> None: ...


class LawDefaults:
    """Defaults the built-in laws share (a mixin of plain methods)."""

    applies_to: ClassVar[tuple[str, ...]] = ("input", "activation", "weight")

    @property
    def mean_rule(self) -> MeanRule:
        return "gaussian"

    def with_level(self, level):
        """The same law at another level."""
        return dataclasses.replace(cast(Any, self), level=level)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise a one-line ValueError if the law cannot apply to values of ``shape``."""

    def radius(self, value: jax.Array) -> tuple[jax.Array, bool]:
        raise NotImplementedError

    def operator_radius(self, value: jax.Array) -> tuple[jax.Array, bool]:
        """Bound on ‖Δ‖₂ (operator norm); by default through ‖Δ‖₂ ≤ ‖Δ‖_F = ‖η‖₂."""
        return self.radius(value)

    def mean_factor(self, value: jax.Array) -> jax.Array:
        """E‖Jη‖ = mean_factor · E‖z‖, z ~ N(0, J C Jᵀ) (1 for Gaussian laws)."""
        return jnp.ones((), value.dtype)


def _pytree(*data: str):
    """Register a frozen dataclass as a pytree: ``data`` fields are leaves, the rest static."""

    def register(cls):
        meta = [f.name for f in dataclasses.fields(cls) if f.name not in data]
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=meta)

    return register


@_pytree("level")
@dataclasses.dataclass(frozen=True)
class RelativeNorm(LawDefaults):
    """Noise whose norm is ``level`` times the norm of the clean value.

    * ``reading="sphere"`` (default): η = ε‖v‖ · g/‖g‖, exactly ‖η‖ = ε‖v‖.
    * ``reading="gaussian"``: η ~ N(0, s² I), s = ε‖v‖/√n, so E‖η‖² = (ε‖v‖)².

    Both have E[ηηᵀ] = (ε‖v‖)²/n · I. On a weight this is relative noise in the
    Frobenius norm.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsens.noise import RelativeNorm
      >>> v = jnp.ones(100)
      >>> eta = RelativeNorm(0.05).sample(jax.random.key(0), v)
      >>> round(float(jnp.linalg.norm(eta) / jnp.linalg.norm(v)), 6)  # exactly 5%
      0.05
      >>> round(float(RelativeNorm(0.05).covariance(v).scale2), 6)  # (ε‖v‖)²/n
      0.0025
    """

    level: float = 0.05
    reading: Literal["sphere", "gaussian"] = "sphere"

    def __post_init__(self):
        _check_level("RelativeNorm level", self.level)
        if self.reading not in ("sphere", "gaussian"):
            raise ValueError(
                f"RelativeNorm reading must be 'sphere' or 'gaussian', got {self.reading!r}"
            )

    @property
    def mean_rule(self) -> MeanRule:
        return "sphere" if self.reading == "sphere" else "gaussian"

    def describe(self) -> str:
        return f"relative-norm({self.reading}) ε={_fmt(self.level)}"

    def sample(self, key, value):
        g = jax.random.normal(key, value.shape, value.dtype)
        r = self.level * _norm(value)
        if self.reading == "sphere":
            return r * g / _norm(g)
        return r / math.sqrt(value.size) * g

    def covariance(self, value):
        return Isotropic(self.level**2 * _sq_norm(value) / value.size)

    def radius(self, value):
        return self.level * _norm(value), self.reading == "sphere"

    def mean_factor(self, value):
        if self.reading == "gaussian":
            return jnp.ones((), value.dtype)
        # η = r u, u uniform on the sphere, independent of ‖g‖ for g = ‖g‖u, so
        # E‖Jg‖ = E‖g‖ E‖Ju‖; with C = r²/n I: E‖Jη‖ = √n / E‖g‖ · E‖z‖, z ~ N(0, JCJᵀ).
        n = value.size
        log_eg = 0.5 * math.log(2.0) + math.lgamma((n + 1) / 2) - math.lgamma(n / 2)
        return jnp.asarray(math.sqrt(n) * math.exp(-log_eg), value.dtype)


@_pytree("level")
@dataclasses.dataclass(frozen=True)
class Absolute(LawDefaults):
    """Isotropic Gaussian noise η ~ N(0, σ² I) with σ = ``level``."""

    level: float = 0.1

    def __post_init__(self):
        _check_level("Absolute level (sigma)", self.level)

    def describe(self) -> str:
        return f"absolute gaussian σ={_fmt(self.level)}"

    def sample(self, key, value):
        return self.level * jax.random.normal(key, value.shape, value.dtype)

    def covariance(self, value):
        return Isotropic(jnp.asarray(self.level**2, value.dtype))

    def radius(self, value):
        return jnp.asarray(self.level * math.sqrt(value.size), value.dtype), False


@_pytree("cov", "level")
@dataclasses.dataclass(frozen=True)
class FullCovariance(LawDefaults):
    """Gaussian noise with a full covariance, η ~ N(0, level² Σ) (inputs, small sites).

    Args:
      cov: Σ, ``(n, n)`` symmetric positive semi-definite over the flattened value.
      level: a scale on the standard deviation (levels in :func:`jaxsens.profile`).
    """

    cov: Any = None
    level: float = 1.0
    applies_to: ClassVar[tuple[str, ...]] = ("input", "activation")

    def __post_init__(self):
        _check_level("FullCovariance level", self.level)
        cov = self.cov
        if isinstance(cov, list | tuple):
            cov = np.asarray(cov, dtype=np.float64)
            object.__setattr__(self, "cov", cov)
        if not isinstance(cov, np.ndarray | jax.Array) and cov is not None:
            return  # a pytree placeholder while JAX rebuilds the law
        if cov is None or cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(
                f"FullCovariance cov must be a square (n, n) matrix, got "
                f"{None if cov is None else getattr(cov, 'shape', type(cov).__name__)}"
            )

    def describe(self) -> str:
        return f"full-covariance gaussian (n={self.cov.shape[0]}) scale={_fmt(self.level)}"

    def check_shape(self, shape):
        size = math.prod(shape)
        if size != self.cov.shape[0]:
            raise ValueError(
                f"FullCovariance cov is {self.cov.shape[0]}x{self.cov.shape[0]} but the site "
                f"has {size} values (shape {tuple(shape)})"
            )

    def _check(self, value):
        self.check_shape(value.shape)

    def sample(self, key, value):
        self._check(value)
        w, v = jnp.linalg.eigh(self.cov.astype(value.dtype))
        root = v * jnp.sqrt(jnp.clip(w, 0.0, None))
        g = jax.random.normal(key, (value.size,), value.dtype)
        return (self.level * (root @ g)).reshape(value.shape)

    def covariance(self, value):
        self._check(value)
        return Full(self.level**2 * self.cov.astype(value.dtype))

    def radius(self, value):
        self._check(value)
        return self.level * jnp.sqrt(jnp.trace(self.cov)).astype(value.dtype), False


@_pytree("level")
@dataclasses.dataclass(frozen=True)
class WeightRelative(LawDefaults):
    """Weight noise Δ with ‖Δ‖ = ``level`` · ‖W‖ in a chosen norm.

    * ``norm="frobenius"``: Δ = ε‖W‖_F · G/‖G‖_F (the sphere reading of RelativeNorm);
    * ``norm="spectral"``: Δ = ε σ_max(W) · G/σ_max(G);
    * ``norm="linf"``: Δ = ε‖W‖_∞ · G/‖G‖_∞, ‖·‖_∞ the max row ℓ1 sum of the map
      (Tsai et al. 2021).

    G has iid N(0, 1) entries. The weight is seen as the matrix ``(fan_in, out)``.
    For spectral/linf, E[ΔΔᵀ] = ε²‖W‖² c I with c = E[‖G‖_F²/‖G‖²]/N from a fixed-seed
    estimate (standard error ≤ 0.1%, ~0.4% for large square weights), and E‖JΔ‖ uses
    the Gaussian with that covariance (``mean_rule="approx"``).
    """

    level: float = 0.1
    norm: Literal["frobenius", "spectral", "linf"] = "frobenius"
    applies_to: ClassVar[tuple[str, ...]] = ("weight",)

    def __post_init__(self):
        _check_level("WeightRelative level", self.level)
        if self.norm not in ("frobenius", "spectral", "linf"):
            raise ValueError(
                f"WeightRelative norm must be 'frobenius', 'spectral' or 'linf', got {self.norm!r}"
            )

    @property
    def mean_rule(self) -> MeanRule:
        return "sphere" if self.norm == "frobenius" else "approx"

    def describe(self) -> str:
        return f"weight-relative({self.norm}) ε={_fmt(self.level)}"

    def _norm(self, value):
        if self.norm == "frobenius":
            return _norm(value)
        if self.norm == "spectral":
            return spectral_norm(value)
        return linf_operator_norm(value)

    def sample(self, key, value):
        g = jax.random.normal(key, value.shape, value.dtype)
        return self.level * self._norm(value) * g / self._norm(g)

    def _norm_upper(self, value):
        """An upper bound on ``_norm`` (equal to it except for the spectral norm, where a
        certified Gram-iteration bound replaces the SVD)."""
        if self.norm == "spectral":
            return spectral_norm_bound(value)
        return self._norm(value)

    def covariance(self, value):
        if self.norm == "frobenius":
            return Isotropic(self.level**2 * _sq_norm(value) / value.size)
        c = _norm_ratio_constant(tuple(value.shape), self.norm)
        return Isotropic(self.level**2 * self._norm(value) ** 2 * c)

    def radius(self, value):
        r = self.level * self._norm_upper(value)
        m = _matrix(value)
        if self.norm == "spectral":
            r = r * math.sqrt(min(m.shape))  # ‖Δ‖_F ≤ √rank ‖Δ‖₂
        elif self.norm == "linf":
            r = r * math.sqrt(m.shape[1])  # every output row: ‖row‖₂ ≤ ‖row‖₁ ≤ ‖Δ‖_∞
        return r, True

    def operator_radius(self, value):
        r = self.level * self._norm_upper(value)
        if self.norm == "linf":
            # W = Δᵀ has `out` rows: ‖Wx‖₂ ≤ √out ‖Wx‖_∞ ≤ √out ‖W‖_∞ ‖x‖_∞ ≤ √out ‖W‖_∞ ‖x‖₂.
            r = r * math.sqrt(_matrix(value).shape[1])
        return r, True

    def mean_factor(self, value):
        if self.norm == "frobenius":
            return RelativeNorm(1.0).mean_factor(value)
        return jnp.ones((), value.dtype)


@_pytree("level")
@dataclasses.dataclass(frozen=True)
class Multiplicative(LawDefaults):
    """Elementwise multiplicative noise v ⊙ (1 + ε ξ), ξ ~ N(0, 1) (analog hardware).

    η = ε v ⊙ ξ; E[ηηᵀ] = diag(ε² v²).
    """

    level: float = 0.1

    def __post_init__(self):
        _check_level("Multiplicative level", self.level)

    def describe(self) -> str:
        return f"multiplicative ε={_fmt(self.level)}"

    def sample(self, key, value):
        return self.level * value * jax.random.normal(key, value.shape, value.dtype)

    def covariance(self, value):
        return Diagonal(self.level**2 * jnp.square(value))

    def radius(self, value):
        return self.level * _norm(value), False


# Explicit name -> constructor mapping for configs (never getattr on a string).
LAWS: dict[str, Callable[..., NoiseLaw]] = {
    "relative_norm": RelativeNorm,
    "absolute": Absolute,
    "full_covariance": FullCovariance,
    "weight_relative": WeightRelative,
    "multiplicative": Multiplicative,
}
