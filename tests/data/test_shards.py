"""write_shards end to end: files -> real tar shards -> webdataset -> decode_sample."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import webdataset
from PIL import Image

import pretrain.tools.ingest.images as shards_module
from pretrain.data.codec import decode_sample
from pretrain.data.manifest import (
    FORMAT,
    ManifestBuilder,
    ManifestError,
    read_manifest,
    shard_paths,
    verify_shards,
    write_manifest,
)
from pretrain.data.privacy import hashed_key
from pretrain.tools.ingest.cli import add_shards_parser
from pretrain.tools.ingest.images import sample_key, write_shards, write_split_shards

RNG = np.random.default_rng(1)


def _read_back(out: Path) -> list[dict]:
    urls = [str(p) for p in shard_paths(out)]
    return [decode_sample(raw) for raw in webdataset.WebDataset(urls, shardshuffle=False)]


def _by_source(samples: list[dict]) -> dict[str, dict]:
    return {s["meta"]["source"]: s for s in samples}


@pytest.fixture()
def source(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A folder with one file of every supported kind; returns it and the channels-first arrays expected back."""
    src = tmp_path / "src"
    (src / "ct").mkdir(parents=True)
    (src / "xray").mkdir()
    expected: dict[str, np.ndarray] = {}

    gray8 = RNG.integers(0, 256, (6, 7), np.uint8)
    gray16 = RNG.integers(0, 65536, (6, 7), np.uint16)
    rgb8 = RNG.integers(0, 256, (6, 7, 3), np.uint8)
    Image.fromarray(gray8).save(src / "xray" / "a8.png")
    Image.fromarray(gray16).save(src / "xray" / "b16.png")
    Image.fromarray(rgb8).save(src / "fundus.png")
    Image.fromarray(rgb8).save(src / "photo.jpg")
    expected |= {"xray/a8.png": gray8[None], "xray/b16.png": gray16[None], "fundus.png": np.moveaxis(rgb8, -1, 0)}

    tiff_gray, tiff_rgb = RNG.integers(0, 65536, (5, 4), np.uint16), RNG.integers(0, 65536, (5, 4, 3), np.uint16)
    tifffile.imwrite(src / "g16.tif", tiff_gray)
    tifffile.imwrite(src / "c16.tiff", tiff_rgb, photometric="rgb")
    expected |= {"g16.tif": tiff_gray[None], "c16.tiff": np.moveaxis(tiff_rgb, -1, 0)}

    plane = RNG.normal(size=(4, 5)).astype(np.float64)
    vol_i16 = RNG.integers(-1024, 3000, (3, 4, 5), dtype=np.int16)
    vol_f32 = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    np.save(src / "plane.npy", plane)
    np.save(src / "ct" / "head.npy", vol_i16)
    (src / "ct" / "head.npy.json").write_text(json.dumps({"spacing": [2.5, 0.7, 0.7]}))
    np.save(src / "ct" / "mr.v2.npy", vol_f32)  # a dot in the stem must not break the webdataset key
    expected |= {"plane.npy": plane[None], "ct/head.npy": vol_i16[None], "ct/mr.v2.npy": vol_f32[None]}

    (src / ".hidden.png").write_bytes(b"not an image, and hidden")
    (tmp_path / "labels.csv").write_text(
        "path,label,spacing,comment\n"
        "xray/a8.png,normal,,first\n"
        "xray/b16.png,pneumonia,,\n"
        "ct/mr.v2.npy,normal,\"1.5,0.5,0.5\",float volume\n"
        "fundus.png,,,no label\n"
    )
    return src, expected


def test_round_trip_values_spacing_labels(source: tuple[Path, dict], tmp_path: Path) -> None:
    src, expected = source
    csv_path = src / "labels.csv"  # inside the source folder: must not count as a failed image
    csv_path.write_text((tmp_path / "labels.csv").read_text())
    out = tmp_path / "out"
    manifest = write_shards(src, out, labels_csv=csv_path, progress=False)
    assert manifest["num_failed"] == 0
    samples = _by_source(_read_back(out))

    assert set(samples) == set(expected) | {"photo.jpg"}  # hidden file, sidecar and the CSV itself skipped
    for rel, array in expected.items():
        image = samples[rel]["image"]
        assert image.dtype == array.dtype and np.array_equal(image, array), rel
    photo = samples["photo.jpg"]["image"]
    assert photo.shape == (3, 6, 7) and photo.dtype == np.uint8

    assert samples["ct/head.npy"]["meta"]["spacing"] == [2.5, 0.7, 0.7]
    assert samples["ct/mr.v2.npy"]["meta"]["spacing"] == [1.5, 0.5, 0.5]
    assert samples["ct/head.npy"]["meta"]["spatial_dims"] == 3 and samples["plane.npy"]["meta"]["spatial_dims"] == 2

    assert manifest["classes"] == ["normal", "pneumonia"]
    labels = {rel: (s["label"], s["meta"]["label_name"]) for rel, s in samples.items()}
    assert labels["xray/a8.png"] == (0, "normal") and labels["ct/mr.v2.npy"] == (0, "normal")
    assert labels["xray/b16.png"] == (1, "pneumonia")
    assert labels["fundus.png"] == (None, None) and labels["g16.tif"] == (None, None)
    assert {s["__key__"] for s in samples.values()} == {sample_key(rel) for rel in samples}


def test_manifest_counts_checksums_and_verify(source: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = source
    out = tmp_path / "out"
    manifest = write_shards(src, out, max_samples_per_shard=4, progress=False)
    assert manifest == read_manifest(out)
    assert manifest["format"] == FORMAT and manifest["source"] == str(src)
    assert manifest["num_samples"] == 9 and manifest["num_failed"] == 0 and manifest["failed"] == []
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 1]
    assert manifest["spatial_dims"] == [2, 3] and manifest["channels"] == [1, 3]
    assert manifest["dtypes"] == {"float32": 1, "float64": 1, "int16": 1, "uint16": 3, "uint8": 3}
    assert manifest["shape_min"] == {"2": [4, 4], "3": [2, 3, 4]}
    assert manifest["shape_max"] == {"2": [6, 7], "3": [3, 4, 5]}
    assert manifest["classes"] is None
    for shard in manifest["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert not list(out.glob("*.tmp"))

    assert verify_shards(out) == []
    damaged = out / manifest["shards"][1]["name"]
    data = bytearray(damaged.read_bytes())
    data[700] ^= 0xFF  # same size, different content
    damaged.write_bytes(bytes(data))
    (out / manifest["shards"][2]["name"]).unlink()
    assert verify_shards(out) == [manifest["shards"][1]["name"], manifest["shards"][2]["name"]]


def test_output_is_deterministic(source: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = source
    first = write_shards(src, tmp_path / "a", progress=False)
    second = write_shards(src, tmp_path / "b", progress=False)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]


def test_corrupt_files_are_reported_and_skipped(source: tuple[Path, dict], tmp_path: Path, caplog) -> None:
    src, expected = source
    (src / "broken.png").write_bytes(RNG.bytes(300))
    np.save(src / "ct" / "cut.npy", np.zeros((8, 8, 8), np.int16))
    (src / "ct" / "cut.npy").write_bytes((src / "ct" / "cut.npy").read_bytes()[:200])
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="pretrain.tools.ingest.images"):
        manifest = write_shards(src, out, labels_csv=tmp_path / "labels.csv", progress=False)

    assert manifest["num_failed"] == 3 and manifest["num_samples"] == len(expected) + 1
    failed = {f["path"]: f["reason"] for f in manifest["failed"]}
    assert set(failed) == {"broken.png", "ct/cut.npy", "notes.txt"}
    assert "not a readable .npy" in failed["ct/cut.npy"] and "unsupported file type" in failed["notes.txt"]
    assert str(src / "broken.png") in caplog.text and str(src / "ct" / "cut.npy") in caplog.text
    assert set(_by_source(_read_back(out))) == set(expected) | {"photo.jpg"}


def test_csv_spacing_of_wrong_length_fails_that_file_only(source: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = source
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("label,path,spacing\n1,plane.npy,1 1 1\n0,g16.tif,0.5 0.5\n")
    manifest = write_shards(src, tmp_path / "out", labels_csv=csv_path, progress=False)
    assert [(f["path"], f"{csv_path}:2" in f["reason"]) for f in manifest["failed"]] == [("plane.npy", True)]
    samples = _by_source(_read_back(tmp_path / "out"))
    assert samples["g16.tif"]["meta"]["spacing"] == [0.5, 0.5]


def test_integer_labels_are_their_own_indices(source: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = source
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\nplane.npy,3\ng16.tif,0\nfundus.png,3\n")
    manifest = write_shards(src, tmp_path / "out", labels_csv=csv_path, progress=False)
    assert manifest["classes"] == ["0", "1", "2", "3"]
    samples = _by_source(_read_back(tmp_path / "out"))
    assert samples["plane.npy"]["label"] == 3 and samples["g16.tif"]["label"] == 0
    assert samples["fundus.png"]["meta"]["label_name"] == "3"


def test_byte_limit_splits_shards_within_the_limit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    arrays = {f"img{i:02d}.npy": RNG.integers(0, 256, (32, 32), np.uint8) for i in range(12)}
    for name, array in arrays.items():
        np.save(src / name, array)
    limit = 2 * 10240  # a sample takes 3 KiB of tar (header + 1152-byte npy + json): six fit per shard
    manifest = write_shards(src, tmp_path / "out", max_shard_bytes=limit, progress=False)
    assert [s["samples"] for s in manifest["shards"]] == [6, 6] and sum(s["samples"] for s in manifest["shards"]) == 12
    assert all(s["bytes"] <= limit for s in manifest["shards"])
    samples = _read_back(tmp_path / "out")
    assert [s["meta"]["source"] for s in samples] == sorted(arrays)  # shard order follows sorted paths
    assert all(np.array_equal(s["image"][0], arrays[s["meta"]["source"]]) for s in samples)


@pytest.mark.parametrize(
    "content, message",
    [
        ("path,label\nplane.npy,a\nmissing.png,b\n", r"labels\.csv:3: path 'missing\.png' does not exist"),
        ("path,label\nplane.npy,a\nplane.npy,b\n", r"labels\.csv:3: path 'plane\.npy' already listed on line 2"),
        ("path,label\nct/head.npy.json,a\n", r"labels\.csv:2: .*is not an image file"),
        ("path,label\n../x.png,a\n", r"labels\.csv:2: .*must be relative"),
        ("path,label,spacing\nplane.npy,a,1 x\n", r"labels\.csv:2: spacing"),
        ("path,label\nplane.npy,-1\n", r"labels\.csv:2: integer label -1"),
        ("file,label\nplane.npy,a\n", r"labels\.csv: labels CSV lacks column\(s\) path"),
        ("path,class\nplane.npy,a\n", r"labels\.csv: labels CSV lacks column\(s\) label"),
    ],
)
def test_csv_errors_name_file_and_line(source: tuple[Path, dict], tmp_path: Path, content: str, message: str) -> None:
    src, _ = source
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        write_shards(src, out, labels_csv=csv_path, progress=False)
    assert not out.exists()  # bad input is found before anything is written


def test_refuses_to_overwrite_unless_asked(source: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = source
    out = tmp_path / "out"
    write_shards(src, out, max_samples_per_shard=3, progress=False)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match="already holds shards.*overwrite"):
        write_shards(src, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    manifest = write_shards(src, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]
    assert manifest["num_samples"] == 9 and verify_shards(out) == []


def test_crash_leaves_no_partial_shard(source: tuple[Path, dict], tmp_path: Path, monkeypatch) -> None:
    src, _ = source
    calls = []
    real_encode = shards_module.encode_sample

    def failing_encode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(shards_module, "encode_sample", failing_encode)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shards(src, out, max_samples_per_shard=3, progress=False)
    # complete shard and the journal that lists it; no .tmp, no manifest
    assert sorted(p.name for p in out.iterdir()) == ["journal.jsonl", "shard-000000.tar"]
    assert len(list(webdataset.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))) == 3

    monkeypatch.setattr(shards_module, "encode_sample", real_encode)
    resumed = write_shards(src, out, max_samples_per_shard=3, progress=False)  # the same command finishes it
    clean = write_shards(src, tmp_path / "clean", max_samples_per_shard=3, progress=False)
    assert resumed == clean and not (out / "journal.jsonl").exists()


def test_cli_write_and_verify(source: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    src, _ = source
    parser = argparse.ArgumentParser(prog="pretrain")
    add_shards_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["shards", "write", str(src), str(out), "--samples-per-shard", "4", "--no-progress"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == f"9 samples, 0 failed, 3 shards -> {out}"

    args = parser.parse_args(["shards", "verify", str(out)])
    assert args.func(args) == 0
    (out / "shard-000001.tar").write_bytes(b"")
    assert args.func(args) == 1 and "shard-000001.tar" in capsys.readouterr().out

    args = parser.parse_args(["shards", "write", str(src), str(out), "--no-progress"])
    with pytest.raises(SystemExit, match="already holds shards"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["shards", "write", str(src), str(out), "--shard-mb", "0"])


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ManifestError, match="lacks key"):
        read_manifest(tmp_path)
    inconsistent = {**ManifestBuilder(source="x").to_dict(), "num_samples": 5}
    with pytest.raises(ManifestError, match="num_samples is 5 but the shards hold 0"):
        write_manifest(tmp_path, inconsistent)
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"format": "other/9"}  # left untouched


def _patients_folder(tmp_path: Path, patients: int = 30, per_patient: int = 3) -> tuple[Path, Path]:
    """PNGs of ``patients`` patients, ``per_patient`` each, and a labels CSV naming the patient and a report."""
    src = tmp_path / "png"
    src.mkdir()
    lines = ["path,label,patient,report"]
    for p in range(patients):
        for i in range(per_patient):
            Image.fromarray(RNG.integers(0, 256, (8, 8), np.uint8)).save(src / f"p{p:02d}_{i}.png")
            lines.append(f"p{p:02d}_{i}.png,{'ab' if p % 2 else 'normal'},MRN-{p:04d},finding {p} view {i}")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return src, csv_path


def _split_of(out: Path) -> dict[str, list[dict]]:
    return {split: _read_back(out / split) for split in ("train", "val", "test") if (out / split).is_dir()}


SALT = "test-salt-0123456789abcdef"


def _split_of_keys(out: Path) -> dict[str, str]:
    return {s["__key__"]: split for split, samples in _split_of(out).items() for s in samples}


def test_image_splits_keep_a_patient_together_and_are_seeded(tmp_path: Path) -> None:
    src, csv_path = _patients_folder(tmp_path)
    out = tmp_path / "out"
    manifests = write_split_shards(src, out, "0.6,0.2,0.2", labels_csv=csv_path, group_by="patient", salt=SALT,
                                   progress=False)
    assert sum(m["num_samples"] for m in manifests.values()) == 90 and set(manifests) == {"train", "val", "test"}
    by_split = _split_of(out)
    split_of_patient: dict[str, set[str]] = {}
    for split, samples in by_split.items():
        assert len(samples) == manifests[split]["num_samples"] > 0
        assert read_manifest(out / split)["num_samples"] == len(samples)
        for s in samples:
            assert s["meta"]["split"] == split
            split_of_patient.setdefault(s["meta"]["patient"], set()).add(split)
            assert s["text"].startswith("finding ")  # the report column became the sample's text
    assert len(split_of_patient) == 30 and all(len(v) == 1 for v in split_of_patient.values())
    # the patient is recorded as its salted HMAC (the medical path's pseudonym), never as the CSV's identifier
    assert hashed_key(SALT.encode(), "patient:MRN-0003") in split_of_patient
    raw = b"".join(p.read_bytes() for p in out.rglob("*.tar"))
    assert b"MRN-" not in raw

    again = write_split_shards(src, tmp_path / "again", "0.6,0.2,0.2", labels_csv=csv_path, group_by="patient",
                               salt=SALT, progress=False)
    assert {k: m["shards"] for k, m in again.items()} == {k: m["shards"] for k, m in manifests.items()}
    other = write_split_shards(src, tmp_path / "other", "0.6,0.2,0.2", labels_csv=csv_path, group_by="patient",
                               salt=SALT, split_seed=1, progress=False)
    first, second = _split_of_keys(out), _split_of_keys(tmp_path / "other")
    assert first.keys() == second.keys() and sum(first[k] != second[k] for k in first) >= 10  # another seed, other splits


def test_without_a_salt_groups_split_together_and_no_patient_is_recorded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MEDPRETRAIN_SALT", raising=False)
    monkeypatch.delenv("MEDPRETRAIN_SALT_FILE", raising=False)
    src, csv_path = _patients_folder(tmp_path, patients=10)
    write_split_shards(src, tmp_path / "out", "0.5,0.5,0", labels_csv=csv_path, group_by="patient", progress=False)
    by_patient: dict[str, set[str]] = {}
    for split, samples in _split_of(tmp_path / "out").items():
        for s in samples:
            assert "patient" not in s["meta"]
            by_patient.setdefault(s["meta"]["source"].split("_")[0], set()).add(split)
    assert len(by_patient) == 10 and all(len(v) == 1 for v in by_patient.values())


def test_image_splits_without_groups_split_files(tmp_path: Path) -> None:
    src, _ = _patients_folder(tmp_path, patients=40, per_patient=1)
    manifests = write_split_shards(src, tmp_path / "out", {"train": 0.5, "val": 0.5}, progress=False)
    assert set(manifests) == {"train", "val"} and not (tmp_path / "out" / "test").exists()
    counts = [m["num_samples"] for m in manifests.values()]
    assert sum(counts) == 40 and min(counts) >= 10


@pytest.mark.parametrize("argv, message", [
    (["--group-by", "patient"], "needs a labels CSV"),
    (["--labels", "{csv}", "--group-by", "ward", "--splits", "0.5,0.5,0"], "lacks column(s) ward"),
    (["--reports", "{csv}"], "for images give a report column in --labels"),
    (["--splits", "1,2"], "give three numbers"),
])
def test_cli_split_errors_name_the_option(tmp_path: Path, argv: list[str], message: str) -> None:
    src, csv_path = _patients_folder(tmp_path, patients=2, per_patient=1)
    parser = argparse.ArgumentParser(prog="pretrain")
    add_shards_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["shards", "write", str(src), str(out), "--no-progress",
                              *[a.format(csv=csv_path) for a in argv]])
    with pytest.raises(SystemExit, match=r"pretrain shards write: error: .*" + re.escape(message)):
        args.func(args)
    assert not out.exists() or not any(out.rglob("*.tar"))


def test_cli_write_with_splits_prints_each_split(tmp_path: Path, capsys) -> None:
    src, csv_path = _patients_folder(tmp_path, patients=10, per_patient=2)
    parser = argparse.ArgumentParser(prog="pretrain")
    add_shards_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["shards", "write", str(src), str(out), "--labels", str(csv_path), "--splits",
                              "0.5,0.25,0.25", "--group-by", "patient", "--no-progress"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.rsplit("-> ", 1)[1] for line in lines] == [str(out / s) for s in ("train", "val", "test")]
