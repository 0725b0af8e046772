"""Seeded tiny decoder-only rerankers (Qwen3, Qwen2, Gemma) with tokenizers trained here, and the
model cards' own scoring code, written against transformers with full-vocabulary logits.

Nothing is downloaded: the tokenizers copy the layouts of the real ones (Qwen: NFC + the Qwen2
split regex + byte-level BPE with the chat tokens; Gemma: spaces as "▁", no pre-tokenizer, BPE),
trained on the test corpus plus the template texts so that the answer tokens are single tokens.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import models

from tailrank.rerank_template import BUILTIN_TEMPLATES

# The Qwen2/Qwen3 pre-tokenizer pattern (the tokenizer.json of those models carries it).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<think>", "</think>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]

# family -> (template, transformers config class, causal-LM class)
FAMILIES = {"qwen3": "qwen3", "qwen2": "mxbai-v2", "gemma": "bge-gemma"}


def _training_text(template_name: str, n: int = 600, texts: list[str] | None = None) -> list[str]:
    t = BUILTIN_TEMPLATES[template_name]
    pieces = [t.prefix, t.query, t.middle, t.document, t.suffix, t.default_instruction or "", t.instruction]
    lines = [p.replace("{instruction}", "").replace("{query}", "").replace("{document}", "") for p in pieces]
    answers = ["yes no yes no Yes No", "1 0 1 0", "Yes\nNo\nyes\nno"] * 20
    return (models.corpus(seed=3, n=n) if texts is None else texts) + lines * 5 + answers + [f"{a}" for a in ("yes", "no", "Yes", "No", "1", "0")] * 30


def qwen_tokenizer(template_name: str, vocab_size: int = 900, texts: list[str] | None = None) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models as tmodels, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(tmodels.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(template_name, texts=texts), trainer=trainer)
    tok.add_tokens(QWEN_ADDED)
    return tok


def gemma_tokenizer(vocab_size: int = 900) -> Any:
    from tokenizers import Tokenizer, decoders, models as tmodels, normalizers, trainers

    tok = Tokenizer(tmodels.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GEMMA_SPECIALS, show_progress=False,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    tok.train_from_iterator(_training_text("bge-gemma"), trainer=trainer)
    return tok


def _config(family: str, vocab_size: int, hidden: int, layers: int, positions: int = 1024) -> Any:
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=hidden // 4, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
    return tf.GemmaConfig(**common, head_dim=hidden // 4, architectures=["GemmaForCausalLM"],
                          pad_token_id=0, eos_token_id=1, bos_token_id=2)


def build_llm_checkpoint(family: str, out_dir: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                         tokenizer: Any = None, positions: int = 1024, weight_std: float = 0.08) -> Path:
    """A seeded causal-LM checkpoint of ``family`` with its trained tokenizer, in ``out_dir``."""
    import torch
    import transformers as tf

    template = FAMILIES[family]
    if tokenizer is None:
        tokenizer = gemma_tokenizer() if family == "gemma" else qwen_tokenizer(template)
    if family == "gemma":
        hf_tok = tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                            pad_token="<pad>", unk_token="<unk>", padding_side="left",
                                            model_max_length=8192)
    else:
        hf_tok = tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                            pad_token="<|endoftext|>", padding_side="left", model_max_length=131072)
    torch.manual_seed(seed)
    cfg = _config(family, tokenizer.get_vocab_size(with_added_tokens=True), hidden, layers, positions)
    model = getattr(tf, cfg.architectures[0])(cfg).eval()
    with torch.no_grad():  # larger random weights than the initializer's, so scores spread out
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, weight_std)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    hf_tok.save_pretrained(out_dir)
    return out_dir


# --- the model cards' scoring code -----------------------------------------------------------


def _load(hf_dir: Path) -> tuple[Any, Any]:
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    model = tf.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    return tok, model


def qwen3_reference(hf_dir: Path, pairs: list[tuple[str, str]], *, instruction: str | None = None,
                    max_length: int = 8192) -> list[float]:
    """Qwen3-Reranker's model card: the body formatted as one string, prefix and suffix tokens
    around it, the body truncated to max_length minus both, left padding, the two-way softmax of
    the "yes"/"no" logits at the last position."""
    import torch

    tok, model = _load(hf_dir)
    true_id, false_id = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    t = BUILTIN_TEMPLATES["qwen3"]
    prefix_tokens = tok.encode(t.prefix, add_special_tokens=False)
    suffix_tokens = tok.encode(t.suffix, add_special_tokens=False)
    inst = instruction if instruction is not None else t.default_instruction
    bodies = [f"<Instruct>: {inst}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
    inputs = tok(bodies, padding=False, truncation="longest_first", return_attention_mask=False,
                 max_length=max_length - len(prefix_tokens) - len(suffix_tokens))
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    with warnings.catch_warnings():  # the card passes max_length with padding=True: transformers warns
        warnings.simplefilter("ignore")
        batch = tok.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1, :]
        two = torch.stack([logits[:, false_id], logits[:, true_id]], dim=1)
        return torch.nn.functional.log_softmax(two.double(), dim=1)[:, 1].exp().tolist()


def qwen3_reference_ids(tok: Any, query: str, doc: str, *, instruction: str | None = None,
                        max_length: int = 8192) -> list[int]:
    """The ids the Qwen3 model card feeds for one pair (unpadded), with its loaded tokenizer."""
    t = BUILTIN_TEMPLATES["qwen3"]
    pre = tok.encode(t.prefix, add_special_tokens=False)
    suf = tok.encode(t.suffix, add_special_tokens=False)
    inst = instruction if instruction is not None else t.default_instruction
    body = tok(f"<Instruct>: {inst}\n<Query>: {query}\n<Document>: {doc}", truncation="longest_first",
               max_length=max_length - len(pre) - len(suf))["input_ids"]
    return pre + body + suf


def mxbai_reference(hf_dir: Path, pairs: list[tuple[str, str]], *, instruction: str | None = None,
                    max_length: int = 8192) -> list[float]:
    """mxbai-rerank-v2's layout: chat preamble (+ "instruction: ..."), "query: q", "\\n",
    "document: d" (each tokenized alone), the task prompt and assistant turn; the sigmoid of
    logit("1") - logit("0") at the last token (full vocabulary), the document cut to fit."""
    import torch

    tok, model = _load(hf_dir)
    t = BUILTIN_TEMPLATES["mxbai-v2"]
    one, zero = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("0")
    inst = "" if instruction is None else f"instruction: {instruction}\n"
    enc = lambda s: tok.encode(s, add_special_tokens=False) if s else []  # noqa: E731
    rows = []
    for q, d in pairs:
        pre = enc(t.prefix.format(instruction=inst))
        suf = enc(t.suffix)
        head = enc(f"query: {q}") + enc("\n")
        doc = enc(f"document: {d}")
        budget = max_length - len(pre) - len(suf)
        head = head[:budget]
        doc = doc[: max(0, budget - len(head))]
        rows.append(pre + head + doc + suf)
    return _last_token_scores(tok, model, rows, one, zero, sigmoid=True)


def bge_gemma_reference(hf_dir: Path, pairs: list[tuple[str, str]], *, prompt: str | None = None,
                        max_length: int = 1024) -> list[float]:
    """bge-reranker-v2-gemma's model card (FlagEmbedding's get_inputs): bos + "A: q" (cut to 3/4
    of max_length) and "\\n" + "B: p" with only_second truncation to max_length, then "\\n" +
    prompt; left padding; the raw "Yes" logit at the last position."""
    tok, model = _load(hf_dir)
    if prompt is None:
        prompt = BUILTIN_TEMPLATES["bge-gemma"].default_instruction
    sep = "\n"
    prompt_inputs = tok(prompt, return_tensors=None, add_special_tokens=False)["input_ids"]
    sep_inputs = tok(sep, return_tensors=None, add_special_tokens=False)["input_ids"]
    rows = []
    for query, passage in pairs:
        query_inputs = tok(f"A: {query}", return_tensors=None, add_special_tokens=False,
                           max_length=max_length * 3 // 4, truncation=True)
        passage_inputs = tok(f"B: {passage}", return_tensors=None, add_special_tokens=False,
                             max_length=max_length, truncation=True)
        first = [tok.bos_token_id] + query_inputs["input_ids"]
        second = sep_inputs + passage_inputs["input_ids"]
        # prepare_for_model(..., truncation="only_second", max_length=max_length) of transformers
        # 4.x (gone from 5.x's tokenizer): the overflow comes off the end of the second sequence.
        over = len(first) + len(second) - max_length
        if over > 0:
            assert len(second) > over, "only_second cannot truncate this pair"
            second = second[:-over]
        rows.append(first + second + sep_inputs + prompt_inputs)
    yes_loc = tok("Yes", add_special_tokens=False)["input_ids"][0]
    return _last_token_scores(tok, model, rows, yes_loc, None, sigmoid=False)


def _last_token_scores(tok: Any, model: Any, rows: list[list[int]], yes: int, no: int | None, *,
                       sigmoid: bool) -> list[float]:
    import torch

    batch = tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")  # left padding
    with torch.no_grad():
        logits = model(**batch).logits[:, -1, :].double()
    if no is None:
        return logits[:, yes].tolist()
    diff = logits[:, yes] - logits[:, no]
    return torch.sigmoid(diff).tolist() if sigmoid else diff.tolist()


def full_softmax_yes(hf_dir: Path, ids: list[int], yes: int, no: int) -> float:
    """P(yes) / (P(yes) + P(no)) from the full-vocabulary softmax at the last token."""
    import torch

    _, model = _load(hf_dir)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), dim=0)
    return float(p[yes] / (p[yes] + p[no]))


REFERENCES = {"qwen3": qwen3_reference, "qwen2": mxbai_reference, "gemma": bge_gemma_reference}


def reference(family: str, hf_dir: Path, pairs: list[tuple[str, str]], *, instruction: str | None = None,
              max_length: int) -> list[float]:
    """The model card's scores for ``family``; ``max_length`` as tailrank counts it (the whole
    prompt; bge's own max_length excludes the "\\n" + prompt after the passage)."""
    if family == "gemma":
        tok, _ = _load(hf_dir)
        t = BUILTIN_TEMPLATES["bge-gemma"]
        n_suffix = len(tok.encode(t.suffix.format(instruction=instruction or t.default_instruction),
                                  add_special_tokens=False))
        return bge_gemma_reference(hf_dir, pairs, prompt=instruction, max_length=max_length - n_suffix)
    return REFERENCES[family](hf_dir, pairs, instruction=instruction, max_length=max_length)
