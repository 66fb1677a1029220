"""The experiment runner: config → data + model → training → analyses → results → report.

The runner only composes the library; it computes nothing of its own. A run directory
holds the resolved config, ``metrics.jsonl``, checkpoints, one JSON per finished analysis
(so a re-run resumes), ``results.json`` / ``results.csv``, figures and ``report.md``.
Every file is written atomically.

Devices: the config's ``devices`` section makes a mesh (:func:`run_mesh`); training is
data-parallel over it and the analyses may split their examples over it
(``devices.split_examples``); ``devices.json`` records what ran. Started as several
processes (:func:`jaxsens.devices.initialize`), every process runs the same experiment:
training is shared, each process analyses its own copy of the trained model, and only
process 0 writes the run directory.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh

from . import data as data_lib
from . import devices as devices_lib
from . import losses as losses_lib
from . import models
from . import precision as precision_lib
from . import train as train_lib
from .analyses import KINDS, Context
from .config import ConfigError, ExperimentConfig, parse_config, to_dict
from .io import atomic_write_text, clean_json, write_csv, write_json, write_yaml
from .report import render_report, summary_table
from .sites import split

__all__ = [
    "load_run",
    "LoadedRun","run_experiment", "prepare_data", "build_model", "RunResult", "run_mesh"]


class RunResult(dict):
    """What :func:`run_experiment` returns: ``run_dir``, ``results`` and ``summary``."""


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def prepare_data(cfg: ExperimentConfig) -> tuple[data_lib.Dataset, dict]:
    """Load, subsample and normalize the configured data (deterministic).

    The dataset ``cfg.data.name`` is loaded with ``cfg.data.options`` (local-file datasets
    read from ``cfg.data.path``; synthetic ones are drawn from ``cfg.seed``), subsampled to
    ``n_train`` / ``n_test`` with ``cfg.seed``, normalized with statistics of its training
    set (``cfg.data.normalize``) and its train and test inputs cast to float64 or float32
    by ``cfg.precision``.

    Args:
      cfg: a validated experiment config.

    Returns:
      ``(dataset, normalization)``: the :class:`jaxsens.data.Dataset` and its
      :class:`jaxsens.data.NormStats` as plain data (``NormStats.to_dict()``).

    Raises:
      ConfigError: ``mnist``, ``fashion_mnist`` or ``cifar10`` without ``data.path``, or
        options the loader cannot take.
      ValueError: the loader rejects the options or its files, or a subsample size exceeds
        the available examples (see :func:`jaxsens.data.load`).
      FileNotFoundError: a data file is missing.
    """
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
    """The configured model, initialized from the config's seed.

    Args:
      cfg: a validated experiment config (its ``model`` section, ``seed`` and
        ``precision``).
      ds: the prepared data, which fixes the input shape and the number of classes.

    Returns:
      A :class:`jaxsens.models.MLP` (input size ``prod(ds.input_shape)``) or a
      :class:`jaxsens.models.LeNet`, with ``ds.num_classes`` outputs, parameters of the
      configured precision drawn from ``fold_in(key(cfg.seed), 1)``.

    Raises:
      ConfigError: ``lenet`` on data that are not ``(H, W, C)`` images with ``H`` and
        ``W`` divisible by 4.
    """
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
        weight = losses_lib.Warmup(t.weight, t.warmup_steps) if t.warmup_steps else t.weight
        terms.append((weight, losses_lib.make_loss(t.kind, **kwargs)))
    return terms


# What a run directory's trained model depends on: a config that changes only the other
# sections (analyses, output, name, description) reuses the model and its checkpoints.
_MODEL_SECTIONS = ("seed", "precision", "data", "model", "train")


def _check_run_dir(run_dir: Path, resolved: dict) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} is a file; choose a directory "
                          "for --out (output.dir)")
    for parent in run_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"run directory {str(run_dir)!r} lies below the file "
                              f"{str(parent)!r}; choose another --out")
    cfg_file = run_dir / "config.yaml"
    if cfg_file.exists():
        old = yaml.safe_load(cfg_file.read_text()) or {}
        diff = [k for k in _MODEL_SECTIONS if old.get(k) != resolved.get(k)]
        if diff:
            raise ConfigError(
                f"run directory {str(run_dir)!r} holds a run of a different config (sections "
                f"{diff} differ, which the trained model depends on); choose another --out "
                "or delete that directory"
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
    pm = split(model)
    fn = jax.jit(lambda p, r, xb: pm.structure.apply(p, r, xb))
    correct = 0
    for i in range(0, len(x), batch):
        out = fn(pm.params, pm.rest, jnp.asarray(x[i:i + batch]))
        correct += int(jnp.sum(jnp.argmax(out, -1) == jnp.asarray(y[i:i + batch])))
    return correct / len(x)


def run_mesh(cfg: ExperimentConfig) -> Mesh | None:
    """The mesh of the config's ``devices`` section, ``None`` when it has one device.

    Args:
      cfg: a validated experiment config.

    Returns:
      A :class:`jax.sharding.Mesh` over ``devices.mesh`` devices named ``devices.axes``
      (``auto``: every device JAX sees), or ``None`` for a single device, which runs the
      one-device program.

    Raises:
      ConfigError: the mesh needs more devices than JAX sees.
    """
    try:
        mesh = devices_lib.make_mesh(cfg.devices.mesh, cfg.devices.axes)
    except ValueError as err:
        raise ConfigError(f"config error at devices.mesh: {err}") from None
    return mesh if mesh.size > 1 else None


def _analysis_inputs(x, y, mesh: Mesh | None):
    """The analysed examples: split over the mesh when they divide evenly (one process)."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    if mesh is None or jax.process_count() > 1 or x.shape[0] % mesh.size:
        return x, y  # one device
    sharding = devices_lib.batch_sharding(mesh)
    return jax.device_put(x, sharding), jax.device_put(y, sharding)


def _local_model(model: nnx.Module) -> nnx.Module:
    """This process's own, uncommitted copy of a replicated model: analyses on it need no
    other process, and run on one device or, with split examples, over the mesh."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, devices_lib.local_copy(state))


def _run_analysis(a, index: int, model, ds, cfg, quiet: bool, initial=None,
                  mesh: Mesh | None = None) -> list[dict]:
    n = min(a.examples, ds.n_test)
    x, y = _analysis_inputs(ds.x_test[:n], ds.y_test[:n], mesh)
    ctx = Context(model=model, x=x, y=y,
                  key=jax.random.fold_in(jax.random.key(cfg.seed), 1000 + index), index=index,
                  quiet=quiet, initial_model=initial)
    return KINDS[a.kind].run(a, ctx)


def validate_against_model(cfg: ExperimentConfig, model: nnx.Module, ds) -> None:
    """Every check that needs the model but no training: analyses' sites and weight paths,
    what the moments need, the loss terms' sites. ConfigError before any work."""
    pm = split(model, jnp.zeros((1, *ds.input_shape), jnp.float32))
    for i, a in enumerate(cfg.analyses):
        a.validate_model(f"analyses[{i}]", pm)
    for i, (_, term) in enumerate(_loss_terms(cfg)):
        try:
            term.check(pm.structure)
        except ValueError as err:
            raise ConfigError(f"config error at train.loss[{i}]: {err}") from None


class LoadedRun(NamedTuple):
    """A run directory's trained model, with its config and data (:func:`load_run`).

    Attributes:
      model: the trained Flax module (the last checkpoint), in training mode as saved.
      config: the run's resolved config.
      data: its dataset, prepared (subsampled, normalized) as the run used it.
    """

    model: nnx.Module
    config: ExperimentConfig
    data: data_lib.Dataset


def load_run(run_dir: str | Path) -> LoadedRun:
    """Load the trained model of a run directory written by :func:`run_experiment`.

    The model is rebuilt from the run's ``config.yaml`` and its parameters and state are
    read from the newest checkpoint. A ``precision: float64`` run gives float64 arrays:
    use them inside ``jax.enable_x64(True)``.

    Args:
      run_dir: the run directory.

    Returns:
      A :class:`LoadedRun` ``(model, config, data)``.

    Raises:
      ConfigError: not a run directory, or a run with training but no checkpoint yet.
    """
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a jaxsens run directory (no config.yaml)")
    cfg = parse_config(yaml.safe_load(cfg_file.read_text()), str(cfg_file))
    with jax.enable_x64(cfg.precision == "float64"):
        ds, _ = prepare_data(cfg)
        model = build_model(cfg, ds)
        if cfg.train.epochs > 0:
            checkpoints = run_dir / "checkpoints"
            if train_lib.latest_epoch(checkpoints) is None:
                raise ConfigError(f"run directory {str(run_dir)!r} has no checkpoint yet; run "
                                  "it (jaxsens run) before loading it")
            model = train_lib.load_checkpoint(checkpoints, model).model
    return LoadedRun(model, cfg, ds)


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path | None = None, *,
                   quiet: bool = False) -> RunResult:
    """Run a validated experiment into ``run_dir`` (resuming whatever is already there).

    ``precision: float64`` runs the whole experiment inside ``jax.enable_x64(True)``.

    Data, model and loss terms are built and checked against the model before anything is
    written; training resumes from the run's checkpoints and finished analyses (same
    spec) are reused. The directory then holds ``config.yaml``, ``normalization.json``,
    ``metrics.jsonl``, ``checkpoints/``, ``analyses/*.json``, ``results.json``,
    ``results.csv``, ``devices.json`` and, as configured, figures and ``report.md``.

    On a mesh of several devices (the ``devices`` section) training is data-parallel and,
    as ``devices.split_examples`` says, the analyses' examples are split over the devices
    (when their number divides evenly); the numbers equal one device's up to the order
    of summation. In a multi-process run
    every process calls this alike; only process 0 writes or prints progress, and every
    process returns the same results.

    Args:
      cfg: a validated experiment config (:func:`jaxsens.config.load_config`).
      run_dir: the run directory (default: ``cfg.output.dir``, else ``runs/<cfg.name>``
        relative to the working directory).
      quiet: no progress messages or progress bars on stderr.

    Returns:
      A :class:`RunResult`: ``run_dir`` (a ``Path``), ``results`` (the contents of
      ``results.json``) and ``summary`` (the terminal table of
      :func:`jaxsens.report.summary_table`).

    Raises:
      ConfigError: ``run_dir`` holds a run of a different config or other files, or the
        config does not fit the data or the model (sites, weight paths, loss terms), or
        its mesh needs more devices than JAX sees.
      jaxsens.train.TrainingDiverged: the training loss or gradient became non-finite.
    """
    with jax.enable_x64(cfg.precision == "float64"):
        return _run(cfg, run_dir, quiet)


def _run(cfg: ExperimentConfig, run_dir, quiet: bool) -> RunResult:
    run_dir = Path(run_dir or cfg.output.dir or Path("runs") / cfg.name)
    resolved = to_dict(cfg)
    # In a multi-process run every process computes; process 0 alone writes and talks.
    primary = devices_lib.is_primary()
    quiet = quiet or not primary
    _check_run_dir(run_dir, resolved)
    mesh = run_mesh(cfg)
    ds, norm_stats = prepare_data(cfg)
    model = build_model(cfg, ds)
    loss_terms = _loss_terms(cfg)
    validate_against_model(cfg, model, ds)  # nothing is written before this passes
    if not cfg.analyses:
        raise ConfigError(f"config error at analyses: the config has no analyses, so a run "
                          f"would compute nothing; add one (kinds: {', '.join(KINDS)})")
    if cfg.train.epochs == 0:
        _log("train.epochs is 0: analysing the untrained (initialized) model", quiet)
    devices = devices_lib.describe(mesh)
    if mesh is not None:
        _log(f"devices: mesh {dict(mesh.shape)} of {devices['platform']} over "
             f"{devices['process_count']} process(es)", quiet)
    devices_lib.barrier("jaxsens-run-checked")  # every process checked before any write
    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(run_dir / "config.yaml", resolved)
        write_json(run_dir / "normalization.json", norm_stats)
        write_json(run_dir / "devices.json", devices)

    tc = cfg.train
    history: list[dict] = []
    # The model as initialized (train() leaves its argument untouched; a resumed or
    # restored run rebuilt the same initial parameters from the seed): the analyses
    # compare the trained network with it.
    initial = model if tc.epochs > 0 else None
    if tc.epochs > 0:
        steps_per_epoch = data_lib.num_batches(ds.n_train, tc.batch_size)
        opt = train_lib.make_optimizer(
            tc.optimizer.name, tc.optimizer.learning_rate, schedule=tc.schedule.name,
            schedule_kwargs=dict(tc.schedule.options), total_steps=tc.epochs * steps_per_epoch,
            clip_norm=tc.optimizer.clip_norm, **dict(tc.optimizer.options),
        )
        done = train_lib.latest_epoch(run_dir / "checkpoints")
        if done is not None and done >= tc.epochs:
            _log(f"trained: restoring the model of epoch {done} from {run_dir / 'checkpoints'}",
                 quiet)
        elif done is not None:
            _log(f"resuming training from epoch {done} of {tc.epochs}", quiet)
        else:
            _log(f"training {cfg.model.kind} on {cfg.data.name} ({ds.n_train} examples, "
                 f"{tc.epochs} epochs)", quiet)
        result = train_lib.train(
            model, ds, optimizer=opt, loss_terms=loss_terms, epochs=tc.epochs,
            batch_size=tc.batch_size, key=jax.random.fold_in(jax.random.key(cfg.seed), 2),
            checkpoint_dir=(run_dir / "checkpoints").absolute(),
            checkpoint_every=tc.checkpoint_every,
            on_epoch=(lambda rec: _append_metrics(run_dir, rec)) if primary else None,
            progress=not quiet, mesh=mesh,
        )
        model, history = result.model, list(result.history)
        if primary:
            _write_metrics(run_dir, history)
    if mesh is not None:
        model = _local_model(model)
    split = cfg.devices.split_examples
    if split == "auto":  # accelerators only (see config.DevicesConfig)
        split = jax.default_backend() != "cpu"
    analysis_mesh = mesh if split else None
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
        records = _run_analysis(a, i, model, ds, cfg, quiet, initial, analysis_mesh)
        n = min(a.examples, ds.n_test)
        entry = {"name": a.label, "kind": a.kind, "spec": spec, "num_examples": n,
                 "clean_accuracy": _accuracy(model, ds.x_test[:n], ds.y_test[:n]),
                 "records": records}
        if primary:
            write_json(part, entry)
            analyses_out.append(json.loads(part.read_text()))
        else:
            analyses_out.append(json.loads(json.dumps(clean_json(entry))))
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
        "matmul_precision": precision_lib.describe(),
        "final_train": {k: v for k, v in (history[-1] if history else {}).items()
                        if "time" not in k and "per_s" not in k and "steps_s" not in k},
        "analyses": [{k: v for k, v in a.items() if k != "spec"} for a in analyses_out],
        "devices": devices,
    }
    if primary:
        write_json(run_dir / "results.json", results)
        rows = [r for a in analyses_out for r in a["records"]]
        write_csv(run_dir / "results.csv", rows)
        summary = render_report(run_dir, figures=cfg.output.figures, report=cfg.output.report)
    else:
        summary = summary_table(results)
    devices_lib.barrier("jaxsens-run-written")  # the run directory is complete for everyone
    return RunResult(run_dir=run_dir, results=results, summary=summary)
