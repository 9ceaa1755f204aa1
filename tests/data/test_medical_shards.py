"""write_medical_shards end to end: DICOM/NIfTI folders -> per-split shards, privacy, splits, resume."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import webdataset
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import pretrain.tools.ingest.medical as medical
from pretrain.data.codec import decode_sample
from pretrain.data.dicom import load_dicom_series
from pretrain.data.manifest import read_manifest, shard_paths, verify_shards
from pretrain.data.privacy import SaltError, hashed_key, load_salt, safe_metadata
from pretrain.data.splits import assign_split, parse_split_ratios
from pretrain.tools.ingest.cli import add_medical_parser, add_shards_parser
from pretrain.tools.ingest.medical import write_medical_shards

SALT = "test-salt-0123456789abcdef"
CT = get_testdata_file("CT_small.dcm")


def _write_ct_series(folder: Path, patient: str, name: str, zs: list[float]) -> dict[str, str]:
    """A CT series of one file per z (names unrelated to order); returns its identifiers."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = {"PatientID": patient, "PatientName": name, "StudyInstanceUID": generate_uid(),
           "SeriesInstanceUID": generate_uid(), "AccessionNumber": f"ACC{patient}"}
    for i, z in enumerate(zs):
        ds = pydicom.dcmread(CT)
        for attr, value in ids.items():
            setattr(ds, attr, value)
        ds.SOPInstanceUID = generate_uid()
        ids[f"sop{i}"] = str(ds.SOPInstanceUID)
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.InstanceNumber = len(zs) - i
        ds.save_as(folder / f"f{(i * 7) % len(zs)}_{i}")
    return ids


def _read_split(out: Path) -> list[dict]:
    return [decode_sample(raw) for raw in webdataset.WebDataset([str(p) for p in shard_paths(out)], shardshuffle=False)]


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, Path, list[dict[str, str]]]:
    src = tmp_path / "src"
    ids = [
        _write_ct_series(src / "Doe_Jane" / "ct", "PID0001", "Doe^Jane", [0.0, 2.5, 5.0, 7.5]),
        _write_ct_series(src / "Roe_Rick" / "ct", "PID0002", "Roe^Rick", [0.0, 5.0, 10.0]),
        _write_ct_series(src / "Gap_Gus" / "ct", "PID0003", "Gap^Gus", [0.0, 2.5, 7.5, 10.0]),  # one slice missing
    ]
    vol = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    (src / "brains" / "sub01").mkdir(parents=True)
    nibabel.save(nibabel.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), src / "brains" / "sub01" / "t1.nii.gz")
    (src / "notes.bin").write_bytes(b"definitely not an image")
    reports = tmp_path / "reports.csv"
    reports.write_text(
        "series_uid,path,report,label\n"
        f"{ids[0]['SeriesInstanceUID']},,No acute findings.,normal\n"
        f"{ids[1]['SeriesInstanceUID']},,Nodule in the right upper lobe.,nodule\n"
        f",brains/sub01/t1.nii.gz,,normal\n"
    )
    return src, reports, ids


def test_end_to_end_contents_reports_and_bad_inputs(dataset, tmp_path: Path):
    src, reports, ids = dataset
    out = tmp_path / "out"
    manifests = write_medical_shards(src, out, reports=reports, salt=SALT, workers=0, progress=False)
    assert set(manifests) == {"train"} and verify_shards(out / "train") == []
    manifest = read_manifest(out / "train")
    assert manifest["num_samples"] == 3 and manifest["classes"] == ["nodule", "normal"]
    # the salt's HMAC tag is called what it is, in the manifest and the journal; the salt itself is nowhere
    assert manifest["source"].startswith("medical conversion, salt fingerprint ")
    settings = json.loads((out / "journal.jsonl").read_text().splitlines()[0])["settings"]
    assert "salt" not in settings and manifest["source"].endswith(settings["salt_fingerprint"])
    assert SALT not in "".join(p.read_text() for p in out.rglob("*.json*"))
    gap_key = hashed_key(SALT.encode(), "dicom:" + ids[2]["SeriesInstanceUID"])
    (failure,) = manifest["failed"]
    assert failure["path"] == gap_key and "missing slice" in failure["reason"]
    (skipped,) = json.loads((out / "skipped.json").read_text())
    assert skipped["key"] == hashed_key(SALT.encode(), "path:notes.bin") and "not DICOM" in skipped["reason"]

    samples = {s["__key__"]: s for s in _read_split(out / "train")}
    key0 = hashed_key(SALT.encode(), "dicom:" + ids[0]["SeriesInstanceUID"])
    first = samples[key0]
    files = sorted((src / "Doe_Jane" / "ct").iterdir())
    expected, _ = load_dicom_series(files)
    np.testing.assert_array_equal(first["image"], expected)
    assert first["image"].shape == (1, 4, 128, 128) and first["image"].dtype == np.int16
    assert first["text"] == "No acute findings." and first["meta"]["label_name"] == "normal" and first["label"] == 1
    assert first["meta"]["spacing"] == pytest.approx([2.5, 0.661468, 0.661468])
    assert set(first["meta"]) <= {"kind", "modality", "body_part", "spatial_dims", "channels", "spacing", "orientation",
                                  "original_orientation",
                                  "rescale_applied", "photometric_inverted", "resampled_from_spacing", "intensity",
                                  "label", "label_name", "split", "patient", "shape", "dtype"}
    assert first["meta"]["patient"] == hashed_key(SALT.encode(), "patient:" + ids[0]["PatientID"])  # a pseudonym
    nifti = samples[hashed_key(SALT.encode(), "path:brains/sub01/t1.nii.gz")]
    assert nifti["image"].shape == (1, 5, 4, 3) and nifti["meta"]["spacing"] == [2.0, 1.0, 1.0]
    assert nifti["text"] is None and nifti["meta"]["label_name"] == "normal"

    # No identifier in clear anywhere in the output: shards, manifests, journal, skip list.
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for series in ids:
        for value in series.values():
            assert value.encode() not in blob, value
    # Nor the folder and file names, which identify patients as often as the tags do.
    for text in ("Doe^Jane", "Doe_Jane", "Roe_Rick", "Gap_Gus", "sub01", "t1.nii", "notes.bin", str(src)):
        assert text.encode() not in blob, text


def test_patient_level_split_keeps_each_patient_in_one_split(tmp_path: Path):
    src = tmp_path / "src"
    for p in range(12):
        for s in range(3):
            (src / f"patient{p:02d}").mkdir(parents=True, exist_ok=True)
            np.save(src / f"patient{p:02d}" / f"scan{s}.npy", np.full((2, 3, 4), p * 10 + s, np.int16))
    manifests = write_medical_shards(src, tmp_path / "out", split_ratios="0.5,0.25,0.25", salt=SALT, workers=0,
                                     progress=False, max_samples_per_shard=4)
    seen: dict[int, str] = {}
    pseudonyms: dict[int, set[str]] = {}
    total = 0
    for split in manifests:
        for sample in _read_split(tmp_path / "out" / split):
            patient = int(sample["image"].flat[0]) // 10
            assert seen.setdefault(patient, split) == split, f"patient {patient} in two splits"
            assert sample["meta"]["split"] == split
            pseudonyms.setdefault(patient, set()).add(sample["meta"]["patient"])
            total += 1
    assert total == 36 and len(seen) == 12
    # each patient has one pseudonym (the salted key evaluation resamples by), and it is not the folder name
    assert all(len(v) == 1 for v in pseudonyms.values()) and len(set.union(*pseudonyms.values())) == 12
    assert not any("patient" in p for v in pseudonyms.values() for p in v)


def test_assign_split_is_deterministic_and_follows_ratios():
    ratios = parse_split_ratios({"train": 0.7, "val": 0.2, "test": 0.1})
    keys = [hashed_key(b"s" * 16, f"patient-{i}") for i in range(6000)]
    splits = [assign_split(k, ratios) for k in keys]
    assert splits == [assign_split(k, ratios) for k in keys]
    for name, share in ratios.items():
        assert abs(splits.count(name) / len(keys) - share) < 0.025
    with pytest.raises(ValueError, match="three numbers"):
        parse_split_ratios("0.8,0.2")
    with pytest.raises(ValueError, match="unknown split"):
        parse_split_ratios({"holdout": 1.0})


def test_interrupted_conversion_resumes_without_duplicates(dataset, tmp_path: Path, monkeypatch):
    src, reports, _ = dataset
    clean = tmp_path / "clean"
    write_medical_shards(src, clean, reports=reports, salt=SALT, workers=0, progress=False, max_samples_per_shard=1)

    out = tmp_path / "out"
    real_convert, calls = medical.convert_item, []

    def fail_on_last(item, *args):  # 4 items: 3 good series/volumes and the gap series, in key order
        calls.append(item.key)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real_convert(item, *args)

    monkeypatch.setattr(medical, "convert_item", fail_on_last)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_medical_shards(src, out, reports=reports, salt=SALT, workers=0, progress=False, max_samples_per_shard=1)
    monkeypatch.setattr(medical, "convert_item", real_convert)
    assert not (out / "train" / "manifest.json").exists() and not list((out / "train").glob("*.tmp"))
    journaled = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()][1:]
    # At least two good samples came before the crash; the shard still open then was dropped, not journaled.
    assert 1 <= sum("shard" in entry for entry in journaled) <= 2
    (out / "train" / "shard-000007.tar").write_bytes(b"renamed but never journaled")  # killed before the journal line

    with pytest.raises(ValueError, match="other settings"):
        write_medical_shards(src, out, reports=reports, salt=SALT, workers=0, progress=False, max_samples_per_shard=2)
    write_medical_shards(src, out, reports=reports, salt=SALT, workers=0, progress=False, max_samples_per_shard=1)
    keys = [s["__key__"] for s in _read_split(out / "train")]
    assert len(keys) == len(set(keys)) == 3
    assert not (out / "train" / "shard-000007.tar").exists()
    assert read_manifest(out / "train") == read_manifest(clean / "train")
    for a, b in zip(shard_paths(out / "train"), shard_paths(clean / "train")):
        assert a.read_bytes() == b.read_bytes()


def test_process_pool_matches_in_process_and_presets_resampling(dataset, tmp_path: Path):
    src, _, ids = dataset
    kwargs = dict(salt=SALT, progress=False, preset="ct_lung", target_spacing=[5.0, 1.322936, 1.322936])
    write_medical_shards(src, tmp_path / "a", workers=0, **kwargs)
    write_medical_shards(src, tmp_path / "b", workers=2, **kwargs)
    for a, b in zip(shard_paths(tmp_path / "a" / "train"), shard_paths(tmp_path / "b" / "train"), strict=True):
        assert a.read_bytes() == b.read_bytes()
    samples = {s["__key__"]: s for s in _read_split(tmp_path / "a" / "train")}
    ct = samples[hashed_key(SALT.encode(), "dicom:" + ids[0]["SeriesInstanceUID"])]
    assert ct["image"].dtype == np.uint8 and ct["image"].shape == (1, 2, 64, 64)
    assert ct["meta"]["intensity"] == {"preset": "ct_lung", "window_hu": [-1350.0, 150.0], "stored": "uint8"}
    assert ct["meta"]["resampled_from_spacing"] == pytest.approx([2.5, 0.661468, 0.661468])
    assert ct["meta"]["spacing"] == pytest.approx([5.0, 1.322936, 1.322936])


def test_salt_sources_and_privacy_helpers(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MEDPRETRAIN_SALT", raising=False)
    monkeypatch.delenv("MEDPRETRAIN_SALT_FILE", raising=False)
    with pytest.raises(SaltError, match="no salt"):
        load_salt()
    with pytest.raises(SaltError, match="at least 16"):
        load_salt("short")
    (tmp_path / "salt").write_text(SALT + "\n")
    monkeypatch.setenv("MEDPRETRAIN_SALT_FILE", str(tmp_path / "salt"))
    assert load_salt() == SALT.encode()
    monkeypatch.setenv("MEDPRETRAIN_SALT", "another-secret-salt-value")
    assert load_salt() == b"another-secret-salt-value"
    assert hashed_key(b"a" * 16, "1.2.3") != hashed_key(b"b" * 16, "1.2.3")
    assert safe_metadata({"modality": "CT", "PatientName": "Doe^Jane", "source": "Doe_Jane/ct"}) == {"modality": "CT"}


def test_shards_write_without_a_salt_names_its_own_command_and_options(dataset, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MEDPRETRAIN_SALT", raising=False)
    monkeypatch.delenv("MEDPRETRAIN_SALT_FILE", raising=False)
    src, _, _ = dataset
    parser = argparse.ArgumentParser(prog="pretrain")
    add_shards_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shards", "write", str(src), str(tmp_path / "out"), "--no-progress"])
    with pytest.raises(SystemExit) as exit_info:
        args.func(args)
    message = str(exit_info.value)
    assert message.startswith("pretrain shards write: error: no salt: pass --salt-file PATH"), message
    assert "$MEDPRETRAIN_SALT_FILE" in message and "salt=" not in message


def test_cli_parser_runs_medical_conversion(dataset, tmp_path: Path, capsys):
    src, reports, _ = dataset
    (tmp_path / "salt").write_text(SALT)
    parser = argparse.ArgumentParser()
    add_medical_parser(parser.add_subparsers(dest="action"))
    args = parser.parse_args(["medical", str(src), str(tmp_path / "out"), "--reports", str(reports), "--workers", "0",
                              "--salt-file", str(tmp_path / "salt"), "--splits", "1,0,0", "--no-progress"])
    assert args.func(args) == 0
    assert "train: 3 samples, 1 failed" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="preset"):
        args = parser.parse_args(["medical", str(src), str(tmp_path / "o2"), "--salt-file", str(tmp_path / "salt")])
        args.preset = "ct_brain"
        args.func(args)


_SLOW_CONVERSION = """
import sys, time
import pretrain.tools.ingest.medical as medical
real = medical.convert_item
def slow_convert(item, *args):
    time.sleep(0.15)
    return real(item, *args)
medical.convert_item = slow_convert
medical.write_medical_shards(sys.argv[1], sys.argv[2], salt=sys.argv[3], workers=2, progress=False,
                             max_samples_per_shard=1)
"""


def test_killed_process_pool_conversion_resumes_to_the_same_shards(tmp_path: Path):
    src = tmp_path / "src"
    for p in range(16):
        (src / f"p{p:02d}").mkdir(parents=True)
        np.save(src / f"p{p:02d}" / "x.npy", np.full((2, 3), p, np.uint8))
    clean, out = tmp_path / "clean", tmp_path / "out"
    write_medical_shards(src, clean, salt=SALT, workers=0, progress=False, max_samples_per_shard=1)

    script = tmp_path / "run.py"
    script.write_text(_SLOW_CONVERSION)
    env = dict(os.environ, PYTHONPATH=str(Path(medical.__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(out), SALT], env=env, start_new_session=True)
    journal = out / "journal.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count('"shard"') >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its pool workers at once: no cleanup runs
    proc.wait()
    assert 3 <= journal.read_text().count('"shard"') < 16, "conversion was not killed mid-way"

    write_medical_shards(src, out, salt=SALT, workers=0, progress=False, max_samples_per_shard=1)
    values = sorted(int(s["image"].flat[0]) for s in _read_split(out / "train"))
    assert values == list(range(16))
    assert read_manifest(out / "train") == read_manifest(clean / "train")
    assert verify_shards(out / "train") == []


def test_trainer_stream_reads_converted_dicom_and_nifti(dataset, tmp_path: Path):
    """The converted shards feed the training stream of a 3D MAE: HU volumes and NIfTI alike."""
    import torch

    from pretrain.config import load_config
    from pretrain.engine.trainer import build_train_stream
    from pretrain.objectives import build_objective

    src, reports, _ = dataset
    out = tmp_path / "out"
    write_medical_shards(src, out, reports=reports, salt=SALT, workers=0, progress=False)
    cfg = load_config("configs/demo3d.yaml", [
        f"data.train={out / 'train'}", "data.batch_size=3", "data.num_workers=0", "data.shuffle_buffer=1",
        "model.preset=nano", "model.img_size=16", "model.patch_size=4", "objective.decoder_dim=32",
        "objective.decoder_depth=1", "objective.decoder_heads=2",
    ])
    objective = build_objective(cfg)
    batch = next(iter(build_train_stream(cfg, objective.data_recipe(), rank=0, world_size=1, start_batch=0)))
    assert batch["image"].shape == (3, 1, 16, 16, 16) and torch.isfinite(batch["image"]).all()
    assert batch["_stream"]["bad_samples"] == 0
    assert torch.isfinite(objective(batch)["loss"])


def test_shards_write_recognises_dicom_and_nifti_without_flags(dataset, tmp_path: Path, monkeypatch, capsys):
    from pretrain.tools.cli.main import main

    src, _, ids = dataset
    for name in ("Doe_Jane", "Roe_Rick"):  # DICOM files without extension, found by content
        assert not any(p.suffix for p in (src / name / "ct").iterdir())
    monkeypatch.setenv("MEDPRETRAIN_SALT", SALT)
    out = tmp_path / "out"
    assert main(["shards", "write", str(src), str(out), "--workers", "0", "--no-progress"]) == 0
    samples = _read_split(out / "train")
    assert len(samples) == 3  # two CT series (the one with a gap is skipped) and one NIfTI volume
    assert sorted(s["image"].ndim for s in samples) == [4, 4, 4]
    blob = b"".join(p.read_bytes() for p in (out / "train").iterdir())
    assert ids[0]["PatientID"].encode() not in blob and ids[0]["SeriesInstanceUID"].encode() not in blob


@pytest.mark.parametrize("choice", ["samples", "channels"])
def test_4d_nifti_is_split_into_volumes_or_kept_as_channels_by_choice(tmp_path: Path, choice: str):
    from pretrain.data.nifti import load_nifti

    src = tmp_path / "src" / "sub01"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    bold = rng.integers(0, 1000, (4, 5, 6, 3), dtype=np.int16)
    nibabel.save(nibabel.Nifti1Image(bold, np.diag([-2.0, 2.0, 3.0, 1.0])), src / "bold.nii.gz")
    nibabel.save(nibabel.Nifti1Image(bold[..., 0], np.eye(4)), src / "t1.nii.gz")
    manifests = write_medical_shards(tmp_path / "src", tmp_path / "out", salt=SALT, workers=0, progress=False,
                                     nifti_4d=choice)
    manifest = manifests["train"]
    assert manifest["conversion"] == {"orientation": "SAR", "nifti_4d": choice}
    samples = _read_split(tmp_path / "out" / "train")
    whole, _ = load_nifti(src / "bold.nii.gz")  # (3, D, H, W): the volumes as channels, canonical
    with pytest.raises(ValueError, match="no time point 3 "):
        load_nifti(src / "bold.nii.gz", time_point=3)
    if choice == "samples":
        assert manifest["num_samples"] == 4 and manifest["channels"] == [1]
        frames = {s["meta"]["time_point"]: s["image"] for s in samples if "time_point" in s["meta"]}
        assert sorted(frames) == [0, 1, 2]
        for t, image in frames.items():
            np.testing.assert_array_equal(image, whole[t:t + 1])
    else:
        assert manifest["num_samples"] == 2 and manifest["channels"] == [1, 3]
        assert not any("time_point" in s["meta"] for s in samples)
    assert all(s["meta"]["orientation"] == "SAR" for s in samples)
    with pytest.raises(ValueError, match="choose samples or channels"):
        write_medical_shards(tmp_path / "src", tmp_path / "o2", salt=SALT, workers=0, progress=False, nifti_4d="x")
