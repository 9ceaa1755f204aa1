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
from pretrain.tools.demo.phantoms import (CLASSES_2D, CLASSES_3D, FACT_KEYS, LABEL_MAP, _rotate_inplane, ct_volume, draw_facts,
                                          radiograph)
from pretrain.tools.demo.reports import (ABSENT, CLASS_PROMPTS_2D, CLASS_PROMPTS_3D, VOCABULARY, WORSE, class_prompts,
                                         report)

FINDING = LABEL_MAP.index("finding")


def _classes(dims: int) -> list[str]:
    return CLASSES_2D if dims == 2 else CLASSES_3D


def _named(text: str, dims: int) -> tuple[set[str], set[str]]:
    """(classes the text affirms, classes it negates), by the report vocabulary: a zone is negated by "no <zone>
    predominance" (alone or in a "no a, b or c" list) or by "<zone> spared"; affirmed by a key phrase outside those."""
    text = text.lower()
    negated = set()
    for name, vocab in VOCABULARY[dims].items():
        for phrase in vocab["negations"]:
            if phrase in text or re.search(r"\bno [^.]*\b" + re.escape(phrase[3:]), text):
                negated.add(name)
        if any(phrase in text for phrase in vocab["spared"]):
            negated.add(name)
    stripped = re.sub(r"\bno [^.]*\.", ".", text)  # drop negative sentences
    for vocab in VOCABULARY[dims].values():
        for phrase in vocab["spared"]:
            stripped = stripped.replace(phrase, "")
    affirmed = {name for name, vocab in VOCABULARY[dims].items()
                if any(p.lower() in stripped for p in vocab["nouns"] + vocab["patterns"] + vocab["impressions"])}
    return affirmed, negated


def _worse(text: str) -> set[str]:
    """The sides the text names as worse."""
    return {side for side in ("right", "left") if any(w.format(side=side) in text.lower() for w in WORSE)}


def _phantom_facts(dims: int, label: int, seed: int, size: int | None = None):
    facts: dict = {}
    generator, default = (radiograph, 32) if dims == 2 else (ct_volume, 16)
    image, labels = generator(label, size or default, np.random.default_rng(seed), facts=facts)
    return image, labels, facts


@pytest.mark.parametrize("dims", [2, 3])
def test_reports_name_the_zone_grade_and_worse_side_and_negate_another_zone(dims):
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(120):
        label = i % 4
        facts = draw_facts(label, dims, rng) if i % 3 else _phantom_facts(dims, label, i)[2]
        text = report(facts, rng, dims)
        name = _classes(dims)[label]
        affirmed, negated = _named(text, dims)
        assert affirmed == {name}, text
        assert negated and name not in negated, text
        lower = text.lower()
        assert re.search(r"\b(both|bilateral)", lower), text
        grade = facts["grade"]
        if grade["right"] == grade["left"]:
            other = "moderate" if grade["right"] == "mild" else "mild"
            assert re.search(rf"\b{grade['right']}\b", lower) and not re.search(rf"\b{other}\b", lower), text
        else:
            for side, g in grade.items():
                assert re.search(rf"\b{g} (on|in) the {side}\b", lower), text
        assert _worse(text) == ({facts["worse_side"]} if facts["worse_side"] else set()), text
        seen.add((facts["worse_side"], grade["right"] == grade["left"]))
        assert text.count("IMPRESSION:") <= 1 and "\n\n" not in text
    assert {(None, True), ("right", False), ("left", False)} <= seen  # the cases above all occurred
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
def test_facts_match_the_image_zone_and_the_radiological_convention(dims):
    """The lung on the image's left (low indices of the last axis) is the patient's right; in each lung's own frame
    (centre and in-plane angle from the facts, so the body's rotation does not matter) the finding pixels lie in the
    class's zone: above the lung's centre for "upper" (lower indices of axis 0), below for "lower", further from the
    midline for "peripheral", nearer to it for "central"."""
    checked = np.zeros(4, dtype=int)
    for seed in range(48 if dims == 2 else 16):
        label = seed % 4
        _, labels, facts = _phantom_facts(dims, label, seed)
        assert set(facts) == set(FACT_KEYS) and facts["class"] == _classes(dims)[label] and facts["dims"] == dims
        assert set(facts["grade"]) == set(facts["strength"]) == {"right", "left"}
        lungs = facts["lungs"]
        assert lungs["right"]["centre"][-1] < lungs["left"]["centre"][-1]
        labels = labels[0]
        where = np.argwhere(labels == FINDING)
        coords = [(where[:, k] + 0.5) / labels.shape[k] * 2 - 1 for k in range(dims)]
        frames, dist = {}, []
        for side, lung in lungs.items():  # each finding pixel in the frame of each lung; it belongs to the nearer
            d = _rotate_inplane([c - m for c, m in zip(coords, lung["centre"])], lung["angle"])
            frames[side] = (d[0] / lung["radii"][0], (1 if side == "left" else -1) * d[-1] / lung["radii"][-1])
            dist.append(sum((di / r) ** 2 for di, r in zip(d, lung["radii"])))
        nearer = np.argmin(dist, axis=0)
        for i, side in enumerate(lungs):
            u, lat = (x[nearer == i] for x in frames[side])
            if len(u) < 2:  # a thin zone can vanish at this size (or under the heart)
                continue
            along = [-u.mean(), u.mean(), lat.mean(), -lat.mean()][label]  # how far into the class's zone
            assert along > 0.3, (seed, side, facts["class"], u.mean(), lat.mean())
            checked[label] += 1
    assert (checked >= (20 if dims == 2 else 6)).all(), checked


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
batch = tok(["Mild bilateral basal predominant opacities.", "No upper-zone predominance."], padding=True, return_tensors="pt")
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
    assert list(prompts) == ["upper", "lower", "peripheral", "central"] and all(len(v) >= 3 for v in prompts.values())
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
    assert tokenizer.encode("Bilateral BASAL Perihilar opacities").tokens == ["[CLS]", "bilateral", "basal", "perihilar",
                                                                             "opacities", "[SEP]"]
    assert unk not in tokenizer.encode("Quixotic zebra 42x").ids
