"""``pretrain shards {write,verify,medical}``: the command line of ingestion.

Plain image folders go to ``images.write_shards``; folders holding DICOM or
NIfTI files (recognised by content) go to ``medical.write_medical_shards``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pretrain.data.manifest import verify_shards
from pretrain.tools.cli.args import HelpFormatter, positive_number
from pretrain.tools.ingest import images, medical
from pretrain.tools.ingest.images import write_shards, write_split_shards
from pretrain.tools.ingest.medical import NIFTI_4D, holds_medical_files, write_medical_shards
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
        formatter_class=HelpFormatter,
    )
    actions = parser.add_subparsers(dest="shards_action", required=True, metavar="{write,verify,demo,medical}")
    write = actions.add_parser("write", help="convert a folder of images into shards + manifest.json")
    write.add_argument("src", metavar="SRC", help="folder searched recursively: images (.png .jpg .tif .npy) or DICOM / "
                       "NIfTI (.nii .nii.gz) files, recognised by content")
    write.add_argument("out", metavar="OUT", help="folder to write the shards and manifest.json into")
    write.add_argument("--labels", metavar="CSV", help="CSV with a path column and at least one of label, report "
                       "and the --group-by column; optional spacing")
    write.add_argument("--splits", default=None, metavar="TR,VA,TE",
                       help="split ratios into OUT/train, OUT/val, OUT/test, by patient for DICOM / NIfTI and by "
                       "--group-by (else per file) for images (default: no split, all in OUT)")
    write.add_argument("--group-by", metavar="COLUMN", help="images: labels-CSV column (e.g. patient) whose files "
                       "share a split; with a salt (--salt-file or $MEDPRETRAIN_SALT[_FILE]) samples record its "
                       "salted HMAC as 'patient'")
    write.add_argument("--split-seed", type=int, default=0, help="images: seed of the split assignment")
    write.add_argument("--samples-per-shard", type=positive_number(int), default=1000, metavar="N", help="default: 1000")
    write.add_argument(
        "--shard-mb", type=positive_number(float), default=256.0, metavar="MB", help="shard size limit in MiB (default: 256)"
    )
    write.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    write.add_argument("--overwrite", action="store_true", help="start over: replace shards already in OUT "
                       "(without it, an interrupted conversion of the same settings continues)")
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
            if args.group_by:
                raise ValueError("--group-by is for image folders: DICOM / NIfTI files are grouped by patient "
                                 "(the DICOM PatientID, else the reports table's patient column)")
            return medical_main(args)  # DICOM series / NIfTI volumes: the medical converter, no flag needed
        if args.reports:
            raise ValueError("--reports is for DICOM / NIfTI folders; for images give a report column in --labels")
        salt = Path(args.salt_file) if args.salt_file else None
        common = dict(labels_csv=args.labels, group_by=args.group_by, salt=salt,
                      max_samples_per_shard=args.samples_per_shard, max_shard_bytes=max(1, int(args.shard_mb * 2**20)),
                      prefix=args.prefix, progress=not args.no_progress, overwrite=args.overwrite)
        if args.splits:
            manifests = write_split_shards(args.src, args.out, args.splits, split_seed=args.split_seed, **common)
        else:
            manifests = {None: write_shards(args.src, args.out, **common)}
    except (ValueError, OSError) as e:
        raise SystemExit(f"pretrain shards write: error: {e}") from e
    for split, m in manifests.items():
        folder = Path(args.out) / split if split else Path(args.out)
        print(f"{m['num_samples']} samples, {m['num_failed']} failed, {len(m['shards'])} shards -> {folder}")
    return 0


def add_medical_options(p: argparse.ArgumentParser, *, labels_flag: bool = False) -> None:
    """The options of a medical conversion, shared by ``shards medical`` and ``shards write``."""
    p.add_argument("--reports", metavar="FILE", help="CSV or JSONL: series_uid|study_uid|path, report, label, patient"
                   + (" (for DICOM / NIfTI folders --labels is taken as this table too)" if labels_flag else ""))
    if not labels_flag:  # `shards write` has its own --splits, for images too
        p.add_argument("--splits", default=None, metavar="TR,VA,TE", help="patient-level split ratios (default: all train)")
    p.add_argument(
        "--spacing", type=positive_number(float), nargs=3, metavar=("D", "H", "W"), help="resample to this spacing (mm)"
    )
    p.add_argument("--preset", choices=PRESETS, help="intensity preset recorded in sample metadata")
    p.add_argument("--nifti-4d", choices=NIFTI_4D, default="samples",
                   help="a 4-D NIfTI file (fMRI, DWI, echoes): one sample per volume, or its volumes as channels")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="conversion processes (default: all CPUs)")
    p.add_argument("--salt-file", metavar="PATH",
                   help="file holding the secret salt (default: $MEDPRETRAIN_SALT, else the file $MEDPRETRAIN_SALT_FILE names)")


def add_medical_parser(shards_actions: Any) -> argparse.ArgumentParser:
    """Register ``pretrain shards medical`` on the sub-command group ``add_shards_parser`` returns."""
    p = shards_actions.add_parser("medical", help="convert DICOM/NIfTI/images into per-split shards",
                                  description=medical.__doc__, formatter_class=HelpFormatter)
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
            preset=args.preset, nifti_4d=args.nifti_4d, workers=args.workers, max_samples_per_shard=args.samples_per_shard,
            max_shard_bytes=max(1, int(args.shard_mb * 2**20)),
            salt=Path(args.salt_file) if args.salt_file else None, progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as e:
        raise SystemExit(f"pretrain shards {getattr(args, 'shards_action', 'medical')}: error: {e}") from e
    for split, m in manifests.items():
        folder = Path(args.out) / split
        print(f"{split}: {m['num_samples']} samples, {m['num_failed']} failed, {len(m['shards'])} shards -> {folder}")
    return 0
