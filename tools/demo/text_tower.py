"""A small, locally built text tower for the demo's image-report objectives: a WordPiece tokenizer trained on
the demo reports and a randomly initialised BERT, saved as one Hugging Face folder.

``build_text_tower(out, corpus, seed)`` writes ``out`` so that, offline,

    transformers.AutoTokenizer.from_pretrained(out)   # lower-cases, BERT pre-tokenisation, [CLS] ... [SEP]
    transformers.AutoModel.from_pretrained(out)       # BertModel, hidden 128, 2 layers, 4 heads (~0.3 M parameters)

load it. Nothing is downloaded; the same corpus and seed give the same folder. ``demo_corpus(seed)`` is the
corpus the demo uses: reports of facts drawn without images, and every zero-shot class prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB_SIZE = 1000  # at most: a corpus of the demo's phrases gives fewer
MAX_LENGTH = 128  # the model's positions, and the tokenizer's model_max_length
BERT = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
        "max_position_embeddings": MAX_LENGTH}
# Characters every tower knows (lower case: the normalizer lower-cases), besides those of its corpus.
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?()[]/-+=%'\"<>&*#_~@$^|{}\\`"
MARKER = "medpretrain_text_tower.json"  # written last: the folder is complete
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def demo_corpus(seed: int = 0, per_class: int = 500) -> list[str]:
    """Reports of ``per_class`` drawn facts per class and dims (no images rendered), then all class prompts."""
    from pretrain.tools.demo.phantoms import draw_facts
    from pretrain.tools.demo.reports import class_prompts, report

    rng = np.random.default_rng([seed, 2])
    texts = [report(draw_facts(label, dims, rng), rng, dims)
             for dims in (2, 3) for _ in range(per_class) for label in range(4)]
    return texts + [p for dims in (2, 3) for prompts in class_prompts(dims).values() for p in prompts]


def _train_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                        initial_alphabet=list(ALPHABET), show_progress=False,
                                        continuing_subword_prefix="##")
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    # The trainer breaks ties between equally frequent merges by ids it assigns in hash-map order, so its
    # intermediate subwords differ from one process to the next. Keep what does not: every character, alone
    # and as a continuation (any ASCII text tokenizes without [UNK]), and the whole corpus words it learned;
    # number them special tokens first, then in sorted order. WordPiece splits by longest match, whatever the ids.
    words = {w for text in corpus for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))}
    learned = {t for t in tok.get_vocab() if t in words or len(t.removeprefix("##")) == 1} - set(SPECIAL_TOKENS)
    tok.model = models.WordPiece({t: i for i, t in enumerate(SPECIAL_TOKENS + sorted(learned))}, unk_token="[UNK]",
                                 max_input_chars_per_word=100, continuing_subword_prefix="##")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def build_text_tower(out: Path, corpus: list[str], seed: int = 0) -> Path:
    """Train a WordPiece tokenizer on ``corpus`` and save it with a random BertModel (seeded by ``seed``) in ``out``
    (its files replace those of an older tower there; nothing else in ``out`` is touched); returns ``out``."""
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from pretrain.models.text_tower import save_transformer

    if not corpus:
        raise ValueError("the text tower needs a non-empty corpus")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # incomplete until the marker is written again, last
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(corpus), unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=MAX_LENGTH, padding_side="right", truncation_side="right")
    tokenizer.save_pretrained(out)
    # Name the class every transformers release knows (v5 reads it as its TokenizersBackend).
    tok_config = out / "tokenizer_config.json"
    tok_config.write_text(json.dumps(dict(json.loads(tok_config.read_text()), tokenizer_class="PreTrainedTokenizerFast"),
                                     indent=2, sort_keys=True) + "\n")
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **BERT)
    with torch.random.fork_rng(devices=[]):  # seeded without moving the caller's random stream
        torch.manual_seed(seed)
        model = BertModel(config).eval()
    save_transformer(model, out)
    # safetensors writes through a private temporary file: give the weights the mode the other files got
    (out / "model.safetensors").chmod((out / "config.json").stat().st_mode & 0o777)
    marker = {"source": tower_source(seed, corpus), "vocab_size": len(tokenizer),
              "parameters": sum(p.numel() for p in model.parameters()), "corpus_texts": len(corpus)}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def tower_source(seed: int, corpus: list[str]) -> str:
    """What a complete folder's marker records: the seed and a digest of the corpus."""
    import hashlib

    digest = hashlib.sha256("\n\0".join(corpus).encode()).hexdigest()[:16]
    return f"medpretrain demo text tower v1 (seed {seed}, corpus {digest})"


def tower_is_complete(out: Path, seed: int, corpus: list[str]) -> bool:
    """Whether ``out`` holds a finished tower for this seed and corpus."""
    marker = Path(out) / MARKER
    if not all((Path(out) / name).is_file() for name in (MARKER, *FILES)):
        return False
    try:
        return json.loads(marker.read_text()).get("source") == tower_source(seed, corpus)
    except ValueError:
        return False
