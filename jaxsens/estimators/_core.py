"""Sampled, linearized and bounded output deviations: one call shape, one result type.

Every estimator is ``estimator(model, x, *, site, noise, ...) -> Deviation`` with per
example results. ``model`` is a Flax NNX module or a :class:`~jaxsens.sites.PureModel`;
the numerical work runs in functions jitted once per model structure, site and law type.
All are differentiable with respect to the model parameters (``nnx.grad`` over the
module, or ``jax.grad`` over ``PureModel.with_params``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import noise as noise_lib
from ..models import ActivationStep, LinearStep, PoolStep, SiteStep
from ..sites import INPUT, PureModel, Structure, split
from ._gauss import gaussian_norm_mean
from ._result import Deviation

__all__ = ["sampled", "linearized", "bound", "moments", "profile", "check_inputs", "ESTIMATORS"]

_MEMORY_BUDGET = 256 * 2**20  # bytes of per-chunk intermediates we aim for
_QUANTILE_DRAWS = 10_000  # draws per example kept for the quantiles


# --------------------------------------------------------------------------- validation
def _all_finite(x) -> bool:
    """False only if ``x`` is concrete and has a NaN/inf (traced values pass)."""
    try:
        return bool(jnp.all(jnp.isfinite(x)))
    except jax.errors.ConcretizationTypeError:
        return True


def check_inputs(model, x, site: str, noise) -> tuple[PureModel, jax.Array]:
    """Split the model and validate ``x``, ``site`` and ``noise``; one-line ValueErrors."""
    if isinstance(x, np.ndarray | jax.Array):
        x = jnp.asarray(x)
    else:
        raise ValueError(f"x must be an array of shape (batch, ...), got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a leading batch axis with at least one example, got "
                         f"shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    pm = split(model, None if isinstance(model, PureModel) or hasattr(model, "input_shape")
               else x)
    want = pm.input_shape
    if tuple(x.shape[1:]) != want:
        if math.prod(x.shape[1:]) != math.prod(want):
            raise ValueError(
                f"x has per-example shape {tuple(x.shape[1:])} but the model takes {want} "
                f"(x must be (batch, {', '.join(map(str, want))}))"
            )
        x = x.reshape(x.shape[0], *want)
    if not _all_finite(x):
        raise ValueError("x contains NaN or infinite values; inputs must be finite")
    info = pm.site(site)
    if not isinstance(noise, noise_lib.NoiseLaw):
        raise ValueError(
            f"noise must be a noise law from jaxsens.noise ({', '.join(noise_lib.LAWS)}), "
            f"got {type(noise).__name__}"
        )
    if info.kind not in noise.applies_to:
        raise ValueError(
            f"noise {type(noise).__name__} cannot be used at {info.kind} site {site!r}; it "
            f"applies to {', '.join(noise.applies_to)} sites"
        )
    return pm, x


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _safe_norm(v: jax.Array, axis) -> jax.Array:
    sq = jnp.sum(jnp.square(v), axis=axis)
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def _param_value(params, path):
    node = params
    for p in path:
        node = node[p]
    return node.get_value() if hasattr(node, "get_value") else node


def _cross_entropy(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]


# --------------------------------------------------------------------------- sampled
@functools.partial(
    jax.jit,
    static_argnames=("struct", "site", "num_samples", "chunk", "crn", "qlevels", "classify"),
)
def _sampled_core(struct, params, rest, x, labels, key, law, *, site, num_samples, chunk, crn,
                  qlevels, classify):
    info = struct.site(site)
    out0, values = jax.vmap(
        lambda x1: struct.apply_one(params, rest, x1, return_values=True)
    )(x)
    batch = x.shape[0]
    out0f = out0.reshape(batch, -1)
    if classify:
        pred0 = jnp.argmax(out0f, axis=-1)
        lab = pred0 if labels is None else labels
        loss0 = _cross_entropy(out0f, lab)

    num_chunks = -(-num_samples // chunk)
    keys = jax.random.split(key, num_chunks * chunk)
    keys = keys.reshape(num_chunks, chunk, *keys.shape[1:])
    mask = (jnp.arange(num_chunks * chunk) < num_samples).reshape(num_chunks, chunk)
    mask = mask.astype(out0f.dtype)
    ex_index = jnp.arange(batch)

    if info.kind == "weight":
        w = _param_value(params, info.path)

        def one_draw(k):
            d = law.sample(k, w)
            return jax.vmap(lambda x1: struct.apply_one(params, rest, x1, {site: d}))(x)
    else:
        h = x if info.kind == "input" else values[site]

        def one_draw(k):
            if crn:
                # Same direction for every example, rescaled per example by the law.
                eta = jax.vmap(lambda hb: law.sample(k, hb))(h)
            else:
                eta = jax.vmap(lambda i, hb: law.sample(jax.random.fold_in(k, i), hb))(
                    ex_index, h)
            return jax.vmap(
                lambda x1, e: struct.apply_one(params, rest, x1, {site: e})
            )(x, eta)

    k_out = out0f.shape[-1]
    zero = jnp.zeros((batch,), out0f.dtype)
    carry0 = dict(s1=zero, s2=zero, sd=jnp.zeros((batch, k_out), out0f.dtype),
                  sdd=jnp.zeros((batch, k_out, k_out), out0f.dtype), flips=zero, dloss=zero,
                  correct=zero)

    # Quantiles come from the first `q_rows` draws (iid, so an unbiased subsample): a
    # fixed-size buffer keeps memory bounded for any num_samples.
    q_chunks = min(num_chunks, -(-_QUANTILE_DRAWS // chunk)) if qlevels else 0
    carry0["qbuf"] = jnp.zeros((q_chunks, chunk, batch), out0f.dtype)

    def body(carry, inp):
        i, ks, m = inp
        outs = jax.vmap(one_draw)(ks).reshape(chunk, batch, -1)
        d = outs - out0f[None]
        nrm = _safe_norm(d, axis=-1)
        mm = m[:, None]
        new = dict(
            s1=carry["s1"] + jnp.sum(mm * nrm, 0),
            s2=carry["s2"] + jnp.sum(mm * nrm**2, 0),
            sd=carry["sd"] + jnp.einsum("s,sbk->bk", m, d),
            sdd=carry["sdd"] + jnp.einsum("s,sbk,sbl->bkl", m, d, d),
            flips=carry["flips"],
            dloss=carry["dloss"],
            correct=carry["correct"],
        )
        if classify:
            flip = (jnp.argmax(outs, -1) != pred0[None]).astype(d.dtype)
            new["flips"] = carry["flips"] + jnp.sum(mm * flip, 0)
            dl = _cross_entropy(outs, lab[None]) - loss0[None]
            new["dloss"] = carry["dloss"] + jnp.sum(mm * dl, 0)
            hit = (jnp.argmax(outs, -1) == lab[None]).astype(d.dtype)
            new["correct"] = carry["correct"] + jnp.sum(mm * hit, 0)
        new["qbuf"] = carry["qbuf"]
        if q_chunks:
            slot = jnp.minimum(i, q_chunks - 1)
            keep = jnp.where(i < q_chunks, nrm, carry["qbuf"][slot])
            new["qbuf"] = carry["qbuf"].at[slot].set(keep)
        return new, None

    carry, _ = jax.lax.scan(body, carry0, (jnp.arange(num_chunks), keys, mask))
    n = num_samples
    mean = carry["s1"] / n
    var = jnp.maximum(carry["s2"] - n * mean**2, 0.0) / max(n - 1, 1)
    norms = carry["qbuf"].reshape(q_chunks * chunk, batch)[:min(n, q_chunks * chunk)]
    dmean = carry["sd"] / n
    res = dict(
        mean=mean,
        rms=jnp.sqrt(carry["s2"] / n),
        stderr=jnp.sqrt(var / n),
        quantiles=jnp.quantile(norms, jnp.asarray(qlevels, norms.dtype), axis=0).T
        if qlevels else None,
        delta_mean=dmean,
        delta_cov=carry["sdd"] / n - dmean[:, :, None] * dmean[:, None, :],
        flip_rate=carry["flips"] / n if classify else None,
        loss_change=carry["dloss"] / n if classify else None,
        accuracy=carry["correct"] / n if classify and labels is not None else None,
    )
    return res


def _largest_site_size(struct: Structure) -> int:
    sizes = [s.size for _, s in struct.sites if s.kind != "weight"]
    return max(sizes + [math.prod(struct.output_shape)])


def _default_chunk(struct: Structure, batch: int, num_samples: int, itemsize: int) -> int:
    total = sum(s.size for _, s in struct.sites if s.kind != "weight")
    per_sample = max(1, batch * total * itemsize * 4)
    return int(max(1, min(num_samples, _MEMORY_BUDGET // per_sample)))


def sampled(
    model,
    x: jax.Array,
    *,
    site: str,
    noise: noise_lib.NoiseLaw,
    key: jax.Array,
    num_samples: int = 1000,
    chunk_size: int | None = None,
    labels: jax.Array | None = None,
    quantiles: Sequence[float] = (0.05, 0.5, 0.95),
    common_random_numbers: bool = False,
) -> Deviation:
    """Monte Carlo estimate of the output deviation ‖F(x; site + η) − F(x)‖ per example.

    Draws are vmapped and processed ``chunk_size`` at a time in a ``lax.scan``, so memory
    stays bounded for any ``num_samples``. Parameters and inputs are not batched over
    draws, so XLA computes the layers before the site once (prefix reuse).

    For activation and input sites each example gets its own draws (or, with
    ``common_random_numbers``, one direction per draw shared by the batch and rescaled
    per example: every example's estimate stays unbiased, examples become correlated).
    For weight sites one Δ per draw perturbs the network for the whole batch.

    Args:
      model: an NNX module (sites marked with ``perturb``) or a ``PureModel``.
      x: inputs ``(batch, *input_shape)``.
      site: ``"input"``, an activation site or a weight path.
      noise: a law from :mod:`jaxsens.noise`.
      key: a JAX PRNG key; same key, same numbers.
      num_samples: number of draws per example.
      chunk_size: draws per scan step (default: sized for ~256 MB of intermediates).
      labels: ``(batch,)`` integer labels for the loss change (default: the clean
        predictions).
      quantiles: levels of the reported quantiles of ‖ΔF‖ (from the first 10,000 draws
        when there are more, so memory stays bounded).
      common_random_numbers: share noise directions across the batch.

    Returns:
      A :class:`Deviation` with mean, rms, stderr, quantiles, delta_mean, delta_cov and,
      for vector outputs, flip_rate and loss_change (and accuracy when labels are given).

    Raises:
      ValueError: unknown site, bad noise level, input shape mismatch, non-finite input,
        bad sample counts.
    """
    pm, x = check_inputs(model, x, site, noise)
    num_samples = _check_positive_int("num_samples", num_samples, 2)
    struct = pm.structure
    if chunk_size is None:
        chunk_size = _default_chunk(struct, x.shape[0], num_samples, x.dtype.itemsize)
    chunk_size = min(_check_positive_int("chunk_size", chunk_size), num_samples)
    qlevels = tuple(float(q) for q in quantiles)
    if any(not 0.0 <= q <= 1.0 for q in qlevels):
        raise ValueError(f"quantiles must lie in [0, 1], got {list(quantiles)}")
    k_out = math.prod(struct.output_shape)
    classify = len(struct.output_shape) == 1 and k_out >= 2
    if labels is not None:
        labels = jnp.asarray(labels)
        if labels.shape != (x.shape[0],) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"labels must be integers of shape ({x.shape[0]},), got {labels.dtype} "
                f"{tuple(labels.shape)}"
            )
    if not isinstance(key, jax.Array):
        raise ValueError("key must be a JAX PRNG key, e.g. jax.random.key(0)")
    res = _sampled_core(
        struct, pm.params, pm.rest, x, labels, key, noise, site=site, num_samples=num_samples,
        chunk=chunk_size, crn=bool(common_random_numbers), qlevels=qlevels, classify=classify,
    )
    return Deviation(
        **res, estimator="sampled", site=site, law=noise.describe(), num_samples=num_samples,
        quantile_levels=qlevels, mean_exact=False,
    )


# --------------------------------------------------------------------------- linearized
def _example_chunk(struct: Structure, sites: Sequence[str], batch: int, itemsize: int) -> int:
    k = math.prod(struct.output_shape)
    per_example = k * sum(struct.site(s).size for s in sites) * itemsize * 3
    return int(max(1, min(batch, _MEMORY_BUDGET // max(per_example, 1))))


@functools.partial(jax.jit, static_argnames=("struct", "sites", "chunk"))
def _sandwiches(struct, params, rest, x, laws, *, sites, chunk):
    """One reverse sweep per example: J C Jᵀ, the sensitivity factor and mean factor.

    ``laws`` is a tuple aligned with ``sites``. k vector-Jacobian products (one per
    output, vmapped) of a single VJP give ∂F/∂(every requested site) at once.
    """
    infos = [struct.site(s) for s in sites]

    def per_example(x1):
        deltas = {}
        for s, info in zip(sites, infos, strict=True):
            if info.kind == "weight":
                w = _param_value(params, info.path)
                deltas[s] = jnp.zeros_like(w)
            else:
                deltas[s] = jnp.zeros(info.shape, x1.dtype)

        def f(d):
            out, vals = struct.apply_one(params, rest, x1, d, return_values=True)
            return out.reshape(-1), vals

        out, vjp_fn, vals = jax.vjp(f, deltas, has_aux=True)
        eye = jnp.eye(out.shape[0], dtype=out.dtype)
        (jac,) = jax.vmap(vjp_fn)(eye)
        res = []
        for s, info, law in zip(sites, infos, laws, strict=True):
            if info.kind == "input":
                v = x1
            elif info.kind == "activation":
                v = vals[s]
            else:
                v = _param_value(params, info.path)
            j = jac[s]
            m = law.covariance(v).sandwich(j)
            jf = _safe_norm(j.reshape(-1), axis=0)
            vn = _safe_norm(v.reshape(-1), axis=0)
            res.append((m, vn * jf / math.sqrt(info.size), law.mean_factor(v)))
        return res

    return jax.lax.map(per_example, x, batch_size=chunk)


def _linear_predictions(m, mean_factor):
    rms = jnp.sqrt(jnp.maximum(jnp.trace(m, axis1=-2, axis2=-1), 0.0))
    mean = mean_factor * jax.vmap(gaussian_norm_mean)(m)
    return mean, rms


def linearized(
    model,
    x: jax.Array,
    *,
    site: str,
    noise: noise_lib.NoiseLaw,
    chunk_size: int | None = None,
) -> Deviation:
    """Exact first-order propagation of the noise to the output, per example.

    ΔF ≈ Jη with J = ∂F/∂site at the clean point. With C = E[ηηᵀ] from the law:
    Cov ΔF = J C Jᵀ, E‖Jη‖² = tr(J C Jᵀ), and E‖Jη‖ exactly from the eigenvalues of
    J C Jᵀ (Gaussian laws) or with the sphere correction √n/E‖g‖ (sphere laws);
    for spectral/ℓ∞ weight laws the mean is that of a Gaussian with the same covariance
    (``mean_exact=False``). Also the sensitivity factor ‖v‖·‖J‖_F/√n, so that under
    relative-norm noise rms = ε · factor (DESIGN §3.2).

    Args:
      model: an NNX module or a ``PureModel``.
      x: inputs ``(batch, *input_shape)``.
      site: ``"input"``, an activation site or a weight path.
      noise: a law from :mod:`jaxsens.noise`.
      chunk_size: examples per step of the Jacobian computation (memory bound).

    Returns:
      A :class:`Deviation` with mean, rms, delta_mean (zeros), delta_cov and factor.
    """
    pm, x = check_inputs(model, x, site, noise)
    struct = pm.structure
    chunk = chunk_size or _example_chunk(struct, (site,), x.shape[0], x.dtype.itemsize)
    ((m, factor, mf),) = _sandwiches(struct, pm.params, pm.rest, x, (noise,), sites=(site,),
                                     chunk=_check_positive_int("chunk_size", chunk))
    mean, rms = _linear_predictions(m, mf)
    return Deviation(
        mean=mean, rms=rms, delta_mean=jnp.zeros(m.shape[:2], m.dtype), delta_cov=m,
        factor=factor, estimator="linearized", site=site, law=noise.describe(),
        mean_exact=noise.mean_rule != "approx",
    )


# --------------------------------------------------------------------------- bound
def _conv_lipschitz(kernel: jax.Array) -> jax.Array:
    """Upper bound on the ℓ2 operator norm of a stride-1 convolution with ``kernel``.

    conv(h)(p) = Σ_o K_oᵀ h(p + o) is a sum of zero-padded shifts (contractions) times
    channel maps, so ‖conv‖ ≤ Σ_o ‖K_o‖₂; and conv(h)(p) = K_rᵀ patch(p) with every
    entry of h in at most kh·kw patches, so ‖conv‖ ≤ √(kh·kw) ‖K_r‖₂. Take the smaller.
    """
    kh, kw = kernel.shape[0], kernel.shape[1]
    per_offset = jnp.linalg.norm(kernel.reshape(kh * kw, kernel.shape[2], kernel.shape[3]),
                                 ord=2, axis=(1, 2))
    sum_bound = jnp.sum(per_offset)
    reshaped = math.sqrt(kh * kw) * jnp.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), ord=2)
    return jnp.minimum(sum_bound, reshaped)


def _step_lipschitz(step, params) -> jax.Array:
    if isinstance(step, LinearStep):
        k = _param_value(params, tuple(_split_path(step.kernel)))
        if step.kind == "conv":
            return _conv_lipschitz(k)
        return jnp.linalg.norm(k.reshape(-1, k.shape[-1]), ord=2)
    if isinstance(step, ActivationStep | PoolStep):
        return jnp.asarray(step.lipschitz)
    return jnp.asarray(1.0)


def _split_path(name: str):
    return tuple(int(p) if p.isdigit() else p for p in name.split("/"))


def _chain_or_error(struct: Structure):
    if struct.chain is None:
        raise ValueError(
            "bound needs the model's layer chain: give the module a layer_chain() method "
            "returning jaxsens.models chain steps (SiteStep, LinearStep, ActivationStep, "
            "PoolStep), as jaxsens.models.MLP does"
        )
    return struct.chain


def _locate(chain, site: str, kind: str) -> tuple[int, str]:
    for i, step in enumerate(chain):
        if isinstance(step, SiteStep) and step.name == site:
            return i, "site"
        if isinstance(step, LinearStep) and kind == "weight":
            if step.kernel == site:
                return i, "kernel"
            if step.bias == site:
                return i, "bias"
    raise ValueError(f"site {site!r} does not appear in the model's layer chain")


@functools.partial(jax.jit, static_argnames=("struct", "site"))
def _bound_core(struct, params, rest, x, law, *, site):
    chain = _chain_or_error(struct)
    info = struct.site(site)
    pos, role = _locate(chain, site, info.kind)
    after = functools.reduce(
        jnp.multiply, [_step_lipschitz(s, params) for s in chain[pos + 1:]], jnp.asarray(1.0)
    )
    _, values = jax.vmap(lambda x1: struct.apply_one(params, rest, x1, return_values=True))(x)
    if role == "site":
        v = x if site == INPUT else values[site]
        radius, _ = jax.vmap(law.radius)(v)
        return after * radius
    # A weight inside layer `pos`: bound ‖ΔF‖ ≤ L_after · ‖Δ(layer input)‖ where the
    # layer input is the last site before it pushed through parameter-free steps.
    j = pos - 1
    lip_between = jnp.asarray(1.0)
    while not isinstance(chain[j], SiteStep):
        if isinstance(chain[j], LinearStep):
            raise ValueError(f"site {site!r}: its layer input is not a site value")
        lip_between = lip_between * _step_lipschitz(chain[j], params)
        j -= 1
    src = chain[j].name
    hv = x if src == INPUT else values[src]
    h_norm = lip_between * _safe_norm(hv.reshape(hv.shape[0], -1), axis=-1)
    w = _param_value(params, info.path)
    step = chain[pos]
    if role == "kernel":
        op, _ = law.operator_radius(w)
        if step.kind == "conv":
            op = op * math.sqrt(w.shape[0] * w.shape[1])
        return after * op * h_norm
    r, _ = law.radius(w)
    if step.kind == "conv":
        # A stride-1 SAME conv bias is added at every spatial position of the input grid.
        r = r * math.sqrt(math.prod(hv.shape[1:-1]))
    return after * r * jnp.ones_like(h_norm)


def bound(
    model,
    x: jax.Array,
    *,
    site: str,
    noise: noise_lib.NoiseLaw,
) -> Deviation:
    """Certified upper bound on ‖ΔF‖ per example (Lipschitz product, DESIGN §3.3).

    Activation/input site: ‖ΔF‖ ≤ Π_{steps after the site} L_step · ‖η‖, with L the
    spectral norm of dense kernels, a certified bound for convolutions and the
    activations' Lipschitz constants. Weight site in layer ℓ: ‖ΔF‖ ≤ Π_{after ℓ} L ·
    ‖Δ‖₂ · ‖h_in‖. ‖η‖ (or ‖Δ‖₂) comes from the law: exact for bounded laws
    (``almost_sure=True``: the bound holds for every draw), the root mean square for
    Gaussian laws (then it bounds E‖ΔF‖ and its rms).

    Requires the model's ``layer_chain()`` (the built-in models have one).
    """
    pm, x = check_inputs(model, x, site, noise)
    _chain_or_error(pm.structure)
    info = pm.site(site)
    upper = _bound_core(pm.structure, pm.params, pm.rest, x, noise, site=site)
    if info.kind == "weight":
        probe = jnp.zeros(info.shape, x.dtype)
        _, a_s = noise.operator_radius(probe)
    else:
        _, a_s = noise.radius(jnp.zeros(info.shape, x.dtype))
    return Deviation(upper=upper, estimator="bound", site=site, law=noise.describe(),
                     almost_sure=bool(a_s))


# --------------------------------------------------------------------------- profile
ESTIMATORS = ("sampled", "linearized", "bound", "moments")


def _batch_summary(dev: Deviation, scale: float = 1.0) -> dict:
    """Batch averages of the per-example fields (floats; NaN where not produced)."""

    def avg(v):
        return float("nan") if v is None else float(jnp.mean(v)) * scale

    out = {
        "mean": avg(dev.mean),
        "rms": float("nan") if dev.rms is None
        else float(jnp.sqrt(jnp.mean(jnp.square(dev.rms)))) * scale,
        "stderr": float("nan") if dev.stderr is None
        else float(jnp.sqrt(jnp.sum(jnp.square(dev.stderr)))) / dev.stderr.shape[0],
        "flip_rate": float("nan") if dev.flip_rate is None else float(jnp.mean(dev.flip_rate)),
        "loss_change": float("nan") if dev.loss_change is None
        else float(jnp.mean(dev.loss_change)),
        "accuracy": float("nan") if dev.accuracy is None else float(jnp.mean(dev.accuracy)),
        "upper": float("nan") if dev.upper is None else float(jnp.mean(dev.upper)),
        "factor": float("nan") if dev.factor is None else float(jnp.mean(dev.factor)),
    }
    if dev.quantiles is not None:
        for lvl, q in zip(dev.quantile_levels, jnp.mean(dev.quantiles, axis=0), strict=True):
            out[f"q{round(100 * lvl):02d}"] = float(q)
    return out


def profile(
    model,
    x: jax.Array,
    *,
    noise: noise_lib.NoiseLaw,
    levels: Sequence[float],
    key: jax.Array,
    sites: Sequence[str] | None = None,
    weight_noise: noise_lib.NoiseLaw | None = None,
    weight_sites: Sequence[str] | None = None,
    estimators: Sequence[str] = ESTIMATORS,
    num_samples: int = 256,
    labels: jax.Array | None = None,
    chunk_size: int | None = None,
    moments_method: str = "two_stage",
) -> list[dict]:
    """All sites × noise levels × estimators in one call, as a tidy table.

    The linearized prediction and the bound are homogeneous in the level (every law's
    covariance scales with level², its radius with level), so both are computed once per
    site at level 1 — with all sites' Jacobians from one reverse sweep — and rescaled.
    Monte Carlo runs once per site and level (compiled once per site).

    Args:
      model: an NNX module or ``PureModel``.
      x: inputs ``(batch, *input_shape)``.
      noise: the law for input/activation sites (its own level is ignored).
      levels: noise levels ε (or σ) to evaluate.
      key: PRNG key; each (site, level) gets ``fold_in`` of it.
      sites: input/activation sites (default: all activation sites).
      weight_noise: law for weight sites; weight sites are profiled only if given.
      weight_sites: weight paths (default with ``weight_noise``: every kernel, ndim ≥ 2).
      estimators: subset of ``("sampled", "linearized", "bound", "moments")``; "moments"
        (analytic Gaussian-input moments) applies to the input site with a Gaussian law.
      moments_method: the :func:`moments` method.
      num_samples: Monte Carlo draws per example.
      labels: optional labels for the loss change.

    Returns:
      A list of flat records (dicts) with keys ``site, kind, level, estimator, law,
      num_examples, num_samples, mean, rms, stderr, flip_rate, loss_change, upper,
      factor`` and quantile columns; batch averages (rms: root mean square over the
      batch; stderr: of the batch-mean). Bound rows for Gaussian laws bound the rms.
    """
    bad = [e for e in estimators if e not in ESTIMATORS]
    if bad or not estimators:
        raise ValueError(f"estimators must be a non-empty subset of {list(ESTIMATORS)}, "
                         f"got {list(estimators)}")
    try:
        levels = [float(v) for v in levels]
    except (TypeError, ValueError):
        raise ValueError(f"levels must be a non-empty list of finite numbers >= 0, got "
                         f"{levels!r}") from None
    if not levels or any(not math.isfinite(v) or v < 0 for v in levels):
        raise ValueError(f"levels must be a non-empty list of finite numbers >= 0, got {levels}")
    if "sampled" in estimators:  # fail before the linearized and bound work, not after
        num_samples = _check_positive_int("num_samples", num_samples, 2)
    pm, x = check_inputs(model, x, "input", noise_lib.Absolute(0.0))
    struct = pm.structure
    act_sites = tuple(sites) if sites is not None else struct.activation_sites
    plan: list[tuple[str, noise_lib.NoiseLaw]] = [(s, noise) for s in act_sites]
    if weight_noise is not None:
        wsites = tuple(weight_sites) if weight_sites is not None else tuple(
            n for n in struct.weight_sites if len(struct.site(n).shape) >= 2)
        plan += [(s, weight_noise) for s in wsites]
    elif weight_sites:
        raise ValueError("weight_sites were given but weight_noise is None; pass a weight law")
    for s, law in plan:
        check_inputs(pm, x, s, law)

    records: list[dict] = []

    def record(site, level, estimator, law, dev, scale=1.0):
        row = {
            "site": site, "kind": struct.site(site).kind, "level": level,
            "estimator": estimator, "law": law.with_level(level).describe(),
            "num_examples": int(x.shape[0]),
            "num_samples": num_samples if estimator == "sampled" else 0,
        }
        row.update(_batch_summary(dev, scale))
        records.append(row)

    if "linearized" in estimators:
        names = tuple(s for s, _ in plan)
        unit = tuple(law.with_level(1.0) for _, law in plan)
        chunk = chunk_size or _example_chunk(struct, names, x.shape[0], x.dtype.itemsize)
        outs = _sandwiches(struct, pm.params, pm.rest, x, unit, sites=names, chunk=chunk)
        for (s, law), (m, factor, mf) in zip(plan, outs, strict=True):
            mean1, rms1 = _linear_predictions(m, mf)
            dev = Deviation(mean=mean1, rms=rms1, factor=factor)
            for level in levels:
                record(s, level, "linearized", law, dev, scale=level)
    if "bound" in estimators and struct.chain is not None:
        for s, law in plan:
            up = _bound_core(struct, pm.params, pm.rest, x, law.with_level(1.0), site=s)
            for level in levels:
                record(s, level, "bound", law, Deviation(upper=up * level))
    if "moments" in estimators:
        for s, law in plan:
            if s != INPUT:
                continue
            for level in levels:
                dev = moments(pm, x, noise=law.with_level(level), method=moments_method)
                record(s, level, "moments", law, dev)
    if "sampled" in estimators:
        for i, (s, law) in enumerate(plan):
            for j, level in enumerate(levels):
                dev = sampled(pm, x, site=s, noise=law.with_level(level),
                              key=jax.random.fold_in(jax.random.fold_in(key, i), j),
                              num_samples=num_samples, labels=labels)
                record(s, level, "sampled", law, dev)
    order = {e: i for i, e in enumerate(ESTIMATORS)}
    records.sort(key=lambda r: (r["site"] != "input", [p[0] for p in plan].index(r["site"]),
                                r["level"], order[r["estimator"]]))
    return records


# --------------------------------------------------------------------------- moments
def _full_cov(cov: noise_lib.Covariance, n: int, dtype) -> jax.Array:
    if isinstance(cov, noise_lib.Isotropic):
        return cov.scale2 * jnp.eye(n, dtype=dtype)
    if isinstance(cov, noise_lib.Diagonal):
        return jnp.diag(cov.var.reshape(-1))
    return cov.matrix


@functools.partial(jax.jit, static_argnames=("struct", "method", "split_at"))
def _moments_core(struct, params, rest, x, law, *, method, split_at):
    from ..moments._network import noncentral_norm_mean, output_moments

    pm = PureModel(struct, params, rest)

    def per_example(x1):
        c = _full_cov(law.covariance(x1), x1.size, x1.dtype)
        mom = output_moments(pm, x1, jnp.zeros_like(x1), c, method=method, split_at=split_at)
        f0 = struct.apply_one(params, rest, x1).reshape(-1)
        d = mom.mean - f0
        rms = jnp.sqrt(jnp.maximum(jnp.sum(d**2) + jnp.trace(mom.cov), 0.0))
        return noncentral_norm_mean(d, mom.cov), rms, d, mom.cov

    return jax.lax.map(per_example, x, batch_size=min(x.shape[0], 16))


def moments(
    model,
    x: jax.Array,
    *,
    noise: noise_lib.NoiseLaw,
    site: str = INPUT,
    method: str = "two_stage",
    split_at: str | None = None,
) -> Deviation:
    """Analytic output moments under Gaussian input noise (Bibi et al., DESIGN §3.4).

    The input is N(x, C) with C from ``noise`` (a Gaussian law: ``Absolute``,
    ``FullCovariance``, ``RelativeNorm(reading="gaussian")`` or ``Multiplicative``). The
    output mean and covariance come from ``method``: ``"two_stage"`` (linearize both
    halves around a ReLU site and apply the exact Affine-ReLU-Affine moments),
    ``"layerwise_full"`` or ``"layerwise_diag"`` (propagate through every layer).
    Unlike ``linearized`` these capture the mean shift E ΔF ≠ 0 that ReLUs cause.
    ``mean`` is E‖ΔF‖ of the Gaussian with that mean and covariance
    (``mean_exact=False``); ``rms`` = (‖E ΔF‖² + tr Cov)^½.
    """
    from ..moments._network import METHODS

    if site != INPUT:
        raise ValueError(f"moments propagate input noise only: site must be 'input', got "
                         f"{site!r}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a moments method; choose one of "
                         f"{list(METHODS)}")
    pm, x = check_inputs(model, x, INPUT, noise)
    if noise.mean_rule == "sphere":
        raise ValueError("moments need Gaussian input noise; RelativeNorm(reading='sphere') "
                         "is uniform on a sphere: use reading='gaussian', Absolute or "
                         "FullCovariance")
    mean, rms, d, c = _moments_core(pm.structure, pm.params, pm.rest, x, noise,
                                    method=method, split_at=split_at)
    return Deviation(mean=mean, rms=rms, delta_mean=d, delta_cov=c, estimator="moments",
                     site=INPUT, law=noise.describe(), mean_exact=False)
