"""``pretrain bench {data,step,kernels,shards,lvm-solver,faults}``: benchmarks that write JSON results."""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from pretrain.tools.bench import common
from pretrain.tools.bench.common import (DEFAULT_CONFIG, LVM_CONFIG, BenchInputError, default_out, load_average, new_result,
                                         recorded_path, write_result)
from pretrain.tools.cli.args import HelpFormatter, positive_number

# --- command line ---------------------------------------------------------------------------
def _int_list(choices: Sequence[int] | None = None):
    """A comma-separated list of positive ints (``1,2``); a list keeps the trailing overrides unambiguous."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints") from None
        bad = [v for v in values if v <= 0 or (choices is not None and v not in choices)]
        if not values or bad:
            allowed = f"from {', '.join(map(str, choices))}" if choices else "> 0"
            raise argparse.ArgumentTypeError(f"{text!r}: every value must be {allowed}")
        return sorted(set(values))

    return parse


_PATH_OPTIONS = ("config", "shards", "shards_2d", "shards_3d", "out")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed command-line options, as they go into the result (paths as :func:`recorded_path` writes them)."""
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "bench_command")}
    return {k: recorded_path(v) if k in _PATH_OPTIONS and isinstance(v, str) else v for k, v in options.items()}


def _reported(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad benchmark input ends the command with its message and exit code 2, not a traceback."""
    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except BenchInputError as e:
            print(f"pretrain bench {args.bench_command}: error: {e}", file=sys.stderr)
            return 2

    return wrapper


def _record(args: argparse.Namespace, name: str, result: dict[str, Any], load_before: list[float] | None,
            print_summary: Callable[[dict[str, Any]], None]) -> int:
    """Add the common head (device, versions, options, load) to a result, write it, print its summary."""
    result = {**new_result(name, _options(args), load_before), **result}
    out = write_result(result, args.out or default_out(name))
    print_summary(result)
    print(f"result: {out}")
    return 0


@_reported
def _bench_data(args: argparse.Namespace) -> int:
    from pretrain.tools.bench.data import print_data_summary, run_data_bench

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="medpretrain-bench-data-") as tmp:
        result = run_data_bench(
            config=args.config, overrides=args.overrides, shards_2d=args.shards_2d, shards_3d=args.shards_3d,
            dims=args.dims, workers=args.workers, seconds=args.seconds, repeats=args.repeats,
            warmup_batches=args.warmup_batches, batch_size=args.batch_size, demo_samples=args.demo_samples,
            scratch=Path(tmp), progress=not args.quiet,
        )
    return _record(args, "data", result, load_before, print_data_summary)


@_reported
def _bench_step(args: argparse.Namespace) -> int:
    from pretrain.tools.bench.step import print_step_summary, run_step_bench

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="medpretrain-bench-step-") as tmp:
        result = run_step_bench(
            config=args.config, overrides=args.overrides, batch_size=args.batch_size, rounds=args.rounds,
            steps=args.steps, warmup=args.warmup, threads=args.threads, shards=args.shards,
            profile_steps_per_side=args.profile, scratch=Path(tmp),
        )
    return _record(args, "step", result, load_before, print_step_summary)


@_reported
def _bench_kernels(args: argparse.Namespace) -> int:
    from pretrain.tools.bench.kernels import print_kernels_summary, run_kernels_bench

    load_before = load_average()
    result = run_kernels_bench(dtype=args.dtype, tokens_per_batch=args.tokens_per_batch,
                               patch_batch=args.patch_batch, repeats=args.repeats, warmup=args.warmup)
    return _record(args, "kernels", result, load_before, print_kernels_summary)


@_reported
def _bench_shards(args: argparse.Namespace) -> int:
    from pretrain.tools.bench.shards import print_shards_summary, run_shards_bench

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="medpretrain-bench-shards-") as tmp:
        result = run_shards_bench(series=args.series, slices=args.slices, workers=args.workers,
                                  repeats=args.repeats, scratch=Path(tmp))
    return _record(args, "shards", result, load_before, print_shards_summary)


@_reported
def _bench_lvm_solver(args: argparse.Namespace) -> int:
    from pretrain.tools.bench.lvm_solver import print_lvm_solver_summary, run_lvm_solver_bench

    load_before = load_average()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run_lvm_solver_bench(config=args.config, overrides=args.overrides, sizes=args.sizes,
                                  instances=args.instances, restarts=args.restarts, sigmas=args.sigmas,
                                  batch_sizes=args.batch_sizes, repeats=args.repeats, seed=args.seed)
    return _record(args, "lvm-solver", result, load_before, print_lvm_solver_summary)


@_reported
def _bench_faults(args: argparse.Namespace) -> int:
    from pretrain.tools.bench.faults import SCENARIOS, faults_markdown, run_faults_bench

    unknown = sorted(set(args.only or []) - set(SCENARIOS))
    if unknown:
        raise BenchInputError(f"--only: no scenario {unknown}; known: {', '.join(SCENARIOS)}")
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="medpretrain-bench-faults-") as tmp:
        result = run_faults_bench(Path(tmp), only=args.only, seed=args.seed, kill_trials=args.kill_trials)

    def summary(full: dict[str, Any]) -> None:
        markdown = Path(args.out or default_out("faults")).with_suffix(".md")
        markdown.write_text(faults_markdown(full))
        s = full["summary"]
        print(f"{s['trials']} trials: {s['clean message']} clean messages, {s['recovered']} recovered, "
              f"{s['failures']} failures; table: {markdown}")

    code = _record(args, "faults", result, load_before, summary)
    return code if result["summary"]["failures"] == 0 else 1


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 0")
    return values


def add_bench_parser(subparsers: Any) -> Any:
    """Register ``pretrain bench {data,step,kernels,shards,lvm-solver,faults}`` on an argparse subparsers object; returns the group."""
    parser = subparsers.add_parser("bench", help="benchmark the data loaders, the trainer's step overhead, kernels, shard conversion, LVM-Med's solver; "
                                   "inject faults",
                                   description=common.__doc__, formatter_class=HelpFormatter)
    actions = parser.add_subparsers(dest="bench_command", required=True)

    data = actions.add_parser("data", help="samples/s per core of the 2D and 3D loaders")
    data.add_argument("overrides", nargs="*", help="dotted config overrides applied to both loaders")
    data.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (default: configs/demo.yaml)")
    data.add_argument("--shards-2d", metavar="DIR", help="2D shard set to read (default: generated demo shards)")
    data.add_argument("--shards-3d", metavar="DIR", help="3D shard set to read (default: generated demo shards)")
    data.add_argument("--dims", type=_int_list((2, 3)), default=[2, 3], help="loaders to measure (default: 2,3)")
    data.add_argument("--workers", type=_int_list(), default=[1, 2],
                      help="DataLoader worker counts to measure (default: 1,2)")
    data.add_argument("--seconds", type=positive_number(float), default=10.0, help="budget per measurement (default: 10)")
    data.add_argument("--repeats", type=positive_number(int), default=3, help="measurements per setting (default: 3)")
    data.add_argument("--warmup-batches", type=positive_number(int), default=3, help="batches before timing (default: 3)")
    data.add_argument("--batch-size", type=positive_number(int), help="default: the config's data.batch_size")
    data.add_argument("--demo-samples", type=positive_number(int), default=1000,
                      help="samples per generated demo shard set (default: 1000, i.e. 2 shards)")
    data.add_argument("--quiet", action="store_true", help="no progress bar while generating demo shards")
    data.add_argument("--out", help="JSON result path (default: benchmarks/bench-data-<device>.json)")
    data.set_defaults(func=_bench_data)

    faults = actions.add_parser("faults", help="inject every fault class into real commands; JSON + markdown report")
    faults.add_argument("--only", type=lambda t: [v for v in t.split(",") if v], metavar="A,B",
                        help="only these scenarios (default: all)")
    faults.add_argument("--seed", type=int, default=0, help="seed of the random kill steps (default: 0)")
    faults.add_argument("--kill-trials", type=positive_number(int), default=3,
                        help="SIGKILLs at random steps (default: 3)")
    faults.add_argument("--out", help="JSON result path (default: benchmarks/bench-faults-<device>.json; the table "
                                      "beside it as .md)")
    faults.set_defaults(func=_bench_faults)

    step = actions.add_parser("step", help="trainer step time against a bare PyTorch loop on the same batch")
    step.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.preset=nano")
    step.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (default: configs/demo.yaml)")
    step.add_argument("--batch-size", type=positive_number(int), help="default: the config's data.batch_size")
    step.add_argument("--rounds", type=positive_number(int), default=10, help="alternating rounds (default: 10)")
    step.add_argument("--steps", type=positive_number(int), default=5, help="steps per side per round (default: 5)")
    step.add_argument("--warmup", type=positive_number(int), default=3, help="untimed steps per side first (default: 3)")
    step.add_argument("--threads", type=positive_number(int),
                      help="torch threads for both sides (default: train.threads, else torch's default); on a "
                           "shared machine use the cores that are free: oversubscribed threads slow both sides "
                           "many times over and drown the ratio in noise")
    step.add_argument("--shards", metavar="DIR", help="shards for the fixed batch (default: generated demo shards)")
    step.add_argument("--profile", type=int, default=0, metavar="N",
                      help="also cProfile N steps of each side and record where the time goes")
    step.add_argument("--out", help="JSON result path (default: benchmarks/bench-step-<device>.json)")
    step.set_defaults(func=_bench_step)

    kern = actions.add_parser("kernels", help="attention and patch embedding, every usable backend side by side")
    kern.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                      help="default: bfloat16 on CUDA, float32 on CPU")
    kern.add_argument("--tokens-per-batch", type=positive_number(int),
                      help="attention batch = this // sequence length (default: 32768 on CUDA, 512 on CPU)")
    kern.add_argument("--patch-batch", type=positive_number(int), help="patch-embedding batch (default: 32 CUDA, 1 CPU)")
    kern.add_argument("--repeats", type=positive_number(int), default=10, help="timed calls per measurement (default: 10)")
    kern.add_argument("--warmup", type=positive_number(int), default=3, help="untimed calls first (default: 3)")
    kern.add_argument("--out", help="JSON result path (default: benchmarks/bench-kernels-<device>.json)")
    kern.set_defaults(func=_bench_kernels)

    shards = actions.add_parser("shards", help="DICOM-to-shard conversion: files/s and MB/s per worker count")
    shards.add_argument("--series", type=positive_number(int), default=20, help="CT series to build (default: 20)")
    shards.add_argument("--slices", type=positive_number(int), default=32, help="slices per series (default: 32)")
    shards.add_argument("--workers", type=_int_list(), default=[1, 2],
                        help="conversion processes to compare (default: 1,2)")
    shards.add_argument("--repeats", type=positive_number(int), default=2, help="conversions per setting (default: 2)")
    shards.add_argument("--out", help="JSON result path (default: benchmarks/bench-shards-<device>.json)")
    shards.set_defaults(func=_bench_shards)

    lvm = actions.add_parser("lvm-solver", help="LVM-Med's QAP solver: optimality gap, planted recovery, cost per batch")
    lvm.add_argument("overrides", nargs="*", help="dotted config overrides (objective.solver.*, model.*)")
    lvm.add_argument("--config", default=str(LVM_CONFIG), help="LVM-Med run config (default: configs/lvm_med/demo.yaml)")
    lvm.add_argument("--sizes", type=_int_list(), default=[4, 6, 8, 16],
                     help="group sizes n; exact optimum by enumeration up to 8 (default: 4,6,8,16)")
    lvm.add_argument("--instances", type=positive_number(int), default=100, help="instances per setting (default: 100)")
    lvm.add_argument("--restarts", type=positive_number(int), default=50,
                     help="random restarts of the stronger search for n > 8 (default: 50)")
    lvm.add_argument("--sigmas", type=_float_list, default=[0.25, 0.5, 1.0, 1.5, 2.0],
                     help="noise of the planted matchings' second view (default: 0.25,0.5,1,1.5,2)")
    lvm.add_argument("--batch-sizes", type=_int_list(), default=[16, 32, 64, 128, 256],
                     help="per-rank batch sizes whose step cost is measured (default: 16,32,64,128,256)")
    lvm.add_argument("--repeats", type=positive_number(int), default=3, help="timed steps per batch size (default: 3)")
    lvm.add_argument("--threads", type=positive_number(int), help="torch threads (default: torch's default)")
    lvm.add_argument("--seed", type=int, default=0, help="seed of the instances (default: 0)")
    lvm.add_argument("--out", help="JSON result path (default: benchmarks/bench-lvm-solver-<device>.json)")
    lvm.set_defaults(func=_bench_lvm_solver)
    return actions
