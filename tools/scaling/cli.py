"""``pretrain scaling plan | collect | fit | predict``: IsoFLOP studies from the plan to the fitted law."""
from __future__ import annotations

import argparse
import sys


class ScalingError(ValueError):
    """A plan, table or fit that cannot be made as asked; the CLI prints the message as one line."""


def _plan(args: argparse.Namespace) -> int:
    from pretrain.tools.scaling.plan import describe, plan, write_plan

    try:
        sweep, notes = plan(args.config, args.overrides, args.budgets, args.models, patch_sizes=args.patch_sizes,
                            warmup_fraction=args.warmup_fraction, min_steps=args.min_steps,
                            world_size=args.world_size, name=args.name, max_concurrent=args.max_concurrent)
    except ValueError as e:
        raise ScalingError(str(e)) from None
    out = write_plan(sweep, args.out)
    print(describe(sweep))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{len(sweep['points'])} runs -> {out}\nrun them: pretrain launch slurm {args.config} --sweep {out} "
          "--time ... (or one by one with pretrain launch local)")
    return 0


def _collect(args: argparse.Namespace) -> int:
    from pretrain.tools.scaling.collect import collect, write_table

    try:
        rows, refused = collect(args.runs, skip_unfinished=args.skip_unfinished)
    except ValueError as e:
        raise ScalingError(str(e)) from None
    for line in refused:
        print(f"skipped {line}", file=sys.stderr)
    print(f"{len(rows)} runs -> {write_table(rows, args.out)}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from pretrain.tools.scaling.collect import read_table
    from pretrain.tools.scaling.fit import fit_table, write_fit

    rows = read_table(args.table)
    try:
        result = fit_table(rows, loss=args.loss, bootstrap=args.bootstrap, grid=args.grid,
                           drop_highest=args.drop_highest_loss, level=args.level, predict_compute=args.predict_compute,
                           metrics=args.metrics, seed=args.seed)
    except ValueError as e:
        raise ScalingError(f"{args.table}: {e}") from None
    out = write_fit(rows, result, args.out, title=args.title, plots=not args.no_plots)
    law = result["law"]
    for name in ("E", "A", "B", "alpha", "beta"):
        iv = law.get("intervals", {}).get(name)
        print(f"{name:>5} = {law['params'][name]:.4g}" + (f"  [{iv[0]:.4g}, {iv[1]:.4g}]" if iv else ""))
    for entry in result["predictions"]:
        n, d, loss = entry["N"], entry["D"], entry["loss"]
        print(f"C = {entry['compute']:.3g}: N* = {n['estimate']:.3g}, D* = {d['estimate']:.3g}, "
              f"L* = {loss['estimate']:.4g}" + (f" [{loss['interval'][0]:.4g}, {loss['interval'][1]:.4g}]"
                                                 if "interval" in loss else ""))
    print(f"report -> {out / 'report.md'}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pretrain.tools.scaling.law import LawFit, optimal_with_intervals

    path = Path(args.fit)
    if not path.is_file():
        raise FileNotFoundError(f"fit not found: {path} (write one with pretrain scaling fit)")
    result = json.loads(path.read_text())
    law, fm = LawFit.from_dict(result["law"]), result["flops_model"]
    if not args.compute and not args.at:
        raise ScalingError("give --compute C [C ...] and/or --at N,D [N,D ...]")
    for c in args.compute or []:
        e = optimal_with_intervals(law, c, fm["k"], fm["gamma"], args.level)
        cell = lambda v: f"{v['estimate']:.4g}" + (f" [{v['interval'][0]:.4g}, {v['interval'][1]:.4g}]" if "interval" in v else "")  # noqa: E731
        print(f"C = {c:.3g}: N* = {cell(e['N'])}, D* = {cell(e['D'])}, L* = {cell(e['loss'])}")
    for text in args.at or []:
        try:
            n, d = (float(v) for v in text.split(","))
        except ValueError:
            raise ScalingError(f"--at {text!r}: N,D (two numbers)") from None
        est, lo, hi = law.predict(n, d, args.level)
        print(f"N = {n:.3g}, D = {d:.3g}: L = {float(est):.4g} [{float(lo):.4g}, {float(hi):.4g}]")
    return 0


def add_scaling_parser(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser("scaling", help="scaling-law studies: plan an IsoFLOP grid, collect runs, fit, predict")
    sub = s.add_subparsers(dest="scaling_command", required=True)
    p = sub.add_parser("plan", help="an IsoFLOP grid (budgets x model shapes) as a sweep file for launch --sweep")
    p.add_argument("config", help="run config every point starts from")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every point (written into the sweep file)")
    p.add_argument("--budgets", type=float, nargs="+", required=True, help="compute budgets in FLOPs, e.g. 1e15 3e15")
    p.add_argument("--models", nargs="+", required=True,
                   help="model shapes: presets (nano micro tiny small base ...) or WIDTHxDEPTH[xHEADS]")
    p.add_argument("--patch-sizes", type=int, nargs="+", help="also vary model.patch_size over these")
    p.add_argument("--warmup-fraction", type=float, default=0.05, help="warm-up steps as a fraction of each run")
    p.add_argument("--min-steps", type=int, default=20, help="leave out points with fewer steps")
    p.add_argument("--world-size", type=int, default=1, help="ranks each run will have (global batch = per rank x this)")
    p.add_argument("--max-concurrent", type=int, help="array tasks running at once")
    p.add_argument("--name", default="scaling", help="sweep name: runs go under runs/<name>/")
    p.add_argument("--out", required=True, help="sweep file to write (YAML)")
    p.set_defaults(func=_plan)

    c = sub.add_parser("collect", help="one table (N, D, C, losses, evaluation) of finished runs; refuses unfinished ones")
    c.add_argument("runs", nargs="+", help="run directories or sweep directories (with sweep.json)")
    c.add_argument("--out", required=True, help="table to write: .csv or .json")
    c.add_argument("--skip-unfinished", action="store_true", help="collect the finished runs, list the others")
    c.set_defaults(func=_collect)

    f = sub.add_parser("fit", help="fit L(N, D), IsoFLOP parabolas and downstream laws with bootstrap intervals")
    f.add_argument("table", help="a table from scaling collect (.csv or .json; columns N, D, C and a loss)")
    f.add_argument("--out", required=True, help="folder for fit.json, report.md, the figures and tb/")
    f.add_argument("--loss", help="loss column (default: smoothed_loss, else final_loss, else loss)")
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (0: no intervals)")
    f.add_argument("--grid", choices=["full", "coarse"], default="full",
                   help="L-BFGS starts: Besiroglu et al.'s 4,500-point grid or a 72-point one")
    f.add_argument("--drop-highest-loss", type=int, default=0, help="leave out the K runs with the highest loss")
    f.add_argument("--level", type=float, default=0.95, help="interval level")
    f.add_argument("--predict-compute", type=float, nargs="*", default=[], help="budgets to predict N*, D*, L* for")
    f.add_argument("--metrics", nargs="*", default=["knn", "linear"], help="downstream columns for saturating laws")
    f.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    f.add_argument("--title", default="Scaling study", help="title of the report and its figures")
    f.add_argument("--no-plots", action="store_true", help="write fit.json and report.md without figures")
    f.set_defaults(func=_fit)

    r = sub.add_parser("predict", help="N*, D*, L* for a budget, or L at (N, D), from a fit.json, with intervals")
    r.add_argument("fit", help="fit.json written by scaling fit")
    r.add_argument("--compute", type=float, nargs="*", help="budgets in FLOPs")
    r.add_argument("--at", nargs="*", help="N,D pairs")
    r.add_argument("--level", type=float, default=0.95, help="interval level")
    r.set_defaults(func=_predict)
