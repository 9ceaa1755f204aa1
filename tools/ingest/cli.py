"""``pretrain shards {write,verify,medical}``: the command line of ingestion.

Plain image folders go to ``images.write_shards``; folders holding DICOM or
NIfTI files (recognised by content) go to ``medical.write_medical_shards``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pretrain.data.manifest import verify_shards
from pretrain.tools.cli.args import positive_number
from pretrain.tools.ingest import images, medical
from pretrain.tools.ingest.images import write_shards
from pretrain.tools.ingest.medical import holds_medical_files, write_medical_shards
from pretrain.tools.ingest.medical_inputs import PRESETS


def add_shards_parser(subparsers: Any) -> Any:
    """Register ``pretrain shards {write,verify}`` on an argparse subparsers object.

    Returns the ``shards`` sub-command group so callers can add more actions;
    ``write`` and ``verify`` run ``shards_main``.
    """
    parser = subparsers.add_parser(
        "shards",
        help="write or verify webdataset shards",
        description=images.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="shards_action", required=True, metavar="{write,verify,demo,medical}")
    write = actions.add_parser("write", help="convert a folder of images into shards + manifest.json")
    write.add_argument("src", metavar="SRC", help="folder of .png/.jpg/.tif/.npy files (searched recursively)")
    write.add_argument("out", metavar="OUT", help="folder to write the shards and manifest.json into")
    write.add_argument("--labels", metavar="CSV", help="CSV with columns path,label[,spacing]")
    write.add_argument("--samples-per-shard", type=positive_number(int), default=1000, metavar="N", help="default: 1000")
    write.add_argument(
        "--shard-mb", type=positive_number(float), default=256.0, metavar="MB", help="shard size limit in MiB (default: 256)"
    )
    write.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    write.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    write.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    medical_group = write.add_argument_group("DICOM / NIfTI folders (recognised by content; converted per patient split)")
    add_medical_options(medical_group, labels_flag=True)
    verify = actions.add_parser("verify", help="check every shard's size and sha256 against manifest.json")
    verify.add_argument("out", metavar="OUT", help="shard folder holding manifest.json")
    write.set_defaults(func=shards_main)
    verify.set_defaults(func=shards_main)
    return actions


def shards_main(args: argparse.Namespace) -> int:
    """Run a parsed ``pretrain shards`` command; returns the exit code."""
    try:
        if args.shards_action == "verify":
            bad = verify_shards(args.out)
            if bad:
                print(f"{len(bad)} damaged or missing shard(s) in {args.out}: {', '.join(bad)}")
            else:
                print(f"all shards intact in {args.out}")
            return 1 if bad else 0
        if Path(args.src).is_dir() and holds_medical_files(args.src):
            return medical_main(args)  # DICOM series / NIfTI volumes: the medical converter, no flag needed
        manifest = write_shards(
            args.src,
            args.out,
            labels_csv=args.labels,
            max_samples_per_shard=args.samples_per_shard,
            max_shard_bytes=max(1, int(args.shard_mb * 2**20)),
            prefix=args.prefix,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as e:
        raise SystemExit(f"pretrain shards: error: {e}") from e
    print(
        f"{manifest['num_samples']} samples, {manifest['num_failed']} failed, "
        f"{len(manifest['shards'])} shards -> {args.out}"
    )
    return 0


def add_medical_options(p: argparse.ArgumentParser, *, labels_flag: bool = False) -> None:
    """The options of a medical conversion, shared by ``shards medical`` and ``shards write``."""
    if not labels_flag:  # `shards write` already has --labels, which it passes on as the reports table
        p.add_argument("--reports", metavar="FILE", help="CSV or JSONL: series_uid|study_uid|path, report, label, patient")
    p.add_argument("--splits", default=None, metavar="TR,VA,TE", help="patient-level split ratios (default: all train)")
    p.add_argument(
        "--spacing", type=positive_number(float), nargs=3, metavar=("D", "H", "W"), help="resample to this spacing (mm)"
    )
    p.add_argument("--preset", choices=PRESETS, help="intensity preset recorded in sample metadata")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="conversion processes (default: all CPUs)")
    p.add_argument("--salt-file", metavar="PATH", help="file holding the secret salt (else $MEDPRETRAIN_SALT)")


def add_medical_parser(shards_actions: Any) -> argparse.ArgumentParser:
    """Register ``pretrain shards medical`` on the sub-command group ``add_shards_parser`` returns."""
    p = shards_actions.add_parser("medical", help="convert DICOM/NIfTI/images into per-split shards",
                                  description=medical.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="folder searched recursively for DICOM, NIfTI and image files")
    p.add_argument("out", metavar="OUT", help="folder for train/, val/, test/ shards and the journal")
    add_medical_options(p)
    p.add_argument("--samples-per-shard", type=positive_number(int), default=256, metavar="N", help="default: 256")
    p.add_argument("--shard-mb", type=positive_number(float), default=1024.0, metavar="MB", help="default: 1024")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=medical_main)
    return p


def medical_main(args: argparse.Namespace) -> int:
    """Run a parsed ``pretrain shards medical`` command; returns the exit code."""
    try:
        manifests = write_medical_shards(
            args.src, args.out, reports=getattr(args, "reports", None) or getattr(args, "labels", None),
            split_ratios=args.splits, target_spacing=args.spacing,
            preset=args.preset, workers=args.workers, max_samples_per_shard=args.samples_per_shard,
            max_shard_bytes=max(1, int(args.shard_mb * 2**20)),
            salt=Path(args.salt_file) if args.salt_file else None, progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as e:
        raise SystemExit(f"pretrain shards medical: error: {e}") from e
    for split, m in manifests.items():
        folder = Path(args.out) / split
        print(f"{split}: {m['num_samples']} samples, {m['num_failed']} failed, {len(m['shards'])} shards -> {folder}")
    return 0
