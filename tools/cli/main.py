"""The ``pretrain`` console command: thin wrappers over functions tests call directly."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pretrain.tools.cli.args import Parser, positive_number


EXIT_USAGE = 2  # a config, option or path the user gave (argparse's own code for bad options)
EXIT_DATA = 3  # shards or samples that cannot serve the command
EXIT_CHECKPOINT = 4  # a run's checkpoints that cannot be read as asked
EXIT_ENVIRONMENT = 5  # the machine: a folder that cannot be written, a full or read-only disk (any OSError)
EXIT_TRAINING = 6  # a run that diverged (non-finite weights or steps) past what rollbacks could mend
DEBUG_ENV = "MEDPRETRAIN_DEBUG"  # set by --debug; rank processes inherit it


def _train(args: argparse.Namespace) -> int:
    import signal

    from pretrain.config import load_config
    from pretrain.engine.preemption import USER_SIGNALS, StopRequest
    from pretrain.tools.run import train_and_export

    cfg = load_config(args.config, args.overrides)
    stop = StopRequest().install(USER_SIGNALS)  # Ctrl-C / SIGTERM: checkpoint at the next step boundary
    summary = train_and_export(cfg, stop, export=not args.no_export)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if summary.get("interrupted"):
        sig = signal.Signals[summary["interrupted"]]
        if main_rank:
            print(f"pretrain train: stopped by {sig.name} after step {summary['steps']}, checkpointed in "
                  f"{cfg.train.run_dir}; run the same command to resume", file=sys.stderr)
        return 128 + sig  # as a shell reports a death by that signal: not a finished run
    if main_rank:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    print(f"\nrun directory : {summary['run_dir']}")
    loss = "n/a (last step skipped)" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    print(f"steps         : {summary['steps']}  ({summary['wall_seconds']:.0f} s)  final loss {loss}")
    ev = summary.get("eval") or {}
    if ev.get("pretrained"):
        rows = [(name, ev[key]) for name, key in (("raw pixels", "raw_pixels"), ("random init", "random_init"),
                                                  ("pretrained", "pretrained")) if ev.get(key)]
        print(f"held-out      : {'':12}{'linear':>8}{'kNN cls':>9}{'kNN mean':>10}")
        for name, r in rows:
            print(f"{'':16}{name:12}{pct(r['linear']):>8}{pct(r.get('knn_cls', r['knn'])):>9}{pct(r.get('knn_mean')):>10}")
        gain = ev.get("gain_over_baselines") or {}
        if gain:
            print(f"gain          : linear {100 * gain['linear']:+.1f} points, kNN {100 * gain['knn']:+.1f} points "
                  "over the better baseline")
        for name, r in rows:
            if "zeroshot" in r:
                chance = 5 / r["retrieval_pairs"] if r.get("retrieval_pairs") else None
                recall = (f", R@5 image->text {pct(r['i2t_r5'])} text->image {pct(r['t2i_r5'])} "
                          f"(chance {pct(chance)})" if chance else "")
                print(f"image-text    : {name:12}zero-shot {pct(r['zeroshot'])}{recall}")
    else:
        print(f"kNN top-1     : random init {pct(summary['knn_init'])}  ->  pretrained {pct(summary['knn_final'])}")
    print(f"tensorboard   : tensorboard --logdir {summary['tensorboard']}")
    print(f"checkpoint    : {summary['checkpoint']}")
    print(f"export        : {summary['export'] or 'not exported'}")
    print(f"summary       : {Path(summary['run_dir']) / 'summary.json'}")


def _random_init_objective(args: argparse.Namespace):
    """(objective at its seeded random init, config) for ``--random-init CONFIG [overrides]``."""
    import torch

    from pretrain.config import load_config
    from pretrain.objectives import build_objective

    # argparse hands the first override to the optional SOURCE positional: it is an override here
    overrides = ([args.source] if args.source else []) + list(args.overrides)
    cfg = load_config(args.random_init, overrides)
    torch.manual_seed(cfg.train.seed)
    return build_objective(cfg), cfg


def _eval_knn(args: argparse.Namespace) -> int:
    import torch

    from pretrain.data.transforms import eval_view
    from pretrain.eval.knn import knn_accuracy
    from pretrain.tools.export.encoder import load_encoder

    if args.random_init:
        objective, cfg = _random_init_objective(args)
        bundle = objective.eval_bundle()
        (_, encoder), intensity, pool = bundle.headline, cfg.data.intensity, bundle.pool
    else:
        encoder, intensity, pool = load_encoder(args.source)
        intensity = args.intensity or intensity
    pool = args.pool or pool  # default: as the objective pools in training, so summary.json's number comes back
    m = encoder.cfg
    size = m.img_size_tuple()

    def view(sample):
        return eval_view(sample["image"], size, m.in_chans, intensity, key=sample["__key__"])

    if args.eval_command == "probe":
        print(json.dumps(_probe(args, encoder, view, pool), indent=2))
        return 0
    acc = knn_accuracy(
        encoder, args.train, args.val, view, pool=pool, k=args.k, temperature=args.temperature,
        batch_size=args.batch_size, device=torch.device("cpu"),
    )
    print(json.dumps({"knn_top1": acc, "k": args.k, "temperature": args.temperature, "pool": pool}))
    return 0


def _probe(args: argparse.Namespace, encoder, view, pool: str) -> dict:
    """kNN (cls, mean) and a linear probe of ``encoder`` beside raw pixels and a random-init encoder of the
    same architecture (seed ``--seed``), as summary.json reports them."""
    import torch

    from pretrain.eval.frozen import FrozenEvalData, evaluate_baselines, evaluate_encoder, gains
    from pretrain.models.backbones import build_backbone

    data = FrozenEvalData(args.train, args.val, view, k=args.k, temperature=args.temperature, batch_size=args.batch_size)
    result = {"pretrained": evaluate_encoder(encoder, data, pool)}
    if not args.no_baselines:
        torch.manual_seed(args.seed)
        baselines = evaluate_baselines(build_backbone(encoder.cfg), data, pool)
        result.update(baselines, gain_over_baselines=gains(result["pretrained"], baselines))
    return result


def _eval_image_text(args: argparse.Namespace) -> int:
    """Zero-shot classification or image–text retrieval of an image–text run (CLIP) on labelled shards."""
    import torch

    from pretrain.config import ConfigError
    from pretrain.data.transforms import eval_view
    from pretrain.eval.image_text import evaluate_image_text
    from pretrain.storage.checkpoints import resolve_checkpoint
    from pretrain.tools.export.source import trained_objective

    if args.random_init:
        objective, cfg = _random_init_objective(args)
    else:
        objective, cfg = trained_objective(resolve_checkpoint(args.source))
    bundle = objective.eval_bundle()
    if bundle.embed_image is None:
        raise ConfigError(f"pretrain eval {args.eval_command}: the {cfg.objective.name} objective has no "
                          "image-text embedding space (a CLIP run has)")
    size, chans = cfg.model.img_size_tuple(), cfg.model.in_chans

    def view(sample):
        return eval_view(sample["image"], size, chans, cfg.data.intensity, key=sample["__key__"])

    result = evaluate_image_text(bundle, args.val, view, batch_size=args.batch_size, device=torch.device("cpu"))
    wanted = ("zeroshot",) if args.eval_command == "zeroshot" else ("i2t_", "t2i_", "retrieval_pairs")
    if args.eval_command == "retrieval" and "retrieval_pairs" not in result:
        raise ConfigError(f"pretrain eval retrieval: no sample of {args.val!r} carries a report (.txt)")
    print(json.dumps({k: v for k, v in result.items() if k.startswith(wanted)}, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from pretrain.tools.export.encoder import export_encoder

    print(export_encoder(args.source, args.out, encoder=args.encoder, target=args.target, license=args.license,
                         base_model=args.base_model, repo_id=args.repo_id))
    return 0


def _export_push(args: argparse.Namespace) -> int:
    from pretrain.tools.export.push import push

    files = push(args.path, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run)
    for name, size in files:
        print(f"{size:>14,}  {name}")
    total = sum(size for _, size in files)
    where = f"{args.repo_id}@{args.revision or 'main'}"
    print(f"{total:>14,}  {len(files)} files {'would be uploaded to' if args.dry_run else 'uploaded to'} {where}")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from pretrain.tools.demo.data import make_demo_data

    print(json.dumps(make_demo_data(args.out, scale=args.scale, seed=args.seed), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pretrain", description="medpretrain: pretrain medical-imaging encoders")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message "
                             f"(also: ${DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain (or resume) a run from a YAML config")
    p.add_argument("config", help="YAML config (configs/ holds one per method); `pretrain config explain` lists its keys")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.steps=100")
    p.add_argument("--no-export", action="store_true", help="skip the export at the end")
    p.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate an encoder").add_subparsers(dest="eval_command", required=True)
    _common = k = argparse.ArgumentParser(add_help=False)  # what every `eval` command takes
    k.add_argument("source", nargs="?", help="export folder, run directory or checkpoint folder")
    k.add_argument("--random-init", metavar="CONFIG", help="evaluate a random-init encoder built from CONFIG")
    k.add_argument("overrides", nargs="*", help="config overrides with --random-init")
    k.add_argument("--train", required=True, help="labelled shards: the kNN memory bank")
    k.add_argument("--val", required=True, help="labelled shards: the queries")
    k.add_argument("--k", type=positive_number(int), default=20, help="neighbours that vote")
    k.add_argument("--temperature", type=positive_number(float), default=0.07,
                   help="softmax temperature of the neighbours' cosine weights")
    k.add_argument("--pool", choices=["cls", "mean", "cls+mean"],
                   help="token pooling (default: the one the encoder's objective uses in training)")
    k.add_argument("--intensity", choices=["zscore", "range", "none"], help="default: the one the encoder was trained with")
    k.add_argument("--batch-size", type=positive_number(int), default=64, help="images per feature-extraction batch")
    k = ev.add_parser("knn", parents=[_common], help="weighted kNN top-1 of a frozen encoder on labelled shards")
    k.set_defaults(func=_eval_knn)
    pr = ev.add_parser("probe", parents=[_common],
                       help="kNN on class and mean patch tokens and a linear probe, beside raw pixels and random init")
    pr.add_argument("--no-baselines", action="store_true", help="skip the raw-pixel and random-init baselines")
    pr.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline")
    pr.set_defaults(func=_eval_knn)
    for name, what in (("zeroshot", "zero-shot accuracy from class prompts"),
                       ("retrieval", "image->text and text->image Recall@1/5/10 on image-report pairs")):
        it = ev.add_parser(name, help=f"{what} of an image-text (CLIP) run on labelled shards")
        it.add_argument("source", nargs="?", help="run directory or checkpoint folder of a CLIP run")
        it.add_argument("--random-init", metavar="CONFIG", help="evaluate a random-init model built from CONFIG")
        it.add_argument("overrides", nargs="*", help="config overrides with --random-init")
        it.add_argument("--val", required=True, help="labelled shards (with reports for retrieval)")
        it.add_argument("--batch-size", type=positive_number(int), default=64, help="images per embedding batch")
        it.set_defaults(func=_eval_image_text)
    from pretrain.tools.cli.eval_cmd import add_suite_parsers

    add_suite_parsers(ev)

    from pretrain.tools.ingest.cli import add_medical_parser, add_shards_parser

    shards = add_shards_parser(sub)
    add_medical_parser(shards)
    d = shards.add_parser("demo", help="generate the embedded synthetic demo data set as shards")
    d.add_argument("out", help="folder for the demo's shard sets, class prompts and text tower")
    d.add_argument("--scale", type=positive_number(float), default=1.0, help="multiply every split's sample count")
    d.add_argument("--seed", type=int, default=0, help="seed of the generated phantoms")
    d.set_defaults(func=_demo_data)

    e = sub.add_parser("export", help="export an encoder to a hub folder for timm, MONAI or open_clip (`export push` uploads it)")
    e.add_argument("source", help="run directory or checkpoint folder")
    e.add_argument("out", help="export folder (replaced once the new export is complete and verified)")
    e.add_argument("--encoder", help="which encoder of the objective (DINO: teacher | student); default: the headline")
    e.add_argument("--target", choices=["timm", "monai", "open_clip"], help="default: open_clip for 2D CLIP runs "
                   "(both towers), timm for other 2D ViTs and timm: backbones, MONAI for 3D ViTs and monai: backbones")
    e.add_argument("--license", default="other", help="licence field of the model card (e.g. apache-2.0, cc-by-nc-4.0)")
    e.add_argument("--base-model", help="hub id of the weights the run continued from (model card metadata)")
    e.add_argument("--repo-id", help="OWNER/NAME the export will be pushed to (used in the card's snippets)")
    e.set_defaults(func=_export)
    pu = sub.add_parser("export-push", help=argparse.SUPPRESS)  # reached as `pretrain export push`, see main()
    pu.prog = "pretrain export push"
    pu.add_argument("path", help="export folder")
    pu.add_argument("repo_id", help="OWNER/NAME on the Hugging Face hub (created when missing)")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pu.add_argument("--revision", help="branch to push to (created when missing); default main")
    pu.add_argument("--dry-run", action="store_true", help="list every file and its size; upload nothing")
    pu.set_defaults(func=_export_push)

    from pretrain.tools.cli.config_cmd import add_config_parser

    add_config_parser(sub)
    from pretrain.launch.cli import add_launch_parser

    add_launch_parser(sub)
    from pretrain.tools.bench.cli import add_bench_parser

    add_bench_parser(sub)
    from pretrain.tools.scaling.cli import add_scaling_parser

    add_scaling_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("MEDPRETRAIN_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["export", "push"]:  # a sub-command of export beside export's own positionals
        argv = ["export-push", *argv[2:]]
    args = build_parser().parse_args(argv)
    if args.command == "eval" and not args.random_init and not args.source:
        print(f"pretrain eval {args.eval_command}: give SOURCE or --random-init CONFIG", file=sys.stderr)
        return 2
    debug_before = os.environ.get(DEBUG_ENV)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"  # for the rank processes a launcher starts from here
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:
        code = None if os.environ.get(DEBUG_ENV) else error_exit_code(e)
        if code is None:
            raise
        return code
    finally:
        if debug_before is None:  # an in-process caller (tests, notebooks) keeps its environment
            os.environ.pop(DEBUG_ENV, None)


def error_exit_code(e: BaseException) -> int | None:
    """Print the one-line message of an error a user can cause and return its exit code; None for others
    (bugs keep their traceback)."""
    from pretrain.config import ConfigError
    from pretrain.data.codec import SampleDecodeError
    from pretrain.data.errors import DataError
    from pretrain.data.manifest import ManifestError
    from pretrain.engine.nonfinite import TrainingDiverged
    from pretrain.storage.checkpoints import CheckpointError
    from pretrain.tools.export.encoder import ExportError
    from pretrain.tools.export.push import PushError
    from pretrain.tools.scaling.cli import ScalingError

    classes = [
        ((ConfigError, FileNotFoundError, ExportError, PushError, ScalingError), "error", EXIT_USAGE),
        ((DataError, ManifestError, SampleDecodeError), "data error", EXIT_DATA),
        ((CheckpointError,), "checkpoint error", EXIT_CHECKPOINT),
        ((TrainingDiverged,), "training stopped", EXIT_TRAINING),
        ((OSError,), "environment error", EXIT_ENVIRONMENT),  # after FileNotFoundError, an OSError too
    ]
    for types, label, code in classes:
        if isinstance(e, types):
            print(f"pretrain: {label}: {_describe_error(e)}", file=sys.stderr)
            return code
    return None


def _describe_error(e: BaseException) -> str:
    """The message, with an OSError's file and errno spelled out (``str()`` of some omits the path)."""
    import errno

    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.errno is not None and e.filename:
        hint = {errno.ENOSPC: "; free space on that filesystem", errno.EFBIG: "; the file size limit was reached",
                errno.EACCES: "; check its permissions", errno.EROFS: "; the filesystem is read-only"}
        return f"{e.filename}: {e.strerror}{hint.get(e.errno, '')}"
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
