"""DeBERTa-v2/v3 and ModernBERT cross-encoders (issue 16): export, the tokenizers' pair templates,
fidelity against transformers the model-card way, ModernBERT's long context and local attention,
and `optimize`'s fusions and fidelity gate."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest

import models

from tailrank import CrossEncoder, DocStore, PairBatcher, PairTemplate
from tailrank.optimize import optimize

FAMILIES = models.NEW_FAMILIES
# Measured here: at most 1.2e-6 in fp32 for every family (the issue asks for 1e-4).
ATOL = 1e-5
# The graph inputs of each family: DeBERTa-v3 (type_vocab_size 0) ignores token types, so its
# graph has none; DeBERTa-v2 with type_vocab_size 2 embeds them; ModernBERT takes none.
TYPES = {"deberta-v3": False, "deberta-v2-types": True, "modernbert": False, "modernbert-mean": False}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    return request.param, *models.exported(tmp_path_factory, request.param, 1)


@pytest.fixture(scope="module")
def modernbert(tmp_path_factory):
    return models.exported(tmp_path_factory, "modernbert", 1)


def _unicode_pairs(seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [
        ("café naïve 日本", "Straße Ångström 東京 — résumé 🙂 e\u0301"),
        ("", ""),
        ("x² COVID-19 %", ""),
        ("  spaced\tquery\n", "  doc  with   runs\r\nof whitespace  "),
        (models.sample_text(rng, 3), "日本" * 40),
    ]


# --- export ----------------------------------------------------------------------------------


def test_export_declares_the_inputs_the_model_uses(family_model):
    family, hf_dir, out = family_model
    graph = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    names = sorted(i.name for i in graph.graph.input)
    want = ["attention_mask", "input_ids"] + (["token_type_ids"] if TYPES[family] else [])
    assert names == sorted(want)
    for i in graph.graph.input:
        dims = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        assert all(isinstance(d, str) for d in dims)  # dynamic batch and sequence axes
    ce = CrossEncoder(out, threads=1, max_length=64)
    assert set(ce.input_names) == set(want)  # the CrossEncoder feeds what the graph declares


# --- pair templates --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["deberta-v3", "modernbert"])
def test_pair_template_matches_the_tokenizers_pair_encoding(family, tmp_path_factory):
    import transformers as tf

    hf_dir, out = models.exported(tmp_path_factory, family, 1)
    hf_tok = tf.AutoTokenizer.from_pretrained(hf_dir)
    ce = CrossEncoder(out, threads=1, max_length=48)
    template = PairTemplate.from_tokenizer(out)
    assert template.pad_id == hf_tok.pad_token_id
    batcher = PairBatcher(template, max_length=48)
    pairs = models.mixed_pairs(seed=3, n=30) + _unicode_pairs(4)
    for q, d in pairs:
        want = hf_tok([q], [d], truncation=True, max_length=48)
        (q_ids,) = ce.tokenize([q])
        (batch,) = batcher.assemble(q_ids, ce.tokenize([d])).batches
        assert batch.input_ids[0].tolist() == want["input_ids"][0], (q, d)
        if "token_type_ids" in want:  # DeBERTa: types 0 for [CLS] A [SEP], 1 for B [SEP]
            assert batch.token_type_ids[0].tolist() == want["token_type_ids"][0], (q, d)
    if family == "deberta-v3":
        cls, sep = hf_tok.cls_token_id, hf_tok.sep_token_id
        assert template.pieces == ((0, cls, 0), (1, -1, 0), (0, sep, 0), (2, -1, 1), (0, sep, 1))
        assert template.pad_id == 0
    else:
        assert {t for k, t, ty in template.pieces if k == 0} == {hf_tok.cls_token_id, hf_tok.sep_token_id}
        assert template.pad_id == hf_tok.convert_tokens_to_ids("[PAD]")


# --- fidelity --------------------------------------------------------------------------------


def test_predict_matches_transformers_the_model_card_way(family_model):
    family, hf_dir, out = family_model
    raw = CrossEncoder(out, activation="none", threads=2, max_length=64)
    scored = CrossEncoder(out, threads=2, max_length=64)
    pairs = models.mixed_pairs(seed=7, n=30) + _unicode_pairs(8)
    want = models.model_card_logits(hf_dir, pairs, 64)[:, 0]
    logits = raw.predict(pairs)
    np.testing.assert_allclose(logits, want, atol=ATOL, rtol=0)
    # The reference pairs really mix short, empty and truncated texts.
    truncated = [raw.rank(q, [d])[0]["truncated"] for q, d in pairs]
    assert any(truncated) and not all(truncated) and any(d == "" for _, d in pairs)
    # Pair by pair with eager attention (no padding at all) agrees too.
    np.testing.assert_allclose(logits, models.reference_logits(hf_dir, pairs, 64)[:, 0], atol=ATOL, rtol=0)

    scores = scored.predict(pairs)
    np.testing.assert_allclose(scores, 1.0 / (1.0 + np.exp(-want)), atol=ATOL, rtol=0)
    # Any input order: the same scores, permuted.
    perm = np.random.default_rng(3).permutation(len(pairs))
    np.testing.assert_allclose(scored.predict([pairs[i] for i in perm]), scores[perm], atol=1e-6, rtol=0)


def test_deberta_matches_sentence_transformers_cross_encoder(tmp_path_factory):
    """mxbai-rerank-v1's model card scores with sentence-transformers' CrossEncoder."""
    from sentence_transformers import CrossEncoder as STCrossEncoder

    hf_dir, out = models.exported(tmp_path_factory, "deberta-v3", 1)
    pairs = models.mixed_pairs(seed=9, n=20) + _unicode_pairs(10)
    st = STCrossEncoder(str(hf_dir), device="cpu", max_length=64)
    want = st.predict(pairs, batch_size=8, convert_to_numpy=True)
    got = CrossEncoder(out, threads=2, max_length=64).predict(pairs)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_deberta_token_types_change_the_scores(tmp_path_factory):
    """With type_vocab_size 2 the token types are real inputs: scoring the document with type 0
    instead of 1 gives other logits, so the fidelity test above checks that types are fed."""
    hf_dir, out = models.exported(tmp_path_factory, "deberta-v2-types", 1)
    ce = CrossEncoder(out, activation="none", threads=1)
    q, d = "protein binding receptor", "the receptor binds the protein in cells"
    batch = ce.batcher().assemble(*ce.tokenize([q]), ce.tokenize([d])).batches[0]
    assert batch.token_type_ids.max() == 1
    typed = ce._session.run(None, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                                   "token_type_ids": batch.token_type_ids})[0]
    untyped = ce._session.run(None, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                                     "token_type_ids": np.zeros_like(batch.token_type_ids)})[0]
    assert abs(float(typed[0, 0]) - float(untyped[0, 0])) > 1e-3
    np.testing.assert_allclose(ce.predict([(q, d)]), typed[:, 0], atol=1e-6, rtol=0)


def test_rank_ids_from_a_docstore(family_model):
    family, hf_dir, out = family_model
    ce = CrossEncoder(out, threads=1, max_length=64)
    docs = [d for _, d in models.mixed_pairs(seed=12, n=12)] + [d for _, d in _unicode_pairs(13)]
    store = DocStore(ce.vocab_size)
    ids = np.arange(50, 50 + len(docs))
    store.add(ids, ce.tokenize_documents(docs))
    by_text = ce.rank("immune response of cells", docs)
    by_id = ce.rank_ids("immune response of cells", store, ids[::-1])
    # Same scores per document (equal texts tie, so orders may differ among them).
    got = {r["corpus_id"]: r["score"] for r in by_id}
    want = {int(ids[r["corpus_id"]]): r["score"] for r in by_text}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[i] for i in sorted(got)], [want[i] for i in sorted(want)], atol=1e-6, rtol=0)
    assert [r["score"] for r in by_id] == sorted((r["score"] for r in by_id), reverse=True)


# --- ModernBERT: long context, local and global attention ------------------------------------


def test_modernbert_max_length_defaults_to_its_8k_context(modernbert):
    hf_dir, out = modernbert
    ce = CrossEncoder(out, threads=1, max_batch_size=1)
    assert ce.max_length == 8192  # tokenizer_config's model_max_length and max_position_embeddings
    # The core's assembler takes the whole context: a longer pair is cut to exactly 8192 tokens.
    long_doc = ce.tokenize([models.sample_text(random.Random(1), 9000)])[0]
    assert long_doc.size > 8192
    assembly = ce.batcher().assemble(*ce.tokenize(["a query"]), [long_doc])
    assert assembly.lengths.tolist() == [8192] and assembly.truncated.tolist() == [True]
    assert assembly.batches[0].input_ids.shape == (1, 8192)


def test_modernbert_long_pairs_exercise_local_attention(modernbert):
    """Pairs far longer than the 16-token local window and a max_length above 512 match
    transformers; the same weights with a window covering everything score differently, so
    the sliding-window attention of the exported graph is what makes them match."""
    hf_dir, out = modernbert
    ce = CrossEncoder(out, activation="none", threads=2, max_length=1024)
    rng = random.Random(21)
    pairs = [("cell", "gene")]  # 5 tokens: inside the window
    pairs += [(models.sample_text(rng, 6), models.sample_text(rng, n)) for n in (10, 40, 300, 700, 1500)]
    pairs.append(("", "日本 café " * 400))
    want = models.model_card_logits(hf_dir, pairs, 1024, batch_size=2)[:, 0]
    got = ce.predict(pairs)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    tokens = [ce.tokenize([q])[0].size + ce.tokenize([d])[0].size + 3 for q, d in pairs]  # + [CLS] [SEP] [SEP]
    assert [ce.rank(q, [d])[0]["truncated"] for q, d in pairs] == [n > 1024 for n in tokens]
    assert any(512 < n <= 1024 for n in tokens) and sum(n > 1024 for n in tokens) >= 2
    global_only = models.model_card_logits(hf_dir, pairs, 1024, batch_size=2,
                                           config_overrides={"local_attention": 4096})[:, 0]
    assert tokens[0] <= models.MODERNBERT_LOCAL_ATTENTION // 2 < min(tokens[1:])
    assert np.abs(global_only[1:] - want[1:]).min() > 1e-3  # longer than the window: it matters
    np.testing.assert_allclose(global_only[:1], want[:1], atol=ATOL, rtol=0)  # inside it: it does not


def test_modernbert_mean_pooling_over_padded_batches(tmp_path_factory):
    """Mean pooling averages real tokens only: scores do not depend on the batch's padding."""
    hf_dir, out = models.exported(tmp_path_factory, "modernbert-mean", 1)
    rng = random.Random(5)
    pairs = [("cell growth", models.sample_text(rng, n)) for n in (1, 5, 60, 200)]
    alone = CrossEncoder(out, activation="none", threads=1, max_length=512, max_batch_size=1).predict(pairs)
    batched = CrossEncoder(out, activation="none", threads=1, max_length=512, max_batch_size=8,
                           batch_tokens=4096).predict(pairs)
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(alone, models.model_card_logits(hf_dir, pairs, 512)[:, 0], atol=ATOL, rtol=0)


# --- optimize --------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_optimize_keeps_the_fidelity_gate(family_model, precision, tmp_path):
    family, hf_dir, out = family_model
    report = optimize(out, tmp_path / precision, precision=precision, threads=2)
    assert report["passed"] and report["kendall_tau"] >= 0.95 and report["top1_kept"] >= 0.95
    # ONNX Runtime has no attention fusion for these model types: only the generic fusions apply.
    fused = report["fused_operators"]
    assert "Attention" not in fused and "MultiHeadAttention" not in fused
    assert fused.get("SkipLayerNormalization", 0) > 0
    opt = CrossEncoder(tmp_path / precision, activation="none", threads=2, max_length=64)
    pairs = models.mixed_pairs(seed=17, n=16)
    want = models.model_card_logits(hf_dir, pairs, 64)[:, 0]
    np.testing.assert_allclose(opt.predict(pairs), want, atol=ATOL if precision == "fp32" else 2e-2, rtol=0)
    if precision == "fp16":
        graph = onnx.load(str(tmp_path / precision / "onnx" / "model.onnx"))
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)


@pytest.mark.parametrize("family", ["deberta-v2-types", "modernbert"])
def test_optimize_refuses_below_the_gate(family, tmp_path_factory, tmp_path):
    from tailrank.optimize import FidelityError

    hf_dir, out = models.exported(tmp_path_factory, family, 1)
    with pytest.raises(FidelityError) as err:
        optimize(out, tmp_path / "fp16", precision="fp16", min_tau=1.01, threads=1)
    assert not (tmp_path / "fp16").exists() and err.value.report["passed"] is False
