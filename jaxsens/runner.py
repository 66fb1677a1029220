"""The experiment runner: config → data + model → training → analyses → results → report.

The runner only composes the library; it computes nothing of its own. A run directory
holds the resolved config, ``metrics.jsonl``, checkpoints, one JSON per finished analysis
(so a re-run resumes), ``results.json`` / ``results.csv``, figures and ``report.md``.
Every file is written atomically.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import data as data_lib
from . import losses as losses_lib
from . import models
from . import train as train_lib
from .config import ConfigError, ExperimentConfig, to_dict
from .estimators import profile
from .io import atomic_write_text, write_csv, write_json, write_yaml

__all__ = ["run_experiment", "prepare_data", "build_model", "RunResult"]


class RunResult(dict):
    """What :func:`run_experiment` returns: ``run_dir``, ``results`` and ``summary``."""


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def prepare_data(cfg: ExperimentConfig) -> tuple[data_lib.Dataset, dict]:
    """Load, subsample and normalize the configured data (deterministic)."""
    dc = cfg.data
    kwargs = dict(dc.options)
    if dc.name in ("mnist", "fashion_mnist", "cifar10"):
        if dc.path is None:
            raise ConfigError(f"config error at data.path: dataset {dc.name!r} reads local "
                              "files; set data.path to their folder")
        kwargs.setdefault("folder", dc.path)
    if dc.name in ("teacher", "gaussian"):
        kwargs.setdefault("key", cfg.seed)
    try:
        ds = data_lib.load(dc.name, **kwargs)
    except TypeError as err:
        raise ConfigError(f"config error at data.options: {err}") from None
    if dc.n_train is not None or dc.n_test is not None:
        ds = data_lib.subsample(ds, n_train=dc.n_train, n_test=dc.n_test, seed=cfg.seed)
    ds, stats = data_lib.normalize(ds, method=dc.normalize)
    dtype = np.float64 if cfg.precision == "float64" else np.float32
    ds = ds.replace(x_train=ds.x_train.astype(dtype), x_test=ds.x_test.astype(dtype))
    return ds, stats.to_dict()


def build_model(cfg: ExperimentConfig, ds: data_lib.Dataset) -> nnx.Module:
    """The configured model, initialized from the config's seed."""
    mc = cfg.model
    rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(cfg.seed), 1))
    dtype = jnp.float64 if cfg.precision == "float64" else jnp.float32
    shape = ds.input_shape
    if mc.kind == "mlp":
        return models.MLP(int(np.prod(shape)), mc.widths, ds.num_classes,
                          activation=mc.activation, use_bias=mc.use_bias, param_dtype=dtype,
                          rngs=rngs)
    if len(shape) != 3 or shape[0] % 4 or shape[1] % 4:
        raise ConfigError(f"config error at model.kind: 'lenet' needs (H, W, C) images with H, "
                          f"W divisible by 4; data {cfg.data.name!r} has shape {shape}")
    return models.LeNet(shape, ds.num_classes, channels=mc.channels, hidden=mc.widths,
                        kernel_size=mc.kernel_size, activation=mc.activation,
                        param_dtype=dtype, rngs=rngs)


def _loss_terms(cfg: ExperimentConfig):
    terms = []
    for t in cfg.train.loss:
        kwargs: dict[str, Any] = dict(t.options)
        if t.site is not None:
            kwargs["site"] = t.site
        if t.noise is not None:
            kwargs["noise"] = t.noise.build()
        terms.append((t.weight, losses_lib.make_loss(t.kind, **kwargs)))
    return terms


def _check_run_dir(run_dir: Path, resolved: dict) -> None:
    cfg_file = run_dir / "config.yaml"
    if cfg_file.exists():
        import yaml

        old = yaml.safe_load(cfg_file.read_text()) or {}
        strip = {k: v for k, v in resolved.items() if k != "output"}
        old = {k: v for k, v in old.items() if k != "output"}
        if old != strip:
            diff = sorted(k for k in set(old) | set(strip) if old.get(k) != strip.get(k))
            raise ConfigError(
                f"run directory {str(run_dir)!r} holds a run of a different config (sections "
                f"{diff} differ); choose another --out or delete that directory"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {str(run_dir)!r} exists and is not a jaxsens run; "
                          "choose another --out")


def _append_metrics(run_dir: Path, record: dict) -> None:
    """Rewrite metrics.jsonl atomically with ``record`` replacing epochs >= its own."""
    path = run_dir / "metrics.jsonl"
    old = []
    if path.exists():
        old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    epoch = record.get("epoch")
    keep = [h for h in old if epoch is None or h.get("epoch", -1) < epoch]
    _write_metrics(run_dir, [*keep, record])


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    text = "".join(json.dumps({k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                               for k, v in h.items()}) + "\n" for h in history)
    atomic_write_text(run_dir / "metrics.jsonl", text)


def _accuracy(model: nnx.Module, x, y, batch: int = 1024) -> float:
    from .sites import split

    pm = split(model)
    fn = jax.jit(lambda p, r, xb: pm.structure.apply(p, r, xb))
    correct = 0
    for i in range(0, len(x), batch):
        out = fn(pm.params, pm.rest, jnp.asarray(x[i:i + batch]))
        correct += int(jnp.sum(jnp.argmax(out, -1) == jnp.asarray(y[i:i + batch])))
    return correct / len(x)


def _analysis_sites(a, model) -> dict[str, Any]:
    from .sites import split

    pm = split(model)
    if a.kind == "input_noise":
        return {"sites": ["input"]}
    if a.kind == "activation_noise":
        sites = list(pm.activation_sites) if a.sites == "all" else list(a.sites)
        return {"sites": sites}
    kernels = [n for n in pm.weight_sites if len(pm.site(n).shape) >= 2]
    return {"sites": [], "weight_sites": kernels if a.sites == "all" else list(a.sites)}


def _run_tightness(a, model, x, key, index: int) -> list[dict]:
    from .moments import tightness_study

    try:
        rows = tightness_study(model, x, sigmas=a.levels, key=key, num_samples=a.samples,
                               split_at=a.split_at)
    except ValueError as err:
        raise ConfigError(f"config error at analyses[{index}]: {err}") from None
    for r in rows:
        r.update(analysis=a.label, estimator="tightness", site="input")
    return rows


def _run_sensitivity_map(a, model, x, index: int) -> list[dict]:
    from .moments import sensitivity_map

    rows = []
    for sigma in a.levels:
        for b in range(x.shape[0]):
            try:
                smap = sensitivity_map(model, x[b], sigma=sigma, region=a.region,
                                       method=a.moments_method, split_at=a.split_at,
                                       image_shape=tuple(x.shape[1:]) if x.ndim >= 3 else None)
            except ValueError as err:
                raise ConfigError(f"config error at analyses[{index}]: {err}") from None
            flat = np.sort(np.asarray(smap, dtype=np.float64).reshape(-1))[::-1]
            top = max(1, len(flat) // 10)
            rows.append({"analysis": a.label, "estimator": "sensitivity_map", "site": "input",
                         "level": float(sigma), "example": b, "map_shape": list(smap.shape),
                         "total": float(flat.sum()), "top10_fraction": float(
                             flat[:top].sum() / flat.sum()) if flat.sum() > 0 else None,
                         "map": np.asarray(smap, dtype=np.float64).reshape(-1).tolist(),
                         "input_shape": list(x.shape[1:]),
                         "image": np.asarray(x[b], dtype=np.float64).reshape(-1).tolist()})
    return rows


def _run_attack(a, model, x, y, key, index: int) -> list[dict]:
    from .moments import check_attack, gaussian_noise_attack

    rows = []
    for b in range(x.shape[0]):
        if a.target is not None and int(y[b]) == a.target:
            continue  # already of the target class: nothing to attack
        kb = jax.random.fold_in(key, b)
        try:
            res = gaussian_noise_attack(
                model, x[b], int(y[b]), budget=a.budget, target=a.target, objective=a.objective,
                steps=a.steps, learning_rate=a.learning_rate, sparsity=a.sparsity,
                smoothness=a.smoothness, optimize_mean=a.optimize_mean,
                method=a.moments_method, split_at=a.split_at,
                image_shape=tuple(x.shape[1:]) if x.ndim >= 3 else None,
                key=jax.random.fold_in(kb, 0))
        except ValueError as err:
            raise ConfigError(f"config error at analyses[{index}]: {err}") from None
        chk = check_attack(model, x[b], int(y[b]), res, key=jax.random.fold_in(kb, 1),
                           num_samples=a.samples)
        # Baseline: isotropic noise with the same budget and no mean shift.
        d = res.std.size
        iso = res._replace(mean_shift=jnp.zeros_like(res.mean_shift),
                           std=jnp.full_like(res.std, a.budget / np.sqrt(d)))
        base = check_attack(model, x[b], int(y[b]), iso, key=jax.random.fold_in(kb, 2),
                            num_samples=a.samples)
        rows.append({
            "analysis": a.label, "estimator": "gaussian_attack", "site": "input",
            "level": float(a.budget), "example": b, "label": int(y[b]),
            "target": a.target, "objective": a.objective,
            "predicted_objective": float(res.predicted_objective),
            "predicted_margin": float(res.predicted_margin),
            "mc_margin": float(chk.margin), "mc_margin_stderr": float(chk.margin_stderr),
            "success_rate": float(chk.success_rate),
            "success_stderr": float(chk.success_stderr),
            "baseline_success_rate": float(base.success_rate),
            "baseline_margin": float(base.margin),
            "mean_shift_norm": float(jnp.linalg.norm(res.mean_shift)),
            "noise_norm": float(jnp.linalg.norm(res.std)),
            "mean_shift": np.asarray(res.mean_shift, np.float64).reshape(-1).tolist(),
            "std": np.asarray(res.std, np.float64).reshape(-1).tolist(),
            "input_shape": list(x.shape[1:]),
        })
    return rows


def _run_analysis(a, index: int, model, ds, cfg, quiet: bool) -> list[dict]:
    n = min(a.examples, ds.n_test)
    x = jnp.asarray(ds.x_test[:n])
    y = jnp.asarray(ds.y_test[:n])
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1000 + index)
    if a.kind == "moments_tightness":
        return _run_tightness(a, model, x, key, index)
    if a.kind == "sensitivity_map":
        return _run_sensitivity_map(a, model, x, index)
    if a.kind == "gaussian_attack":
        return _run_attack(a, model, x, y, key, index)
    where = _analysis_sites(a, model)
    law = a.noise.build()
    names = where.get("sites", []) + where.get("weight_sites", [])
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a declared dependency
        tqdm = None
    records: list[dict] = []
    bar = tqdm(names, desc=f"analysis {a.label}", disable=None if not quiet else True,
               leave=False) if tqdm else names
    for j, site in enumerate(bar):
        kw: dict[str, Any] = {}
        if site in where.get("weight_sites", []):
            kw = {"sites": [], "weight_noise": law, "weight_sites": [site]}
        else:
            kw = {"sites": [site]}
        try:
            rows = profile(model, x, noise=law, levels=a.levels, key=jax.random.fold_in(key, j),
                           estimators=a.estimators, num_samples=a.samples, labels=y,
                           moments_method=a.moments_method, **kw)
        except ValueError as err:
            raise ConfigError(f"config error at analyses[{index}]: {err}") from None
        for r in rows:
            r["analysis"] = a.label
        records += rows
    return records


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path | None = None, *,
                   quiet: bool = False) -> RunResult:
    """Run a validated experiment into ``run_dir`` (resuming whatever is already there).

    ``precision: float64`` runs the whole experiment inside ``jax.enable_x64(True)``.
    """
    with jax.enable_x64(cfg.precision == "float64"):
        return _run(cfg, run_dir, quiet)


def _run(cfg: ExperimentConfig, run_dir, quiet: bool) -> RunResult:
    from .report import render_report

    run_dir = Path(run_dir or cfg.output.dir or Path("runs") / cfg.name)
    resolved = to_dict(cfg)
    _check_run_dir(run_dir, resolved)
    ds, norm_stats = prepare_data(cfg)
    model = build_model(cfg, ds)
    loss_terms = _loss_terms(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_yaml(run_dir / "config.yaml", resolved)
    write_json(run_dir / "normalization.json", norm_stats)

    tc = cfg.train
    history: list[dict] = []
    if tc.epochs > 0:
        steps_per_epoch = data_lib.num_batches(ds.n_train, tc.batch_size)
        opt = train_lib.make_optimizer(
            tc.optimizer.name, tc.optimizer.learning_rate, schedule=tc.schedule.name,
            schedule_kwargs=dict(tc.schedule.options), total_steps=tc.epochs * steps_per_epoch,
            clip_norm=tc.optimizer.clip_norm, **dict(tc.optimizer.options),
        )
        _log(f"training {cfg.model.kind} on {cfg.data.name} ({ds.n_train} examples, "
             f"{tc.epochs} epochs)", quiet)
        result = train_lib.train(
            model, ds, optimizer=opt, loss_terms=loss_terms, epochs=tc.epochs,
            batch_size=tc.batch_size, key=jax.random.fold_in(jax.random.key(cfg.seed), 2),
            checkpoint_dir=(run_dir / "checkpoints").absolute(),
            checkpoint_every=tc.checkpoint_every,
            on_epoch=lambda rec: _append_metrics(run_dir, rec), progress=not quiet,
        )
        model, history = result.model, list(result.history)
        _write_metrics(run_dir, history)
    clean_acc = _accuracy(model, ds.x_test, ds.y_test)

    analyses_out = []
    for i, a in enumerate(cfg.analyses):
        part = run_dir / "analyses" / f"{i:02d}_{a.label}.json"
        spec = a.model_dump(mode="json")
        if part.exists():
            saved = json.loads(part.read_text())
            if saved.get("spec") == spec:
                _log(f"analysis {a.label}: already done, reusing {part}", quiet)
                analyses_out.append(saved)
                continue
        t0 = time.perf_counter()
        records = _run_analysis(a, i, model, ds, cfg, quiet)
        n = min(a.examples, ds.n_test)
        entry = {"name": a.label, "kind": a.kind, "spec": spec, "num_examples": n,
                 "clean_accuracy": _accuracy(model, ds.x_test[:n], ds.y_test[:n]),
                 "records": records}
        write_json(part, entry)
        analyses_out.append(json.loads(part.read_text()))
        _log(f"analysis {a.label}: {len(records)} rows in {time.perf_counter() - t0:.1f}s", quiet)

    results = {
        "name": cfg.name,
        "description": cfg.description,
        "seed": cfg.seed,
        "data": {"name": cfg.data.name, "n_train": ds.n_train, "n_test": ds.n_test,
                 "input_shape": list(ds.input_shape), "num_classes": ds.num_classes},
        "model": {"kind": cfg.model.kind, "widths": list(cfg.model.widths),
                  "activation": cfg.model.activation},
        "clean_test_accuracy": clean_acc,
        "final_train": {k: v for k, v in (history[-1] if history else {}).items()
                        if "time" not in k and "per_s" not in k and "steps_s" not in k},
        "analyses": [{k: v for k, v in a.items() if k != "spec"} for a in analyses_out],
    }
    write_json(run_dir / "results.json", results)
    rows = [r for a in analyses_out for r in a["records"]]
    write_csv(run_dir / "results.csv", rows)
    summary = render_report(run_dir, figures=cfg.output.figures, report=cfg.output.report)
    return RunResult(run_dir=run_dir, results=results, summary=summary)
