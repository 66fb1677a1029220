"""The ``jaxsens`` command line: run, sweep, report, list.

User mistakes (bad config, bad override, missing files) print one line to stderr and
exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import jax
import yaml

from . import __version__
from . import devices as devices_lib
from .config import (
    ConfigError,
    apply_overrides,
    builtin_experiments,
    load_config,
    parse_config,
    read_yaml,
    resolve_source,
    to_dict,
)
from .report import (
    SWEEP_MANIFEST,
    render_report,
    render_sweep_report,
    sweep_points,
    write_sweep_manifest,
)
from .runner import run_experiment
from .train import TrainingDiverged

__all__ = ["main", "compilation_cache_dir", "enable_compilation_cache"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxsens",
        description="Differentiable sensitivity experiments: sampled, predicted and bounded "
        "output deviations of neural networks under noise.",
        epilog="--set takes dotted paths into the YAML config; list entries by index, e.g. "
        "--set analyses.0.levels=[0.05,0.1] --set train.epochs=3. Compiled programs are "
        "cached in ~/.cache/jaxsens/xla (JAX's persistent compilation cache); set "
        "JAXSENS_COMPILE_CACHE to another directory, or to 'off'.",
    )
    p.add_argument("--version", action="version", version=f"jaxsens {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run an experiment (default: noise_propagation)")
    r.add_argument("config", nargs="?", help="a YAML config or a built-in experiment name")
    r.add_argument("--out", help="run directory (default: output.dir or runs/NAME)")
    _compute_options(r, "override a config field, e.g. --set train.epochs=3 (repeatable)")
    s = sub.add_parser("sweep", help="run one experiment per point of a parameter grid")
    s.add_argument("config", help="a YAML config or a built-in experiment name")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   required=True, help="a swept field and its values (repeatable)")
    s.add_argument("--out", help="parent directory of the run directories "
                   "(default: runs/NAME-sweep)")
    s.add_argument("--shard", metavar="I/N", help="run only the I-th of N disjoint slices of "
                   "the grid (0 <= I < N), e.g. --shard $SLURM_ARRAY_TASK_ID/"
                   "$SLURM_ARRAY_TASK_COUNT in a job array; `jaxsens report` of the sweep "
                   "directory gathers every slice's points")
    _compute_options(s, "override a field for every point, e.g. --set train.epochs=3")
    rp = sub.add_parser("report", help="re-render figures and report.md from a run directory; "
                        "for a sweep directory, each point's and their comparison")
    rp.add_argument("run_dir", help="a finished run directory (holding results.json) or a "
                    "sweep directory (from jaxsens sweep)")
    a = sub.add_parser("analyse", help="run (new) analyses on a run directory's trained "
                       "model; training is restored from its checkpoints, not repeated")
    a.add_argument("run_dir", help="a run directory (from jaxsens run)")
    a.add_argument("config", nargs="?", help="a YAML config or built-in experiment whose "
                   "analyses replace the run's (default: the run's own)")
    _compute_options(a, "override a field, e.g. --set analyses.0.levels=[0.1]")
    c = sub.add_parser("config", help="print the resolved, validated config without running")
    c.add_argument("config", nargs="?", help="a YAML config or a built-in experiment name")
    _set_option(c, "override a config field (repeatable)")
    sub.add_parser("list", help="list the built-in experiments")
    return p


_PLATFORMS = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}


def _set_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help=help_text)


def _compute_options(parser: argparse.ArgumentParser, set_help: str) -> None:
    """--set, --quiet and --device: the options of every command that computes."""
    _set_option(parser, set_help)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--device", choices=sorted(_PLATFORMS),
                        help="run on this kind of device (default: the best JAX finds)")
    dist = parser.add_argument_group(
        "multi-process runs", "start the same command as N processes (one per host, or "
        "several on one machine) to run one experiment across all of them; only process 0 "
        "writes. JAX_COORDINATOR_ADDRESS in the environment also starts one.")
    dist.add_argument("--coordinator", metavar="HOST:PORT",
                      help="address of process 0 (jax.distributed.initialize)")
    dist.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    dist.add_argument("--process-id", type=int, metavar="I", help="this process, 0 <= I < N")
    dist.add_argument("--distributed", action="store_true",
                      help="join a multi-process run JAX configures from the cluster "
                      "environment (SLURM, Open MPI, Kubernetes, Cloud TPU)")


def _distributed(args) -> bool:
    """Whether the command joins a multi-process run (flags, or JAX's environment)."""
    return bool(args.distributed or args.coordinator is not None or
                args.num_processes is not None or args.process_id is not None or
                os.environ.get("JAX_COORDINATOR_ADDRESS"))


def _select_device(choice: str | None, args=None) -> None:
    """Point JAX at ``choice``, join a multi-process run if asked (both before any
    computation) and check a device is there."""
    if choice is not None:
        jax.config.update("jax_platforms", _PLATFORMS[choice])
    if args is not None and _distributed(args):
        for flag, value in (("--num-processes", args.num_processes),
                            ("--process-id", args.process_id)):
            if value is not None and value < (1 if flag == "--num-processes" else 0):
                raise ConfigError(f"{flag} must be >= {1 if flag == '--num-processes' else 0}"
                                  f", got {value}")
        try:
            devices_lib.initialize(args.coordinator, args.num_processes, args.process_id)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    try:
        devices = jax.devices()
    except (RuntimeError, AssertionError) as err:  # jax asserts when JAX_PLATFORMS fails
        what = f"--device {choice}" if choice else "the JAX_PLATFORMS setting"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else (
            "JAX could not start that backend")
        raise ConfigError(f"{what}: no such device is available to JAX here ({detail}); "
                          "choose another --device or leave it out") from None
    if choice is not None and devices[0].platform not in (_PLATFORMS[choice], choice):
        raise ConfigError(f"--device {choice}: JAX runs on {devices[0].platform} here")


def _print_run(res) -> None:
    """A finished run's summary, on process 0 only."""
    if devices_lib.is_primary():
        print(res["summary"])
        print(f"\nresults: {res['run_dir']}/results.json  report: {res['run_dir']}/report.md")


def _cmd_analyse(args) -> int:
    run_dir = Path(args.run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"{args.run_dir!r} is not a jaxsens run directory (no config.yaml)")
    raw = read_yaml(cfg_file)
    if args.config is not None:
        raw["analyses"] = read_yaml(resolve_source(args.config)).get("analyses", [])
    cfg = parse_config(apply_overrides(raw, args.overrides), str(cfg_file))
    _print_run(run_experiment(cfg, run_dir, quiet=args.quiet))
    return 0


def _cmd_config(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
    return 0


def compilation_cache_dir() -> Path | None:
    """Where compiled XLA programs persist between runs, or ``None`` if switched off.

    ``JAXSENS_COMPILE_CACHE`` names the directory, or ``off``; by default it is
    ``$XDG_CACHE_HOME/jaxsens/xla`` (``~/.cache/jaxsens/xla``). Read when a command runs,
    never at import.

    Returns:
      The directory, or ``None``.
    """
    setting = os.environ.get("JAXSENS_COMPILE_CACHE", "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxsens" / "xla"


def enable_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in :func:`compilation_cache_dir`.

    A second ``jaxsens run`` in a new process then loads the compiled programs instead of
    compiling them again (every program that took over 0.2 s to compile is kept).

    Returns:
      The cache directory, or ``None`` when switched off.
    """
    path = compilation_cache_dir()
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return path


def _cmd_run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    _print_run(run_experiment(cfg, args.out, quiet=args.quiet))
    return 0


def _slug(value: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in value)


def _parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` → ``(I, N)``; ``None`` → ``(0, 1)`` (the whole grid)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ConfigError(f"--shard must look like I/N with 0 <= I < N (e.g. --shard 0/4 for "
                          f"the first of 4 slices), got {text!r}")
    return i, n


def _cmd_sweep(args) -> int:
    shard, shards = _parse_shard(args.shard)
    axes = []
    for g in args.grid:
        if "=" not in g or not g.split("=", 1)[1]:
            raise ConfigError(f"--grid {g!r} must look like key.path=v1,v2,...")
        k, vals = g.split("=", 1)
        axes.append([(k, v) for v in vals.split(",")])
    base = load_config(args.config, args.overrides)
    parent = Path(args.out or Path("runs") / f"{base.name}-sweep")
    points = list(itertools.product(*axes))
    # Validate every point before any work starts.
    cfgs = [load_config(args.config, [*args.overrides, *(f"{k}={v}" for k, v in pt)])
            for pt in points]
    names = ["__".join(f"{_slug(k)}={_slug(v)}" for k, v in pt) for pt in points]
    for above in (parent, *parent.parents):
        if above.exists() and not above.is_dir():
            raise ConfigError(f"sweep directory {str(parent)!r}: {str(above)!r} is a file; "
                              "choose another --out")
    primary = devices_lib.is_primary()
    try:
        # Every slice lists the whole grid: slices of one sweep started at once write the
        # same manifest (each write atomic), so whichever lands last, every point is in it.
        if primary:
            write_sweep_manifest(parent, [(n, dict(pt))
                                          for n, pt in zip(names, points, strict=True)],
                                 config=args.config, overrides=args.overrides)
    except ValueError as err:
        raise ConfigError(f"{err}; choose another --out or delete that file") from None
    # Slice I of N: points I, I + N, I + 2N ... (disjoint, and mixed over the grid's axes).
    mine = [j for j in range(len(points)) if j % shards == shard]
    if shards > 1:
        print(f"sweep slice {shard}/{shards}: {len(mine)} of {len(points)} points",
              file=sys.stderr)
    try:
        for name, cfg in ((names[j], cfgs[j]) for j in mine):
            run_dir = parent / name
            if (run_dir / "results.json").exists() and (run_dir / "report.md").exists():
                print(f"[skip] {name}: finished", file=sys.stderr)
                continue
            print(f"[run] {name}", file=sys.stderr)
            res = run_experiment(cfg, run_dir, quiet=args.quiet)
            if primary:
                print(f"== {name}\n{res['summary']}\n")
    except (ConfigError, TrainingDiverged):
        if primary:
            render_sweep_report(parent)  # the finished points side by side, this one missing
        raise
    if not primary:
        return 0
    print(render_sweep_report(parent))
    if shards > 1:
        print(f"\nsweep slice {shard}/{shards}: {len(mine)} of {len(points)} points under "
              f"{parent}; when every slice has finished, `jaxsens report {parent}` compares "
              "them all")
    else:
        print(f"\nsweep: {len(points)} points under {parent}  comparison: "
              f"{parent / 'comparison.md'}")
    return 0


def _render_run(run_dir: Path) -> str:
    """render_report as the run's config asks (figures, report.md); its summary."""
    cfg_file = run_dir / "config.yaml"
    figures = report = True
    if cfg_file.is_file():
        out = (read_yaml(cfg_file).get("output") or {})
        figures, report = out.get("figures", True), out.get("report", True)
    return render_report(run_dir, figures=figures, report=report)


def _cmd_report(args) -> int:
    run_dir = Path(args.run_dir)
    if (run_dir / "results.json").is_file():
        print(_render_run(run_dir))
        return 0
    try:
        points = sweep_points(run_dir)
    except ValueError as err:
        if (run_dir / SWEEP_MANIFEST).exists():
            raise ConfigError(str(err)) from None
        raise ConfigError(f"{args.run_dir!r} is neither a finished jaxsens run (no "
                          f"results.json) nor a sweep directory (no {SWEEP_MANIFEST}, no run "
                          "directories in it)") from None
    for point in points:
        if (point.run_dir / "results.json").is_file():
            _render_run(point.run_dir)
    print(render_sweep_report(run_dir))
    print(f"\ncomparison: {run_dir / 'comparison.md'}")
    return 0


def _cmd_list(args) -> int:
    for name, path in builtin_experiments().items():
        desc = (read_yaml(path).get("description") or "").strip().splitlines()
        print(f"{name:<28} {desc[0] if desc else ''}")
    return 0


_COMMANDS = {"run": _cmd_run, "sweep": _cmd_sweep, "report": _cmd_report,
             "analyse": _cmd_analyse, "config": _cmd_config, "list": _cmd_list}


def main(argv: list[str] | None = None) -> int:
    """Run the ``jaxsens`` command line: ``run``, ``sweep``, ``report`` or ``list``.

    Configuration mistakes and a diverged training print one line to stderr instead of a
    traceback; an interrupted run can be resumed by running it again.

    Args:
      argv: the arguments after the program name (default: ``sys.argv[1:]``), e.g.
        ``["run", "noise_propagation", "--set", "train.epochs=3"]``.

    Returns:
      The exit status: 0 on success, 2 on a :class:`~jaxsens.config.ConfigError` (bad
      config, override, grid or run directory), 1 when training diverged, 130 when
      interrupted (Ctrl-C).

    Raises:
      SystemExit: from ``argparse``, for unknown commands or options (status 2) and for
        ``--help`` (status 0).
    """
    args = _parser().parse_args(argv)
    try:
        if args.command in ("run", "sweep", "analyse", "config") and args.config is not None:
            resolve_source(args.config)
        if args.command in ("run", "sweep", "analyse"):
            _select_device(args.device, args)
            enable_compilation_cache()
        return _COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"jaxsens: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"jaxsens: training stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxsens: interrupted; finished steps are saved, re-run to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
