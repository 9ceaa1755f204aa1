"""Demo reports: they state what the phantom shows, leave its pixels alone, and the demo text tower reads them."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pretrain.tools.demo.data import SPLITS, make_demo_data
from pretrain.tools.demo.phantoms import CLASSES_2D, CLASSES_3D, FACT_KEYS, LABEL_MAP, ct_volume, draw_facts, radiograph
from pretrain.tools.demo.reports import (ABSENT, CLASS_PROMPTS_2D, CLASS_PROMPTS_3D, NUMBER_WORDS, VOCABULARY,
                                         class_prompts, report)

FINDING = LABEL_MAP.index("finding")


def _classes(dims: int) -> list[str]:
    return CLASSES_2D if dims == 2 else CLASSES_3D


def _named(text: str, dims: int) -> tuple[set[str], set[str]]:
    """(classes the text affirms, classes it negates), by the report vocabulary."""
    text = text.lower()
    negated = set()
    for name, vocab in VOCABULARY[dims].items():
        for phrase in vocab["negations"]:
            # "no a, b or c" / "no a and no b": a negation covers the list that follows it
            if phrase in text or re.search(r"\bno [^.]*\b" + re.escape(phrase[3:]), text):
                negated.add(name)
    stripped = re.sub(r"\bno [^.]*\.", ".", text)  # drop negative sentences and clauses
    stripped = re.sub(r"sparing the (left|right)", "", stripped)
    affirmed = {name for name, vocab in VOCABULARY[dims].items()
                if any(p.lower() in stripped for p in vocab["nouns"] + vocab["patterns"] + vocab["impressions"])}
    return affirmed, negated


def _phantom_facts(dims: int, label: int, seed: int, size: int | None = None):
    facts: dict = {}
    generator, default = (radiograph, 32) if dims == 2 else (ct_volume, 16)
    image, labels = generator(label, size or default, np.random.default_rng(seed), facts=facts)
    return image, labels, facts


@pytest.mark.parametrize("dims", [2, 3])
def test_reports_name_the_class_count_and_side_and_negate_another_kind(dims):
    rng = np.random.default_rng(0)
    for i in range(120):
        label = i % 4
        facts = draw_facts(label, dims, rng) if i % 3 else _phantom_facts(dims, label, i)[2]
        text = report(facts, rng, dims)
        name = _classes(dims)[label]
        affirmed, negated = _named(text, dims)
        assert affirmed == {name}, text
        assert negated and name not in negated, text
        lower = text.lower()
        count = facts["count"]
        bucket = "a few" if count <= 5 else "several" if count <= 9 else "numerous"
        assert re.search(rf"\b({NUMBER_WORDS[count]}|{bucket})\b", lower), text
        if facts["laterality"] == "both":
            assert re.search(r"\b(both|bilateral)", lower), text
        else:
            side = facts["laterality"]
            other = "left" if side == "right" else "right"
            assert f"{side} lung" in lower and "both" not in lower and "bilateral" not in lower, text
            for sentence in re.split(r"(?<=\.)\s+", lower):  # the other side is named only as free of lesions
                if re.search(rf"\b{other}\b", sentence):
                    assert (sentence.startswith(("no ", f"the {other} lung is clear"))
                            or f"sparing the {other}." in sentence), text
        assert text.count("IMPRESSION:") <= 1 and "\n\n" not in text
    # paraphrases: the same facts give different reports from different draws
    facts = draw_facts(0, dims, np.random.default_rng(1))
    assert len({report(facts, np.random.default_rng(s), dims) for s in range(20)}) >= 15
    assert report(facts, np.random.default_rng(5), dims) == report(facts, np.random.default_rng(5), dims)


def test_reports_vary_their_sentence_order_and_sections():
    rng = np.random.default_rng(3)
    texts = [report(draw_facts(i % 4, 2, rng), rng, 2) for i in range(200)]
    bodies = [[line for line in t.splitlines() if not line.startswith("IMPRESSION:")][-1].removeprefix("FINDINGS: ")
              for t in texts]
    key_first = [bool(_named(re.split(r"(?<=\.)\s+", b)[0], 2)[0]) for b in bodies]
    assert 0.4 < np.mean(key_first) < 0.95  # the finding sentence leads often, not always
    assert 0.2 < np.mean(["IMPRESSION:" in t for t in texts]) < 0.6
    assert 0.2 < np.mean(["FINDINGS:" in t for t in texts]) < 0.8
    assert any("pleural effusion" in t for t in texts) and any("pneumothorax" in t for t in texts)
    assert any("heart" in t.lower() for t in texts) and any("habitus" in t for t in texts)


@pytest.mark.parametrize("dims", [2, 3])
def test_facts_match_the_label_map_in_the_radiological_convention(dims):
    """The lung on the image's left (low indices of the last axis) is the patient's right; every lung the facts
    (and so the report) name holds finding pixels, a one-sided finding lies (almost all) on its side."""
    sides_seen = set()
    for seed in range(300 if dims == 2 else 6):  # one-sided phantoms: ~6% of 2D ones, ~1% of 3D ones
        label = seed % 4
        image, labels, facts = _phantom_facts(dims, label, seed)
        assert set(facts) == set(FACT_KEYS) and facts["class"] == _classes(dims)[label] and facts["dims"] == dims
        assert facts["count"] == len(facts["lesions"]) == sum(facts["per_lung"].values()) >= 1
        lungs = facts["lungs"]
        assert lungs["right"]["centre"][-1] < lungs["left"]["centre"][-1]
        mid = 0.5 * (lungs["right"]["centre"][-1] + lungs["left"]["centre"][-1])
        column = (np.argwhere(labels[0] == FINDING)[:, -1] + 0.5) / labels.shape[-1] * 2 - 1
        on_right = column < mid  # the patient's right: the image's left
        for side, k in facts["per_lung"].items():
            if k:
                assert (on_right if side == "right" else ~on_right).any(), (seed, facts["per_lung"])
        for lesion in facts["lesions"]:
            assert (lesion["centre"][-1] < mid) == (lesion["lung"] == "right")
        if facts["laterality"] in ("right", "left"):
            assert (on_right if facts["laterality"] == "right" else ~on_right).mean() > 0.75
            assert f"{facts['laterality']} lung" in report(facts, np.random.default_rng(seed), dims).lower()
        sides_seen.add(facts["laterality"])
        if sides_seen == {"both", "right", "left"}:
            break
    assert "both" in sides_seen and (dims == 3 or sides_seen == {"both", "right", "left"}), sides_seen


@pytest.mark.parametrize("generator,size", [(radiograph, 64), (ct_volume, 24)])
def test_facts_leave_the_images_and_the_random_stream_alone(generator, size):
    for label in range(4):
        plain, with_facts = np.random.default_rng([label, 4]), np.random.default_rng([label, 4])
        image, labels = generator(label, size, plain)
        facts: dict = {}
        image2, labels2 = generator(label, size, with_facts, facts=facts)
        assert facts and image.tobytes() == image2.tobytes() and labels.tobytes() == labels2.tobytes()
        assert plain.bit_generator.state == with_facts.bit_generator.state
        json.dumps(facts)  # plain Python values


def test_demo_shards_carry_reports_and_the_same_images(tmp_path):
    written = make_demo_data(tmp_path, scale=0.01, splits=["knn_val_2d", "pretrain_3d"], progress=False)
    assert written == {"knn_val_2d": 5, "pretrain_3d": 15}  # no text tower unless asked or every split is written
    for split in written:
        generator, size, _, offset = SPLITS[split]
        with tarfile.open(next((tmp_path / split).glob("*.tar"))) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".")[0] for name in members})
        assert keys and all(f"{k}.txt" in members for k in keys)
        dims = 2 if split.endswith("2d") else 3
        for k in keys:
            label = int(members[f"{k}.cls"])
            affirmed, _ = _named(members[f"{k}.txt"].decode(), dims)
            assert affirmed == {_classes(dims)[label]}
        # the images come from the split's stream exactly as before reports existed
        first = np.load(io.BytesIO(members[f"{keys[0]}.npy"]))
        image, _ = generator(int(members[f"{keys[0]}.cls"]), size, _first_draw_rng(offset, written[split]))
        assert first.tobytes() == image.tobytes()


def _first_draw_rng(offset: int, count: int) -> np.random.Generator:
    rng = np.random.default_rng(offset)  # seed 0: split seed = offset
    rng.permutation(np.arange(count) % 4)  # the split's labels come first
    return rng


@pytest.mark.parametrize("dims", [2, 3])
def test_class_prompts_cover_every_class_in_the_report_words(dims):
    prompts = class_prompts(dims)
    assert list(prompts) == _classes(dims) and prompts == (CLASS_PROMPTS_2D if dims == 2 else CLASS_PROMPTS_3D)
    for name, texts in prompts.items():
        assert len(texts) >= 5 and len(set(texts)) == len(texts)
        for text in texts:
            assert _named(text, dims)[0] == {name}, text


# Built and loaded in a fresh process with the hub offline: nothing is downloaded, and this process need not
# import transformers (the tokenizer's own file is read with tokenizers below).
_BUILD_AND_LOAD = """
import json, sys, torch, transformers as t
from pretrain.tools.demo.data import make_demo_data
written = make_demo_data(sys.argv[1], scale=0.01, splits=["knn_val_2d"], progress=False, text_tower=True)
tok = t.AutoTokenizer.from_pretrained(written["text_tower"]); model = t.AutoModel.from_pretrained(written["text_tower"])
batch = tok(["Five solid nodules are seen in both lungs.", "No cystic change."], padding=True, return_tensors="pt")
with torch.no_grad():
    out = model(**batch).last_hidden_state
c = model.config
print(json.dumps({"written": written, "model": type(model).__name__, "shape": list(out.shape), "finite": bool(out.isfinite().all()),
                  "special": [tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token], "vocab": len(tok),
                  "config": [c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
                             c.max_position_embeddings], "max_length": tok.model_max_length}))
"""


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _BUILD_AND_LOAD, str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "text_tower", json.loads(proc.stdout.strip().splitlines()[-1])


def test_text_tower_is_written_beside_the_splits_and_loads_offline(tower):
    folder, got = tower
    assert got["written"] == {"knn_val_2d": 5, "text_tower": str(folder),
                              **{f"class_prompts_{d}d": str(folder.parent / f"class_prompts_{d}d.json") for d in (2, 3)}}
    prompts = json.loads((folder.parent / "class_prompts_3d.json").read_text())
    assert list(prompts) == ["nodular", "vessel", "linear", "plate"] and all(len(v) >= 3 for v in prompts.values())
    assert got["model"] == "BertModel" and got["finite"] and got["special"] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert got["config"] == [got["vocab"], 128, 2, 4, 256, 128] and got["max_length"] == 128
    assert got["shape"][0] == 2 and got["shape"][2] == 128
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    # complete for the same seed: make_demo_data leaves it as it is
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert make_demo_data(folder.parent, scale=0.01, splits=["knn_val_2d"], progress=False, text_tower=True) == got["written"]
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_text_tower_tokenizes_reports_and_prompts_without_unknowns(tower):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tower[0] / "tokenizer.json"))
    unk, cls, sep = (tokenizer.token_to_id(t) for t in ("[UNK]", "[CLS]", "[SEP]"))
    rng = np.random.default_rng(11)  # a stream the tower's corpus did not use
    texts = [report(draw_facts(i % 4, dims, rng), rng, dims) for dims in (2, 3) for i in range(100)]
    texts += [p for d in (2, 3) for ps in class_prompts(d).values() for p in ps] + ABSENT
    rows = [e.ids for e in tokenizer.encode_batch(texts)]
    assert all(row[0] == cls and row[-1] == sep for row in rows)
    assert not any(unk in row for row in rows)
    assert max(len(row) for row in rows) <= 128  # the model's positions
    # lower-cased, whole report words are single tokens; unseen ASCII words fall back to characters, not [UNK]
    assert tokenizer.encode("Five SOLID nodules").tokens == ["[CLS]", "five", "solid", "nodules", "[SEP]"]
    assert unk not in tokenizer.encode("Quixotic zebra 42x").ids
