"""``pretrain eval suite|linear|fewshot|segment|finetune SOURCE`` and ``pretrain eval compare``: the evaluation
suite (``pretrain.eval.suite``) on a run or export beside random init and raw pixels, with intervals."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SINGLE = {"linear": ("linear",), "fewshot": ("fewshot",), "segment": ("segment",), "finetune": ("finetune",)}


def _subjects(args: argparse.Namespace):
    """(subjects, model config, intensity, pretrained encoder, device) for SOURCE or --random-init CONFIG."""
    import torch

    from pretrain.eval.suite import Subject
    from pretrain.models.backbones import build_backbone
    from pretrain.objectives import build_objective
    from pretrain.storage.checkpoints import resolve_checkpoint
    from pretrain.tools.export.layout import export_meta, is_export
    from pretrain.tools.export.source import trained_objective

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def random_bundle(cfg):
        torch.manual_seed(args.seed)
        return build_objective(cfg).to(device).eval_bundle()

    if args.random_init:
        from pretrain.config import load_config

        cfg = load_config(args.random_init, ([args.source] if args.source else []) + list(args.overrides))
        bundle = random_bundle(cfg)
        model_cfg, intensity, head, head_bundle = cfg.model, cfg.data.intensity, bundle.headline[1], bundle
        run_cfg = cfg
    elif is_export(Path(args.source)):
        from pretrain.tools.export.encoder import load_exported_encoder

        head = load_exported_encoder(Path(args.source)).to(device)
        model_cfg, head_bundle, run_cfg = head.cfg, None, None
        meta = export_meta(Path(args.source))
        intensity, pool = meta.get("preprocessing", {}).get("intensity", "zscore"), meta.get("pool", "cls")
    else:
        objective, run_cfg = trained_objective(resolve_checkpoint(args.source))
        head_bundle = objective.to(device).eval_bundle()
        head, model_cfg, intensity = head_bundle.headline[1], run_cfg.model, run_cfg.data.intensity
    if head_bundle is not None:
        pool = head_bundle.pool
    intensity = args.intensity or intensity
    subjects = [Subject("pretrained" if not args.random_init else "random_init", head, head_bundle)]
    if not args.no_baselines and not args.random_init:
        torch.manual_seed(args.seed)
        rand = build_backbone(model_cfg).to(device)
        rand_bundle = random_bundle(run_cfg) if run_cfg is not None and head_bundle.embed_image is not None else None
        subjects += [Subject("random_init", rand, rand_bundle), Subject("raw_pixels")]
    if "finetune" in args.protocols:
        _attach_finetune(args, subjects, model_cfg, intensity, pool)
    return subjects, model_cfg, intensity, head, device


def _attach_finetune(args, subjects, model_cfg, intensity, pool) -> None:
    """Each encoder subject fine-tunes from its own weights (saved beside its run, so the random-init run starts
    from the very encoder the frozen protocols read), all with the pretrained method's pooling."""
    from safetensors.torch import save_file

    from pretrain.eval.finetune import finetune_and_predict

    sets = {"val": args.val, **({"test": args.test} if args.test else {})}
    root = Path(args.out) / "finetune"
    for s in subjects:
        if s.encoder is None:
            continue
        root.mkdir(parents=True, exist_ok=True)
        init = root / f"{s.name}_init.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in s.encoder.state_dict().items()}, str(init))
        s.finetune = lambda init=init, out=root / s.name, pool=pool: finetune_and_predict(
            str(init), model_cfg, args.train, sets, str(out), steps=args.finetune_steps, intensity=intensity,
            seed=args.seed, pool=pool, overrides=list(args.finetune_override or []))


def _eval_suite(args: argparse.Namespace) -> int:
    from pretrain.config.typed import ConfigError
    from pretrain.eval.features import default_cache_dir
    from pretrain.eval.report import markdown_table
    from pretrain.eval.suite import PROTOCOLS, SuiteData, run_suite

    args.protocols = SINGLE.get(args.eval_command) or tuple(args.protocols or PROTOCOLS)
    if not args.out:
        raise ConfigError(f"pretrain eval {args.eval_command}: give --out DIR for the results (and fine-tuning runs)")
    subjects, model_cfg, intensity, head, device = _subjects(args)
    protocols = args.protocols
    if args.eval_command == "suite" and not args.protocols_given:  # all: image-text ones only where they apply
        if subjects[0].bundle is None or subjects[0].bundle.embed_image is None:
            protocols = tuple(p for p in protocols if p not in ("zeroshot", "retrieval"))
    data = SuiteData(args.train, args.val, args.test, tuple(model_cfg.img_size_tuple()), model_cfg.in_chans, intensity,
                     grid=tuple(head.grid_size()), batch_size=args.batch_size,
                     cache_dir=None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
                     n_boot=args.bootstrap, seed=args.seed,
                     options={"fewshot": {"seeds": args.fewshot_seeds}}, device=device)
    try:
        result = run_suite(subjects, data, protocols, log=lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as e:
        raise ConfigError(f"pretrain eval {args.eval_command}: {e}") from e
    result["source"] = args.source or args.random_init
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(result)
    (out / "results.md").write_text(f"# Evaluation of `{result['source']}`\n\n" + table)
    print(table)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0


def _eval_compare(args: argparse.Namespace) -> int:
    from pretrain.config.typed import ConfigError
    from pretrain.eval.report import compare_table

    results: dict[str, Any] = {}
    for path in args.results:
        p = Path(path)
        p = p / "results.json" if p.is_dir() else p
        if not p.is_file():
            raise ConfigError(f"pretrain eval compare: {path}: no results.json (written by `pretrain eval suite --out`)")
        try:
            results[str(path)] = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"pretrain eval compare: {p} is not JSON: {e}") from e
    print(compare_table(results))
    return 0


class _Protocols(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.protocols_given = True


def add_suite_parsers(ev: Any) -> None:
    from pretrain.eval.suite import PROTOCOLS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("source", nargs="?", help="export folder, run directory or checkpoint folder")
    common.add_argument("--random-init", metavar="CONFIG", help="evaluate a random-init encoder built from CONFIG")
    common.add_argument("overrides", nargs="*", help="config overrides with --random-init")
    common.add_argument("--train", required=True, help="labelled shards: what probes train on")
    common.add_argument("--val", required=True, help="labelled shards: where choices are made when --test is given, "
                        "else where results are reported (choices then on a held-out fifth of --train)")
    common.add_argument("--test", help="labelled shards: where results are reported")
    common.add_argument("--out", help="folder for results.json, results.md and fine-tuning runs")
    common.add_argument("--intensity", choices=["zscore", "range", "none"], help="default: as the encoder was trained")
    common.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    common.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline, splits and draws (default 0)")
    common.add_argument("--no-baselines", action="store_true", help="skip the random-init and raw-pixel baselines")
    common.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates per interval (default 1000)")
    common.add_argument("--cache-dir", help="feature cache (default $MEDPRETRAIN_CACHE/features or ~/.cache/medpretrain/features)")
    common.add_argument("--no-cache", action="store_true", help="extract features without reading or writing the cache")
    common.add_argument("--fewshot-seeds", type=int, default=5, help="draws per few-shot setting (default 5)")
    common.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning optimizer steps (default 300)")
    common.add_argument("--finetune-override", action="append", metavar="KEY=VALUE",
                        help="config override of the fine-tuning runs (repeatable), e.g. optim.lr=1e-3")
    s = ev.add_parser("suite", parents=[common], help="every protocol beside random init and raw pixels, with intervals")
    s.add_argument("--protocols", nargs="+", choices=PROTOCOLS, action=_Protocols,
                   help=f"default: all that apply ({' '.join(PROTOCOLS)})")
    s.set_defaults(func=_eval_suite, protocols_given=False)
    what = {"linear": "linear probe (DINOv2's grid of feature sets and weight decays)",
            "fewshot": "few-shot probes: 1-16 shots per class and 1/10/100 %% of the labels, several draws",
            "segment": "dense probe: a linear head on frozen patch tokens, Dice and IoU per class",
            "finetune": "end-to-end fine-tuning (layer-wise lr decay, drop path), resumable like pretraining"}
    for name, help_ in what.items():
        p = ev.add_parser(name, parents=[common], help=f"{help_}, beside the baselines, with intervals")
        p.set_defaults(func=_eval_suite, protocols=None, protocols_given=True)
    c = ev.add_parser("compare", help="several `eval suite` results side by side")
    c.add_argument("results", nargs="+", help="results.json files or the --out folders holding them")
    c.set_defaults(func=_eval_compare, random_init=None, source="compare")
