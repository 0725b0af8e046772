"""``tailrank export --rerank-template``: a causal-LM checkpoint -> an LLM-reranker model directory.

Three graphs, none of which computes vocabulary-sized logits (the head is one row: the difference
of the LM head's ``yes`` and ``no`` rows, or the ``yes`` row alone for raw-logit templates):

- ``onnx/model.onnx``: ``input_ids``, ``attention_mask`` [batch, sequence] -> ``logits`` [batch, 1]
  at the last real token (right or left padding);
- ``onnx/prefix.onnx``: ``input_ids`` [1, prefix] -> ``present.{i}.key/value`` (the KV cache of
  the tokens before the document slot, computed once per request);
- ``onnx/continue.onnx``: ``input_ids``, ``attention_mask`` [batch, rest] (right padded) and the
  prefix's ``past.{i}.key/value`` [1, heads, prefix, dim] -> ``logits`` [batch, 1].

Each graph is checked against the full-vocabulary PyTorch forward pass before the directory appears.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError
from .rerank_template import TEMPLATE_FILE, RerankTemplate

__all__ = ["export_llm", "is_causal_lm"]

# Prompts for the parity check: lengths differ from the trace sample's on purpose.
_CHECK = (
    ("what is the role of insulin?", "Insulin is a hormone that regulates glucose levels in the blood."),
    ("a", ""),
    ("protein binding", "The receptor binds the protein " * 12),
)


def is_causal_lm(config: dict[str, Any]) -> bool:
    """Whether a checkpoint's config.json describes a causal (decoder-only) language model."""
    archs = config.get("architectures") or []
    return any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs)


def resolve_answer_ids(tokenizer: Any, template: RerankTemplate) -> tuple[int, int | None]:
    """Token ids of the template's yes/no answers: a vocabulary token of that exact spelling, else
    the text's encoding, which must be a single token."""
    def one(text: str) -> int:
        tid = tokenizer.convert_tokens_to_ids(text)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            return tid
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ModelError(f"the answer {text!r} is {len(ids)} tokens for this tokenizer; it must be one token")
        return int(ids[0])

    yes = one(template.yes)
    no = one(template.no) if template.score == "sigmoid" and template.no is not None else None
    if yes == no:
        raise ModelError(f"the answers {template.yes!r} and {template.no!r} are the same token")
    return yes, no


def export_llm(src: Path, tmp: Path, template: RerankTemplate, *, opset: int, tolerance: float) -> None:
    """Writes the three graphs, the resolved template and the tokenizer files into ``tmp``."""
    import torch
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager")
        tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load {src} as a transformers causal language model: {e}") from e
    model.eval()
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None):
        # tanh-capped logits are not linear in the hidden state: two rows' difference is no head.
        raise ModelError(f"{type(model).__name__} caps its logits (final_logit_softcapping); not supported")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ModelError(f"{type(model).__name__} has no bias-free linear LM head")
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    yes_id, no_id = resolve_answer_ids(tokenizer, template)
    w = head.weight.detach()
    if yes_id >= w.shape[0] or (no_id is not None and no_id >= w.shape[0]):
        raise ModelError(f"answer token ids {yes_id}, {no_id} are outside the LM head's {w.shape[0]} rows")
    row = (w[yes_id] - w[no_id]) if no_id is not None else w[yes_id].clone()
    n_layers = int(cfg.num_hidden_layers)
    full, prefix, cont = _wrappers(torch, base, row, n_layers)

    def ref(ids: np.ndarray) -> float:  # the full-vocabulary reference for one unpadded prompt
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(ids[None, :])).logits[0, -1].double()
        return float(logits[yes_id] - logits[no_id]) if no_id is not None else float(logits[yes_id])

    prompts = [_prompt_ids(tokenizer, template, q, d) for q, d in _CHECK]
    (tmp / "onnx").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter warnings; the parity check decides
        with torch.inference_mode(False), torch.no_grad():
            ids, mask = _pad([np.arange(3, 9), np.arange(3, 6)], left=False)
            _export(torch, full, (ids, mask), tmp / "onnx" / "model.onnx", ["input_ids", "attention_mask"],
                    ["logits"], {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                                 "logits": {0: "batch"}}, opset)
            p_ids = torch.arange(3, 12)[None, :]
            present_names = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
            _export(torch, prefix, (p_ids,), tmp / "onnx" / "prefix.onnx", ["input_ids"], present_names,
                    {"input_ids": {1: "prefix"}, **{n: {2: "prefix"} for n in present_names}}, opset)
            past = prefix(p_ids)
            c_ids, c_mask = _pad([np.arange(3, 8), np.arange(4, 6), np.arange(5, 9)], left=False)
            past_names = [f"past.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
            _export(torch, cont, (c_ids, c_mask, *past), tmp / "onnx" / "continue.onnx",
                    ["input_ids", "attention_mask", *past_names], ["logits"],
                    {"input_ids": {0: "batch", 1: "rest"}, "attention_mask": {0: "batch", 1: "rest"},
                     **{n: {2: "prefix"} for n in past_names}, "logits": {0: "batch"}}, opset)
    _check(tmp / "onnx", prompts, [ref(p) for p, _ in prompts], n_layers, tolerance)
    (tmp / TEMPLATE_FILE).write_text(json.dumps(template.with_ids(yes_id, no_id).to_json(), indent=1), encoding="utf-8")


def _wrappers(torch: Any, base: Any, row: Any, n_layers: int) -> tuple[Any, Any, Any]:
    from transformers import DynamicCache

    params = inspect.signature(base.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"

    def last_real(mask: Any) -> Any:
        # Largest position holding a real token: right and left padding alike.
        pos = torch.arange(mask.shape[1], dtype=mask.dtype).unsqueeze(0)
        return (mask * pos).max(dim=1).values

    class Full(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = base
            self.register_buffer("row", row.clone())

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            h = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            g = h[torch.arange(h.shape[0]), last_real(attention_mask)]
            return (g @ self.row).unsqueeze(1)

    class Prefix(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = base

        def forward(self, input_ids: Any) -> Any:
            out = self.base(input_ids=input_ids, use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            return tuple(t for layer in cache.layers[:n_layers] for t in (layer.keys, layer.values))

    class Continue(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = base
            self.register_buffer("row", row.clone())

        def forward(self, input_ids: Any, attention_mask: Any, *past: Any) -> Any:
            b, s = input_ids.shape
            p = past[0].shape[2]
            cache = DynamicCache(config=base.config)
            for i in range(n_layers):  # one prefix, shared by every row of the batch
                cache.update(past[2 * i].expand(b, -1, -1, -1), past[2 * i + 1].expand(b, -1, -1, -1), i)
            full_mask = torch.cat([torch.ones(b, p, dtype=attention_mask.dtype), attention_mask], dim=1)
            positions = (torch.arange(s) + p).unsqueeze(0).expand(b, -1)
            h = self.base(input_ids=input_ids, attention_mask=full_mask, position_ids=positions,
                          use_cache=True, **{cache_kw: cache}).last_hidden_state
            g = h[torch.arange(b), last_real(attention_mask)]
            return (g @ self.row).unsqueeze(1)

    return Full().eval(), Prefix().eval(), Continue().eval()


def _export(torch: Any, module: Any, args: tuple[Any, ...], path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]], opset: int) -> None:
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                      opset_version=opset, do_constant_folding=True, dynamo=False)


def _pad(rows: list[np.ndarray], *, left: bool, pad: int = 0) -> tuple[Any, Any]:
    import torch

    n = max(len(r) for r in rows)
    ids = np.full((len(rows), n), pad, dtype=np.int64)
    mask = np.zeros((len(rows), n), dtype=np.int64)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if left else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _prompt_ids(tokenizer: Any, template: RerankTemplate, query: str, doc: str) -> tuple[np.ndarray, int]:
    """(prompt ids, length of the part before the document) for the check, tokenized part by part."""
    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    pre, q, mid, suf = template.texts(query, None)
    head = enc(q + mid) if template.joined else enc(q) + enc(mid)
    before = enc(pre) + head
    ids = before + enc(template.document_text(doc)) + enc(suf)
    return np.asarray(ids, dtype=np.int64), len(before)


def _check(onnx_dir: Path, prompts: list[tuple[np.ndarray, int]], want: list[float], n_layers: int,
           tolerance: float) -> None:
    """Each graph path (full with right and left padding; prefix + continuation) against PyTorch."""
    import onnxruntime as ort

    try:
        sessions = {n: ort.InferenceSession(str(onnx_dir / f"{n}.onnx"), providers=["CPUExecutionProvider"])
                    for n in ("model", "prefix", "continue")}
    except Exception as e:  # ORT's own exception types
        raise ModelError(f"ONNX Runtime cannot load an exported graph: {e}") from e
    got: dict[str, list[float]] = {"right": [], "left": [], "prefix": []}
    try:
        for left in (False, True):
            ids, mask = _pad([p for p, _ in prompts], left=left)
            (out,) = sessions["model"].run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            got["left" if left else "right"] = [float(x) for x in out[:, 0]]
        for p, n_before in prompts:
            past = sessions["prefix"].run(None, {"input_ids": p[None, :n_before]})
            rest = p[None, n_before:]
            feed = {"input_ids": rest, "attention_mask": np.ones_like(rest)}
            feed.update({f"past.{i}.{kv}": past[2 * i + j] for i in range(n_layers) for j, kv in enumerate(("key", "value"))})
            (out,) = sessions["continue"].run(["logits"], feed)
            got["prefix"].append(float(out[0, 0]))
    except Exception as e:
        raise ModelError(f"an exported graph fails on a sample prompt: {e}") from e
    for path, values in got.items():
        worst = max(abs(a - b) for a, b in zip(values, want))
        if not worst <= tolerance:
            raise ModelError(f"the exported graph ({path} path) differs from PyTorch by {worst:.3g} (> {tolerance:g}); export refused")
