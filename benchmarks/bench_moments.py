"""Exact ReLU covariance under Gaussian input: speed, accuracy, and ratio to per-pair quadrature.

For hidden width p the exact covariance of relu(u), u ~ N(mu~, Sigma~), needs p (p - 1) / 2
bivariate cross moments. jaxsens evaluates them in one vectorized, jitted call. The
baseline is what the authors' published code does: a scipy quadrature per pair. It is timed
on a random subsample of pairs and extrapolated to all p (p - 1) / 2 pairs. Two baselines:

* quad:    1-D scipy.integrate.quad of E[relu(u_j) E[relu(u_i) | u_j]] (the cheapest
           per-pair quadrature; used as the accuracy reference too);
* dblquad: scipy.integrate.dblquad of the bivariate integral itself.

Accuracy is the largest error over a random subsample of pairs against (a) the 1-D quad and
(b) Rosenbaum's formula with Phi2 from scipy.special.owens_t (Patefield-Tandy), an
independent bivariate normal CDF.

Run: python benchmarks/bench_moments.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate, special

import jaxsens.moments as jm


def _network(seed: int, n: int, p: int, d: int):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(p, n)) / math.sqrt(n)
    c1 = 0.5 * rng.normal(size=p)
    B = rng.normal(size=(d, p)) / math.sqrt(p)
    c2 = np.zeros(d)
    mu = rng.normal(size=n)
    L = rng.normal(size=(n, n)) / math.sqrt(n)
    Sigma = L @ L.T + 0.1 * np.eye(n)
    return A, c1, B, c2, mu, Sigma


def _median_time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- per-pair scipy baselines (float64 numpy) ----------------------------------------------


def _relu_mean_np(m: float, s: float) -> float:
    if s <= 0:
        return max(m, 0.0)
    a = m / s
    return m * special.ndtr(a) + s * math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)


def _cross_quad(mu_i, mu_j, s_i, s_j, rho) -> float:
    """E[relu(u_i) relu(u_j)] = int_{z > -mu_j/s_j} (mu_j + s_j z) E[relu(u_i) | z] phi(z) dz."""
    rb = math.sqrt(max(0.0, 1.0 - rho * rho))

    def f(z):
        cond = _relu_mean_np(mu_i + rho * s_i * z, s_i * rb)
        return (mu_j + s_j * z) * cond * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)

    return integrate.quad(f, -mu_j / s_j, math.inf, epsabs=1e-13, epsrel=1e-12, limit=200)[0]


def _cross_dblquad(mu_i, mu_j, s_i, s_j, rho) -> float:
    """The bivariate integral over the positive quadrant, in standardized coordinates."""
    rb2 = 1.0 - rho * rho
    norm = 1.0 / (2 * math.pi * math.sqrt(rb2))

    def f(zi, zj):
        q = (zi * zi - 2 * rho * zi * zj + zj * zj) / (2 * rb2)
        return (mu_i + s_i * zi) * (mu_j + s_j * zj) * norm * math.exp(-q)

    # The bivariate density is negligible beyond 12 standard deviations.
    return integrate.dblquad(f, -mu_j / s_j, 12.0, -mu_i / s_i, 12.0, epsabs=1e-10)[0]


def _bvn_scipy_owens_t(h, k, rho):
    """Owen's reduction of Phi2 with scipy.special.owens_t (h, k != 0, |rho| < 1)."""
    rb = np.sqrt(1 - rho * rho)
    beta = np.where(h * k > 0, 0.0, 0.5)
    return (
        0.5 * special.ndtr(h)
        + 0.5 * special.ndtr(k)
        - special.owens_t(h, (k - rho * h) / (h * rb))
        - special.owens_t(k, (h - rho * k) / (k * rb))
        - beta
    )


def _cross_rosenbaum_np(mu_i, mu_j, s_i, s_j, rho):
    a_i, a_j = mu_i / s_i, mu_j / s_j
    rb = np.sqrt(1 - rho * rho)
    y = (a_i - rho * a_j) / rb
    x = (a_j - rho * a_i) / rb

    def pdf(t):
        return np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)

    return (
        (mu_i * mu_j + rho * s_i * s_j) * _bvn_scipy_owens_t(a_i, a_j, rho)
        + mu_i * s_j * pdf(a_j) * special.ndtr(y)
        + mu_j * s_i * pdf(a_i) * special.ndtr(x)
        + s_i * s_j * rb * pdf(a_j) * pdf(y)
    )


def _time_per_pair(fn, pairs) -> float:
    t0 = time.perf_counter()
    for args in pairs:
        fn(*args)
    return (time.perf_counter() - t0) / len(pairs)


# ---- benchmark ----------------------------------------------------------------------------


def run(widths, repeats: int, n_check: int, n_quad: int, n_dblquad: int, seed: int = 0):
    n_in, d_out = 64, 10
    rows = []
    for p in widths:
        net = [jnp.asarray(v) for v in _network(seed + p, n_in, p, d_out)]
        A, c1, B, c2, mu, Sigma = net
        mu_t = A @ mu + c1
        Sigma_t = A @ Sigma @ A.T
        Sigma_t = 0.5 * (Sigma_t + Sigma_t.T)

        relu_moments = jax.jit(jm.relu_moments)
        network = jax.jit(jm.affine_relu_affine)
        t_hidden = _median_time(relu_moments, (mu_t, Sigma_t), repeats)
        t_network = _median_time(network, net, repeats)

        hidden = relu_moments(mu_t, Sigma_t)
        cov = np.asarray(hidden.cov)
        mean = np.asarray(hidden.mean)
        mu_np, S_np = np.asarray(mu_t), np.asarray(Sigma_t)
        sig = np.sqrt(np.diag(S_np))

        rng = np.random.default_rng(seed + 1)
        iu, ju = np.triu_indices(p, k=1)
        pick = rng.choice(iu.size, size=min(n_check, iu.size), replace=False)
        i, j = iu[pick], ju[pick]
        rho = np.clip(S_np[i, j] / (sig[i] * sig[j]), -1, 1)
        pair_args = list(zip(mu_np[i], mu_np[j], sig[i], sig[j], rho, strict=True))

        # Errors in the covariance entries E[r_i r_j] - E r_i E r_j.
        ours = cov[i, j]
        ref_owen = _cross_rosenbaum_np(mu_np[i], mu_np[j], sig[i], sig[j], rho) - mean[i] * mean[j]
        ref_quad = np.array([_cross_quad(*a) for a in pair_args]) - mean[i] * mean[j]
        err_owen = np.abs(ours - ref_owen).max()
        alpha = mu_np / sig
        bvn = np.asarray(jm.bivariate_normal_cdf(alpha[i], alpha[j], rho))
        err_bvn = np.abs(bvn - _bvn_scipy_owens_t(alpha[i], alpha[j], rho)).max()
        err_quad = np.abs(ours - ref_quad).max()
        scale = np.abs(cov).max()

        n_pairs = p * (p - 1) // 2
        t_quad = _time_per_pair(_cross_quad, pair_args[:n_quad]) * n_pairs
        t_dbl = _time_per_pair(_cross_dblquad, pair_args[:n_dblquad]) * n_pairs
        rows.append(
            dict(
                p=p,
                pairs=n_pairs,
                t_hidden=t_hidden,
                t_network=t_network,
                err_bvn=err_bvn,
                err_owen=err_owen,
                err_quad=err_quad,
                scale=scale,
                t_quad=t_quad,
                t_dbl=t_dbl,
            )
        )
    return rows


def _print(rows, n_check, n_quad, n_dblquad):
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), float64, jit, median of repeats")
    print(
        f"errors over {n_check} random pairs (i < j): err Phi2 = max |Phi2 - scipy owens_t-based "
        "Phi2|; err C (owens_t / quad) = max |C_ij - reference| with the reference from "
        "Rosenbaum's formula on scipy's Phi2 / from a 1-D scipy quad per pair.\n"
        f"baselines: scipy quad / dblquad per pair, timed on {n_quad} / {n_dblquad} pairs and "
        "extrapolated to p(p-1)/2 pairs; speedup = baseline / relu_moments.\n"
    )
    header = (
        f"{'p':>5} {'pairs':>8} {'relu_moments':>13} {'aff-relu-aff':>13} {'err Phi2':>9}"
        f" {'err C owens_t':>14} {'err C quad':>11} {'max|C|':>7} {'quad (extr.)':>13}"
        f" {'speedup':>8} {'dblquad (extr.)':>16} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['p']:>5} {r['pairs']:>8} {r['t_hidden'] * 1e3:>10.2f} ms"
            f" {r['t_network'] * 1e3:>10.2f} ms {r['err_bvn']:>9.1e}"
            f" {r['err_owen']:>14.1e} {r['err_quad']:>11.1e} {r['scale']:>7.2f}"
            f" {r['t_quad']:>11.1f} s {r['t_quad'] / r['t_hidden']:>7.0f}x"
            f" {r['t_dbl']:>14.1f} s {r['t_dbl'] / r['t_hidden']:>7.0f}x"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="p in {128, 512}, fewer repeats")
    args = parser.parse_args(argv)
    if args.quick:
        widths, repeats, n_check, n_quad, n_dblquad = (128, 512), 5, 1000, 100, 3
    else:
        widths, repeats, n_check, n_quad, n_dblquad = (128, 512, 1024), 15, 2000, 300, 10
    with jax.enable_x64(True):
        rows = run(widths, repeats, n_check, n_quad, n_dblquad)
    _print(rows, n_check, n_quad, n_dblquad)


if __name__ == "__main__":
    main()
