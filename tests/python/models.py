"""Seeded tiny cross-encoders of each supported family, built locally (no hub downloads).

Each builder writes a Hugging Face-style checkpoint directory (config.json, model weights,
tokenizer.json, tokenizer_config.json) that ``tailrank export`` turns into an ONNX model.
torch, transformers and tokenizers are imported lazily so that importing this module is cheap.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# A small vocabulary of plain words; the test texts are drawn from it plus odd characters.
WORDS = (
    "the of and to in is for on with as by at from that this are was be or an it not which have "
    "has had were been their more can also other into its than only these may some such when "
    "cell cells protein gene genes expression patients disease risk increased decreased study "
    "results human mice tumor cancer treatment clinical effect effects levels activity binding "
    "receptor signaling pathway role function response immune infection virus blood brain heart "
    "drug dose trial data analysis model mutation dna rna acid growth factor insulin glucose "
    "liver kidney lung bone muscle tissue stem therapy vaccine antibody inflammation stress "
    "memory sleep age children women men population cohort mortality survival outcome"
).split()

ODD = ("é", "naïve", "café", "日本", "x²", "—", "(", ")", ",", ".", "?", "!", "%", "42", "3.5", "COVID-19")


def sample_text(rng: random.Random, n_words: int) -> str:
    """A seeded pseudo-sentence of ``n_words`` words with some odd characters mixed in."""
    out = []
    for _ in range(n_words):
        out.append(rng.choice(ODD) if rng.random() < 0.08 else rng.choice(WORDS))
    text = " ".join(out)
    return text.capitalize() if rng.random() < 0.5 else text


def corpus(seed: int = 0, n: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [sample_text(rng, rng.randint(3, 30)) for _ in range(n)]


# --- tokenizers -----------------------------------------------------------------------------


def wordpiece_tokenizer(*, bert_processing: bool = False) -> Any:
    """BERT-style WordPiece over WORDS plus single characters (lower-cased, accents kept)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?()%-'\"²éï—" + "日本"))
    vocab_list = specials + chars + ["##" + c for c in chars] + sorted(set(WORDS))
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    if bert_processing:
        tok.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    tok.decoder = decoders.WordPiece()
    return tok


def bytelevel_bpe_tokenizer(seed: int = 0) -> Any:
    """RoBERTa-style byte-level BPE trained on a seeded corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False)
    return tok


def unigram_tokenizer(seed: int = 0) -> Any:
    """XLM-R-style Unigram (Metaspace) with the ``<s> A </s></s> B </s>`` template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=300,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return tok


def deberta_v3_tokenizer(seed: int = 0, *, model_max_length: int = 512, texts: list[str] | None = None,
                         vocab_size: int = 300) -> Any:
    """DeBERTa-v3's layout: transformers' own ``DebertaV2Tokenizer`` (SentencePiece-style Unigram,
    Metaspace, ``[CLS] A [SEP] B [SEP]`` with token types 0 then 1) over a Unigram vocabulary
    trained here, with [PAD] [CLS] [SEP] [UNK] at ids 0-3 and [MASK] last, as in DeBERTa-v3."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    import transformers as tf

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]"], unk_token="[UNK]",
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else corpus(seed), trainer=trainer)
    vocab = [(str(p), float(score)) for p, score in json.loads(tok.to_str())["model"]["vocab"]] + [("[MASK]", 0.0)]
    return tf.DebertaV2Tokenizer(vocab=vocab, unk_id=3, model_max_length=model_max_length)


MODERNBERT_SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")


def modernbert_tokenizer(seed: int = 0, *, model_max_length: int = 8192, texts: list[str] | None = None,
                         vocab_size: int = 500) -> Any:
    """ModernBERT's layout: a byte-level BPE (OLMo-style, trained here) with [UNK] [CLS] [SEP]
    [PAD] [MASK] added after the learned vocabulary, ``[CLS] A [SEP] B [SEP]`` without token
    types (model inputs ``input_ids`` and ``attention_mask``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    import transformers as tf

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else corpus(seed), trainer=trainer)
    tok.add_special_tokens(list(MODERNBERT_SPECIALS))
    vocab = tok.get_vocab()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:0 [SEP]:0",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, unk_token="[UNK]", sep_token="[SEP]",
        pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"],
    )


# --- models ---------------------------------------------------------------------------------

FAMILIES = ("bert", "distilbert", "electra", "roberta", "xlm-roberta")
# The families of issue 16, kept apart from FAMILIES (whose parametrization the OpenVINO venv runs):
# deberta-v3: mxbai-rerank-v1's layout (relative attention with position buckets, no absolute
# positions, type_vocab_size 0: the graph has no token_type_ids); deberta-v2-types: DeBERTa-v2
# with absolute positions, a convolution layer and token types (type_vocab_size 2); modernbert:
# gte-reranker-modernbert's layout (RoPE, alternating global and local attention, CLS pooling)
# with a 16-token local window so short texts already cross it; modernbert-mean: mean pooling.
NEW_FAMILIES = ("deberta-v3", "deberta-v2-types", "modernbert", "modernbert-mean")
# ModernBERT's local window here: sequences longer than this exercise sliding-window attention.
MODERNBERT_LOCAL_ATTENTION = 16

# Positions: small enough that the test texts get truncated.
MAX_POSITIONS = 64


def _config(family: str, vocab_size: int, num_labels: int, sizes: dict[str, Any] | None = None) -> Any:
    import transformers as tf

    common: dict[str, Any] = {"num_labels": num_labels, "vocab_size": vocab_size}
    # A wide initialisation spreads the logits so that rankings are well defined.
    init = 0.2
    if family == "bert":
        return tf.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=MAX_POSITIONS, initializer_range=init, **common,
        )
    if family == "electra":
        return tf.ElectraConfig(
            embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=MAX_POSITIONS, initializer_range=init, **common,
        )
    if family == "distilbert":
        return tf.DistilBertConfig(
            dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=MAX_POSITIONS,
            initializer_range=init, **common,
        )
    if family == "roberta":
        return tf.RobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, initializer_range=init, **common,
        )
    if family == "xlm-roberta":
        return tf.XLMRobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, initializer_range=init, **common,
        )
    if family.startswith("deberta"):
        v3 = family == "deberta-v3"
        fields: dict[str, Any] = dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=MAX_POSITIONS, type_vocab_size=0 if v3 else 2, relative_attention=True,
            position_biased_input=not v3, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
            position_buckets=16 if v3 else -1, norm_rel_ebd="layer_norm" if v3 else "none", share_att_key=v3,
            conv_kernel_size=0 if v3 else 3, conv_act="gelu", pad_token_id=0, initializer_range=init,
        )
        return tf.DebertaV2Config(**(fields | (sizes or {})), **common)
    if family.startswith("modernbert"):
        ids = _modernbert_ids(vocab_size)
        fields = dict(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=8192, local_attention=MODERNBERT_LOCAL_ATTENTION, global_attn_every_n_layers=3,
            classifier_pooling="mean" if family == "modernbert-mean" else "cls", pad_token_id=ids["[PAD]"],
            cls_token_id=ids["[CLS]"], sep_token_id=ids["[SEP]"], bos_token_id=ids["[CLS]"],
            eos_token_id=ids["[SEP]"], initializer_range=init,
        )
        return tf.ModernBertConfig(**(fields | (sizes or {})), **common)
    raise ValueError(f"unknown family {family!r}")


def _modernbert_ids(vocab_size: int) -> dict[str, int]:
    """The ids of MODERNBERT_SPECIALS: the last ids of the vocabulary, in order."""
    first = vocab_size - len(MODERNBERT_SPECIALS)
    return {t: first + i for i, t in enumerate(MODERNBERT_SPECIALS)}


def _tokenizer(family: str) -> tuple[Any, dict[str, Any]]:
    """The tokenizers.Tokenizer and the transformers wrapper's keyword arguments."""
    if family in ("bert", "distilbert", "electra"):
        tok = wordpiece_tokenizer(bert_processing=family == "electra")
        names = ["input_ids", "attention_mask"] if family == "distilbert" else ["input_ids", "token_type_ids", "attention_mask"]
        return tok, dict(
            unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
            model_input_names=names,
        )
    tok = bytelevel_bpe_tokenizer() if family == "roberta" else unigram_tokenizer()
    return tok, dict(
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", sep_token="</s>", cls_token="<s>", pad_token="<pad>",
        mask_token="<mask>", model_input_names=["input_ids", "attention_mask"],
    )


def build_checkpoint(family: str, out_dir: Path, *, num_labels: int = 1, seed: int = 0,
                     model_max_length: int | None = None, sizes: dict[str, Any] | None = None,
                     texts: list[str] | None = None, vocab_size: int | None = None) -> Path:
    """Writes a seeded random ``<Family>ForSequenceClassification`` checkpoint with its tokenizer
    (``model_max_length`` default: 8192 for ModernBERT, as its checkpoints have it, else 512).

    For the families of NEW_FAMILIES (the benchmark builds larger ones), ``sizes`` overrides config
    fields (hidden_size, num_hidden_layers, ...) and the tokenizer is trained on ``texts`` (default:
    the seeded :func:`corpus`) with ``vocab_size`` pieces."""
    import torch
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    if family.startswith("deberta"):
        hf_tok = deberta_v3_tokenizer(model_max_length=model_max_length or 512, texts=texts, vocab_size=vocab_size or 300)
        n_vocab = len(hf_tok)
    elif family.startswith("modernbert"):
        hf_tok = modernbert_tokenizer(model_max_length=model_max_length or 8192, texts=texts,
                                      vocab_size=vocab_size or 500)
        n_vocab = len(hf_tok)
    else:
        tok, tok_kwargs = _tokenizer(family)
        hf_tok = tf.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length or 512, **tok_kwargs)
        n_vocab = tok.get_vocab_size(with_added_tokens=True)
    config = _config(family, n_vocab, num_labels, sizes)
    torch.manual_seed(seed)
    model = tf.AutoModelForSequenceClassification.from_config(config)
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    hf_tok.save_pretrained(out_dir)
    return out_dir


def reference_logits(hf_dir: Path, pairs: list[tuple[str, str]], max_length: int) -> Any:
    """transformers' forward pass of each pair alone: HF tokenizer with truncation, unpadded."""
    import numpy as np
    import torch
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    tok = tf.AutoTokenizer.from_pretrained(hf_dir)
    model = tf.AutoModelForSequenceClassification.from_pretrained(hf_dir, attn_implementation="eager")
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny one-pair forwards: extra threads only fight over shared cores
    try:
        rows = _forward_each(tok, model, pairs, max_length)
    finally:
        torch.set_num_threads(threads)
    return np.stack(rows) if rows else np.zeros((0, model.config.num_labels))


def model_card_logits(hf_dir: Path, pairs: list[tuple[str, str]], max_length: int, *, batch_size: int = 8,
                      config_overrides: dict[str, Any] | None = None) -> Any:
    """Logits the way rerankers' model cards compute them (gte-reranker-modernbert, mxbai-rerank
    with transformers): AutoModelForSequenceClassification with its default attention, and the
    tokenizer's pair encoding of a padded batch (``padding=True, truncation=True``).
    ``config_overrides`` change the loaded config (to show that a setting matters)."""
    import numpy as np
    import torch
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    tok = tf.AutoTokenizer.from_pretrained(hf_dir)
    model = tf.AutoModelForSequenceClassification.from_pretrained(hf_dir, **(config_overrides or {}))
    model.eval()
    rows = []
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            enc = tok([q for q, _ in chunk], [d for _, d in chunk], padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
            rows.append(model(**enc).logits.double().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, model.config.num_labels))


def _forward_each(tok: Any, model: Any, pairs: list[tuple[str, str]], max_length: int) -> list[Any]:
    import torch

    rows = []
    with torch.inference_mode():
        for q, d in pairs:
            # Lists, as sentence-transformers passes them: tok(q, "") alone would drop an empty
            # document's pair template (transformers tests `if text_pair`), tok([q], [""]) keeps it.
            enc = tok([q], [d], truncation=True, max_length=max_length, return_tensors="pt")
            rows.append(model(**enc).logits[0].double().numpy())
    return rows


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


_EXPORTS: dict[tuple[str, int], tuple[Path, Path]] = {}


def exported(tmp_path_factory: Any, family: str, num_labels: int = 1) -> tuple[Path, Path]:
    """(checkpoint dir, exported model dir) of a family, built once per test session."""
    key = (family, num_labels)
    if key not in _EXPORTS:
        from tailrank.export import export

        base = tmp_path_factory.mktemp(f"{family}-{num_labels}")
        hf_dir = build_checkpoint(family, base / "hf", num_labels=num_labels)
        _EXPORTS[key] = (hf_dir, export(hf_dir, base / "onnx"))
    return _EXPORTS[key]


def mixed_pairs(seed: int, n: int = 24) -> list[tuple[str, str]]:
    """Pairs mixing short, empty and truncated texts, a few queries shared across pairs."""
    rng = random.Random(seed)
    queries = ["", sample_text(rng, 2), sample_text(rng, 6), sample_text(rng, 70)]
    pairs = []
    for _ in range(n):
        q = rng.choice(queries)
        d = "" if rng.random() < 0.15 else sample_text(rng, rng.choice([1, 3, 8, 20, 90]))
        pairs.append((q, d))
    return pairs


# --- sentence-transformers bi-encoders ------------------------------------------------------

ST_MAX_SEQ_LENGTH = 48  # below MAX_POSITIONS, so sentence_bert_config.json decides the truncation


def build_st_checkpoint(out_dir: Path, *, pooling: str = "mean", normalize: bool = True, seed: int = 0,
                        family: str = "bert", legacy_pooling_keys: bool = False,
                        max_seq_length: int | None = ST_MAX_SEQ_LENGTH) -> Path:
    """Writes a seeded random sentence-transformers checkpoint in the usual layout: the
    transformer (``<Family>Model`` weights, config and tokenizer) at the root, ``modules.json``,
    ``sentence_bert_config.json``, ``1_Pooling/config.json`` and, with ``normalize``, a
    ``2_Normalize`` module. ``legacy_pooling_keys`` writes the pooling mode as the older
    ``pooling_mode_*_tokens`` booleans (as all-MiniLM-L6-v2 has it)."""
    import torch
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    tok, tok_kwargs = _tokenizer(family)
    hf_tok = tf.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **tok_kwargs)
    config = _config(family, tok.get_vocab_size(with_added_tokens=True), 1)
    torch.manual_seed(seed)
    model = tf.AutoModel.from_config(config)
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    hf_tok.save_pretrained(out_dir)
    dim = int(getattr(config, "hidden_size", None) or config.dim)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out_dir / "2_Normalize").mkdir()
    write_json(out_dir / "modules.json", modules)
    st_config: dict[str, Any] = {"do_lower_case": False}
    if max_seq_length is not None:
        st_config["max_seq_length"] = max_seq_length
    write_json(out_dir / "sentence_bert_config.json", st_config)
    (out_dir / "1_Pooling").mkdir()
    if legacy_pooling_keys:
        pool: dict[str, Any] = {"word_embedding_dimension": dim}
        for mode, key in (("cls", "cls_token"), ("max", "max_tokens"), ("mean", "mean_tokens"),
                          ("mean_sqrt_len_tokens", "mean_sqrt_len_tokens")):
            pool[f"pooling_mode_{key}"] = mode == pooling
    else:
        pool = {"embedding_dimension": dim, "pooling_mode": pooling, "include_prompt": True}
    write_json(out_dir / "1_Pooling" / "config.json", pool)
    return out_dir


_ST_EXPORTS: dict[tuple[Any, ...], tuple[Path, Path]] = {}


def exported_st(tmp_path_factory: Any, **kwargs: Any) -> tuple[Path, Path]:
    """(checkpoint dir, exported model dir) of a sentence-transformers checkpoint, built once per
    test session for each set of ``build_st_checkpoint`` arguments."""
    key = tuple(sorted(kwargs.items()))
    if key not in _ST_EXPORTS:
        from tailrank.export import export

        base = tmp_path_factory.mktemp("st-" + "-".join(str(v) for _, v in key))
        st_dir = build_st_checkpoint(base / "st", **kwargs)
        _ST_EXPORTS[key] = (st_dir, export(st_dir, base / "onnx"))
    return _ST_EXPORTS[key]
