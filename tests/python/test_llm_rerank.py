"""Decoder-only (LLM) rerankers (issue 16, points 2-4): rerank templates, export of causal LMs with a
one-row head, CrossEncoder's llm kind with instruction=, prefix reuse, and fidelity against the
model cards' own scoring code on seeded tiny Qwen3 / Qwen2 / Gemma models."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llm_models
import models

from tailrank import CrossEncoder, DocStore
from tailrank.cli import main
from tailrank.errors import CorruptFileError, ModelError
from tailrank.export import export
from tailrank.rerank_template import BUILTIN_TEMPLATES, load_template, template_from_json

# Measured here: at most 3e-7 between tailrank and the model cards (the issue asks for 1e-4).
ATOL = 1e-4
MAX_LENGTH = 160
_BUILT: dict[str, tuple] = {}


def _exported(tmp_path_factory, family):
    if family not in _BUILT:
        root = tmp_path_factory.mktemp(f"llm-{family}")
        hf = llm_models.build_llm_checkpoint(family, root / "hf")
        out = export(hf, root / "out", rerank_template=llm_models.FAMILIES[family])
        _BUILT[family] = (hf, out)
    return _BUILT[family]


@pytest.fixture(scope="module", params=list(llm_models.FAMILIES))
def llm(request, tmp_path_factory):
    return request.param, *_exported(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _exported(tmp_path_factory, "qwen3")


def _pairs(seed: int) -> list[tuple[str, str]]:
    """Short, empty, truncated (longer than MAX_LENGTH) and unicode inputs, shuffled."""
    rng = random.Random(seed)
    pairs = [
        ("what is the role of insulin?", "Insulin is a hormone that regulates glucose levels in the blood."),
        ("", ""),
        ("a", ""),
        ("", "only a document"),
        ("café naïve 日本", "Straße Ångström 東京 — résumé 🙂 e\u0301"),
        ("  spaced\tquery\n", "  doc  with   runs\r\nof whitespace  "),
        ("protein binding", "The receptor binds the protein and the cell responds " * 30),
        ("long query " * 80, "a document that gets no room"),
        *((models.sample_text(rng, rng.randint(1, 12)), models.sample_text(rng, rng.randint(0, 60))) for _ in range(8)),
    ]
    rng.shuffle(pairs)
    return pairs


# --- fidelity (point 4) ----------------------------------------------------------------------


@pytest.mark.parametrize("reuse", [True, False], ids=["prefix-reuse", "full-prompt"])
def test_scores_equal_the_model_card(llm, reuse):
    family, hf, out = llm
    ce = CrossEncoder(out, threads=1, max_length=MAX_LENGTH, prefix_reuse=reuse, max_batch_size=4)
    for seed in (0, 1):  # two input orders
        pairs = _pairs(seed)
        want = np.array(llm_models.reference(family, hf, pairs, max_length=MAX_LENGTH))
        got = ce.predict(pairs)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert ce.kind == "llm"


@pytest.mark.parametrize("instruction", ["Find the passage that answers the medical question", "é 日本 — x²"])
def test_instruction_changes_the_prompt_as_the_model_card_does(llm, instruction):
    family, hf, out = llm
    ce = CrossEncoder(out, threads=1, max_length=MAX_LENGTH)
    pairs = _pairs(2)[:6]
    want = np.array(llm_models.reference(family, hf, pairs, instruction=instruction, max_length=MAX_LENGTH))
    np.testing.assert_allclose(ce.predict(pairs, instruction=instruction), want, atol=ATOL, rtol=0)
    q = pairs[0][0]
    docs = [d for _, d in pairs]
    ranked = ce.rank(q, docs, instruction=instruction)
    ref = np.array(llm_models.reference(family, hf, [(q, d) for d in docs], instruction=instruction,
                                        max_length=MAX_LENGTH))
    np.testing.assert_allclose([r["score"] for r in ranked], ref[[r["corpus_id"] for r in ranked]], atol=ATOL)
    assert all(a["score"] >= b["score"] for a, b in zip(ranked, ranked[1:]))  # best first


def test_two_token_score_equals_the_full_vocabulary_softmax(tmp_path_factory):
    for family in ("qwen3", "qwen2"):
        hf, out = _exported(tmp_path_factory, family)
        ce = CrossEncoder(out, threads=1, max_length=MAX_LENGTH)
        t = ce.rerank_template
        for q, d in _pairs(3)[:5]:
            ids = ce.prompt_ids(q, d).tolist()
            want = llm_models.full_softmax_yes(hf, ids, t.yes_id, t.no_id)
            assert abs(float(ce.predict([(q, d)])[0]) - want) <= ATOL


def test_bge_gemma_scores_are_raw_yes_logits(tmp_path_factory):
    hf, out = _exported(tmp_path_factory, "gemma")
    ce = CrossEncoder(out, threads=1, max_length=MAX_LENGTH)
    assert ce.activation == "none" and ce.rerank_template.no_id is None
    scores = ce.predict(_pairs(4))
    assert (scores < 0).any() or (scores > 1).any()  # logits, not probabilities


# --- token ids (point 2) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_tok(qwen3):
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(qwen3[0], padding_side="left")


def _card_ids(tok, query, doc, instruction=None, max_length=8192):
    return llm_models.qwen3_reference_ids(tok, query, doc, instruction=instruction, max_length=max_length)


def test_prompt_ids_equal_the_model_card_and_the_docstore_slot(qwen3, qwen3_tok):
    _, out = qwen3
    ce = CrossEncoder(out, threads=1, max_length=MAX_LENGTH)
    for q, d in _pairs(5):
        assert ce.prompt_ids(q, d).tolist() == _card_ids(qwen3_tok, q, d, max_length=MAX_LENGTH)
    # A document tokenized at ingest (tokenize_documents -> DocStore) fills exactly its slot.
    docs = [d for _, d in _pairs(6)]
    store = DocStore(vocab_size=ce.vocab_size)
    store.add(np.arange(len(docs)), ce.tokenize_documents(docs))
    q = "insulin and glucose"
    by_text = ce.rank(q, docs)
    by_ids = ce.rank_ids(q, store, np.arange(len(docs)))
    assert [r["corpus_id"] for r in by_text] == [r["corpus_id"] for r in by_ids]
    np.testing.assert_allclose([r["score"] for r in by_text], [r["score"] for r in by_ids], atol=1e-6)
    assert [r["truncated"] for r in by_text] == [r["truncated"] for r in by_ids]


# Adversarial pieces around the slot boundary: spaces, newlines, punctuation that the Qwen split
# regex glues to neighbours, combining marks (NFC), contractions, digits, chat tokens.
_ADVERSARIAL = st.sampled_from([
    " ", "  ", "\n", "\r\n", "\t", ":", ": ", ">", "<", "'s", "'S", "e\u0301", "\u0301", "1", "42", "?!", "—",
    "日本", "🙂", "<|im_end|>", "<think>", "yes", "no", "Document", "<Document>:", "\u00a0", "\u2028", "x²",
])
_TEXT = st.lists(st.one_of(_ADVERSARIAL, st.text(max_size=6)), max_size=8).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=_TEXT, doc=_TEXT, instruction=st.one_of(st.none(), _TEXT))
def test_slot_ids_reproduce_the_one_string_body(qwen3, qwen3_tok, query, doc, instruction):
    """The property the prefix reuse and the DocStore rely on: tokenizing the head and the document
    segment apart gives the ids of the model card's one-string body (no merge crosses the slot)."""
    ce = _qwen3_ce(qwen3)
    try:
        got = ce.prompt_ids(query, doc, instruction=instruction).tolist()
    except ValueError:  # a lone surrogate: typed refusal, as the tokenizers cannot encode it
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in query + doc + (instruction or ""))
        return
    assert got == _card_ids(qwen3_tok, query, doc, instruction, max_length=1024)


_CE: dict = {}


def _qwen3_ce(qwen3):
    if "ce" not in _CE:
        _CE["ce"] = CrossEncoder(qwen3[1], threads=1, max_length=1024, max_batch_size=1, prefix_reuse=False)
    return _CE["ce"]


def test_slot_boundary_mismatch_rate_on_a_corpus(qwen3, qwen3_tok):
    """The measured rate over a seeded corpus with odd characters: 0 of 400 (the split after
    "<Document>:" is a pre-tokenizer boundary whatever the document starts with)."""
    ce = _qwen3_ce(qwen3)
    rng = random.Random(7)
    texts = models.corpus(seed=11, n=200) + ["".join(rng.choice(models.ODD + (" ", "\n", "'s")) for _ in range(8))
                                              for _ in range(200)]
    bad = sum(ce.prompt_ids("q", d).tolist() != _card_ids(qwen3_tok, "q", d, max_length=1024) for d in texts)
    assert bad == 0


# --- prefix reuse (point 3) ------------------------------------------------------------------


def test_prefix_reuse_equals_the_full_prompt_and_computes_fewer_tokens(qwen3):
    _, out = qwen3
    reuse = CrossEncoder(out, threads=1, max_length=MAX_LENGTH, max_batch_size=3)
    full = CrossEncoder(out, threads=1, max_length=MAX_LENGTH, max_batch_size=3, prefix_reuse=False)
    docs = [d for _, d in _pairs(8)] * 2
    q = "what regulates glucose in the blood of patients"
    a = reuse.rank(q, docs)
    tokens_reuse = reuse.tokens_computed
    b = full.rank(q, docs)
    tokens_full = full.tokens_computed
    np.testing.assert_allclose(sorted(r["score"] for r in a), sorted(r["score"] for r in b), atol=ATOL, rtol=0)
    n_before = reuse._prompts.prompt(q, None).before.size
    # The prefix once instead of once per document.
    assert tokens_reuse < tokens_full - (len(docs) - 2) * n_before
    assert [r["truncated"] for r in sorted(a, key=lambda r: r["corpus_id"])] == \
        [r["truncated"] for r in sorted(b, key=lambda r: r["corpus_id"])]


def test_full_graph_gathers_the_last_real_token_with_left_or_right_padding(qwen3):
    import onnxruntime as ort

    _, out = qwen3
    ce = CrossEncoder(out, threads=1, max_length=MAX_LENGTH)
    rows = [ce.prompt_ids(q, d) for q, d in _pairs(9)[:5]]
    n = max(r.size for r in rows)
    sess = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = {}
    for left in (False, True):
        ids = np.zeros((len(rows), n), np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            sl = slice(n - r.size, n) if left else slice(0, r.size)
            ids[i, sl], mask[i, sl] = r, 1
        got[left] = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0][:, 0]
    alone = [sess.run(["logits"], {"input_ids": r[None].astype(np.int64),
                                   "attention_mask": np.ones((1, r.size), np.int64)})[0][0, 0] for r in rows]
    np.testing.assert_allclose(got[False], alone, atol=ATOL)
    np.testing.assert_allclose(got[True], alone, atol=ATOL)


# --- export (point 2) ------------------------------------------------------------------------


def test_graphs_never_compute_vocabulary_sized_logits(llm):
    family, hf, out = llm
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    for name in ("model", "prefix", "continue"):
        g = onnx.load(str(out / "onnx" / f"{name}.onnx"))
        big = {i.name for i in g.graph.initializer if vocab in i.dims}
        for node in g.graph.node:  # the embedding table only feeds its lookup
            if big & set(node.input):
                assert node.op_type == "Gather", (name, node.op_type)
        outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in g.graph.output}
        if name != "prefix":
            assert outs == {"logits": ["batch", 1]}
        else:
            assert all(vocab not in dims for dims in outs.values())


def test_a_causal_lm_without_a_template_is_refused_naming_the_option(qwen3, tmp_path, capsys):
    hf, _ = qwen3
    with pytest.raises(ModelError, match="--rerank-template"):
        export(hf, tmp_path / "x")
    assert main(["export", str(hf), str(tmp_path / "x")]) == 2
    assert "--rerank-template" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ModelError, match="unknown rerank template"):
        export(hf, tmp_path / "x", rerank_template="qwen4")


def test_cli_export_with_a_template_file_in_the_model_dir(qwen3, tmp_path, capsys):
    hf, _ = qwen3
    src = tmp_path / "hf"
    shutil.copytree(hf, src)
    custom = BUILTIN_TEMPLATES["qwen3"].to_json()
    custom["name"] = "mine"
    (src / "rerank_template.json").write_text(json.dumps(custom))
    assert main(["export", str(src), str(tmp_path / "out")]) == 0  # its files say which template
    ce = CrossEncoder(tmp_path / "out", threads=1, max_length=MAX_LENGTH)
    assert ce.rerank_template.name == "mine"
    # The option with a file path works too.
    assert main(["export", str(hf), str(tmp_path / "out2"), "--rerank-template", str(src / "rerank_template.json")]) == 0


@pytest.mark.parametrize("bad", [
    [], {"query": "{query}"}, {"query": "no slot", "document": "{document}", "yes": "a", "no": "b"},
    {"query": "{query}{query}", "document": "{document}", "yes": "a", "no": "b"},
    {"query": "{query}", "document": "{document} {query}", "yes": "a", "no": "b"},
    {"query": "{query", "document": "{document}", "yes": "a", "no": "b"},
    {"query": "{query!r}", "document": "{document}", "yes": "a", "no": "b"},
    {"query": "{query}", "document": "{document}", "yes": "a", "no": "a"},
    {"query": "{query}", "document": "{document}", "yes": "a", "no": "b", "score": "softmax"},
    {"query": "{query}", "document": "{document}", "yes": "a", "no": "b", "query_share": 2},
    {"query": "{query}", "document": "{document}", "yes": "a", "no": "b", "surprise": 1},
    {"query": "{query}", "document": "{document}", "yes": "a", "no": "b", "joined": True, "query_share": 0.5},
    {"query": "{query}", "document": "{document}", "yes": "a", "no": "b", "yes_id": -1},
    {"query": "{query}", "document": "{document}", "yes": "a", "no": "b", "format": "other"},
])
def test_bad_template_files_are_typed_errors(tmp_path, bad):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(CorruptFileError):
        load_template(path)
    with pytest.raises(ModelError):
        load_template(path, corrupt=False)
    path.write_bytes(b"\xff{")
    with pytest.raises(CorruptFileError):
        load_template(path)


def test_a_damaged_model_directory_template_is_corrupt(qwen3, tmp_path):
    _, out = qwen3
    bad = tmp_path / "m"
    shutil.copytree(out, bad)
    t = json.loads((bad / "rerank_template.json").read_text())
    for damage in ({"yes_id": None}, {"yes_id": 10**9}, {"query": 3}):
        (bad / "rerank_template.json").write_text(json.dumps({**t, **damage}))
        with pytest.raises(CorruptFileError):
            CrossEncoder(bad, threads=1, max_length=MAX_LENGTH)


def test_builtin_templates_round_trip_through_json():
    for name, t in BUILTIN_TEMPLATES.items():
        assert template_from_json(json.loads(json.dumps(t.to_json())), name, corrupt=True) == t


# --- input errors ----------------------------------------------------------------------------


def test_bad_inputs_are_typed_errors(qwen3):
    _, out = qwen3
    ce = CrossEncoder(out, threads=1, max_length=MAX_LENGTH)
    with pytest.raises(ValueError):
        ce.rank("q\ud800", ["d"])
    with pytest.raises(ValueError):
        ce.rank("q", ["d\udfff"])
    with pytest.raises(ValueError):
        ce.predict([("q", "d")], instruction="\ud800")
    with pytest.raises(TypeError):
        ce.rank("q", ["d"], instruction=3)
    with pytest.raises(ModelError, match="assemble_prompts"):
        ce.batcher()
    with pytest.raises(ValueError, match="deadline_ms"):
        ce.rank("q", ["d"], deadline_ms=0)
    with pytest.raises(ModelError, match="no room"):
        CrossEncoder(out, threads=1, max_length=8)
    assert ce.rank("q", []) == []


def test_an_encoder_cross_encoder_refuses_an_instruction(tmp_path_factory):
    _, out = models.exported(tmp_path_factory, "bert", 1)
    ce = CrossEncoder(out, threads=1)
    assert ce.kind == "encoder" and ce.rerank_template is None
    with pytest.raises(ValueError, match="LLM rerankers"):
        ce.rank("q", ["d"], instruction="find it")
    with pytest.raises(ValueError, match="LLM rerankers"):
        ce.prompt_ids("q", "d")


def test_a_joined_template_whose_slot_splits_a_token_is_refused(qwen3, tmp_path):
    """Detection: a template ending the head with the space that the tokenizer glues to the next
    word ("<Document>: " + "{document}") cannot reproduce the one-string body; loading says so."""
    _, out = qwen3
    bad = tmp_path / "m"
    shutil.copytree(out, bad)
    t = json.loads((bad / "rerank_template.json").read_text())
    (bad / "rerank_template.json").write_text(json.dumps({**t, "middle": "\n<Document>: ", "document": "{document}"}))
    with pytest.raises(ModelError, match="token boundary"):
        CrossEncoder(bad, threads=1, max_length=MAX_LENGTH)


def test_collection_search_reranks_with_an_llm_reranker_and_an_instruction(qwen3, tmp_path, tmp_path_factory):
    from tailrank import Collection, Embedder

    _, out = qwen3
    emb = Embedder(models.exported_st(tmp_path_factory, pooling="mean", normalize=True)[1], threads=1)
    ce = CrossEncoder(out, threads=1, max_length=MAX_LENGTH)
    docs = [d for _, d in _pairs(10)]
    col = Collection.create(tmp_path / "col", embedder=emb, reranker=ce)
    ids = col.add(docs)
    q, inst = "insulin regulates glucose", "Find the passage about hormones"
    for instruction in (None, inst):
        res = col.search(q, k=len(docs), candidates=len(docs), instruction=instruction)
        want = {ids[r["corpus_id"]]: r["score"] for r in ce.rank(q, docs, instruction=instruction)}
        got = {h.id: h.rerank_score for h in res.hits}
        assert set(got) == set(want)
        for i, score in got.items():
            assert abs(score - want[i]) <= ATOL
    with pytest.raises(ValueError, match="instruction"):
        col.search(q, rerank=False, instruction=inst)


def test_optimize_makes_fp16_of_an_llm_reranker_and_refuses_the_rest_naming_it(qwen3, tmp_path):
    """fp16 of all three graphs behind the fidelity gate (checked here on the CPU provider; the
    recipe is for CUDA); the other precisions are refused with a message naming what works."""
    from tailrank.optimize import FidelityError, optimize

    for precision in ("fp32", "int8", "int8-static", "bf16"):
        with pytest.raises(ModelError, match="--fp16"):
            optimize(qwen3[1], tmp_path / "opt", precision=precision)
        assert not (tmp_path / "opt").exists()
    report = optimize(qwen3[1], tmp_path / "fp16", precision="fp16", threads=1)
    assert report["passed"] and report["graphs"] == ["model.onnx", "prefix.onnx", "continue.onnx"]
    for name in report["graphs"]:
        g = onnx.load(str(tmp_path / "fp16" / "onnx" / name))
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in g.graph.initializer), name
        assert all(i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for i in [*g.graph.input, *g.graph.output])
    fp32 = CrossEncoder(qwen3[1], threads=1, max_length=MAX_LENGTH)
    half = CrossEncoder(tmp_path / "fp16", threads=1, max_length=MAX_LENGTH)
    pairs = _pairs(16)
    np.testing.assert_allclose(half.predict(pairs), fp32.predict(pairs), atol=2e-2)
    with pytest.raises(FidelityError):  # an impossible threshold: the gate refuses, nothing written
        optimize(qwen3[1], tmp_path / "strict", precision="fp16", threads=1, min_tau=1.01)
    assert not (tmp_path / "strict").exists()


# --- deadlines and the score cache for the llm kind (issue 16, serve round) -----------------


class BatchClock:
    """A deadline clock that moves only when a batch runs: ``step`` seconds per batch on top of
    ``base()`` (0 or the real monotonic clock), so a deadline admits an exact number of batches."""

    def __init__(self, monkeypatch, ce, step=1.0, base=lambda: 0.0):
        import tailrank.cross_encoder as mod

        self.batches = 0
        self.step, self.base = step, base
        monkeypatch.setattr(mod, "_clock", self)
        real_batch = mod._Worker.run_batch

        def run_batch(worker, o, batch, shape):  # the full-prompt path's batches
            self.batches += 1
            return real_batch(worker, o, batch, shape)

        monkeypatch.setattr(mod._Worker, "run_batch", run_batch)
        if ce._llm is not None:  # the prefix-reuse path's continuation batches
            clock, real = self, ce._llm.continue_session

            class Counting:
                def __getattr__(self, name):
                    return getattr(real, name)

                def run(self, names, feeds):
                    clock.batches += 1
                    return real.run(names, feeds)

            monkeypatch.setattr(ce._llm, "continue_session", Counting())

    def __call__(self):
        return self.base() + self.step * self.batches


@pytest.mark.parametrize("reuse", [True, False], ids=["prefix-reuse", "full-prompt"])
def test_a_deadline_scores_in_input_order_and_leaves_the_rest_degraded(qwen3, monkeypatch, reuse):
    """Batches of 2 rows, a clock that moves 1 s per batch and a 2.5 s deadline: exactly the first
    three batches (6 documents in input order) are scored, each as without a deadline; the rest
    follow in input order with no score (rank, rank_ids) or NaN (predict)."""
    _, out = qwen3
    ce = CrossEncoder(out, threads=1, max_length=MAX_LENGTH, max_batch_size=2, prefix_reuse=reuse)
    docs = [d for _, d in _pairs(11)][:10]
    q = "insulin and glucose"
    want = {r["corpus_id"]: r["score"] for r in ce.rank(q, docs)}
    BatchClock(monkeypatch, ce)
    got = ce.rank(q, docs, deadline_ms=2500)
    assert [r["corpus_id"] for r in got[6:]] == list(range(6, 10))
    assert all(r["score"] is None for r in got[6:])
    head = got[:6]
    assert sorted(r["corpus_id"] for r in head) == list(range(6))
    assert [r["score"] for r in head] == sorted((r["score"] for r in head), reverse=True)
    for r in head:
        assert abs(r["score"] - want[r["corpus_id"]]) <= ATOL
    scores = ce.predict([(q, d) for d in docs], deadline_ms=2500)
    assert np.isfinite(scores[:6]).all() and np.isnan(scores[6:]).all()
    store = DocStore(vocab_size=ce.vocab_size)
    store.add(np.arange(len(docs)) + 100, ce.tokenize_documents(docs))
    by_ids = ce.rank_ids(q, store, np.arange(len(docs)) + 100, deadline_ms=2500)
    assert [(r["corpus_id"] - 100, r["score"] is None) for r in by_ids] == [
        (r["corpus_id"], r["score"] is None) for r in got]
    # A far deadline scores all.
    assert all(r["score"] is not None for r in ce.rank(q, docs, deadline_ms=1e6))


def test_collection_search_with_an_llm_reranker_degrades_at_its_deadline(qwen3, tmp_path, tmp_path_factory,
                                                                        monkeypatch):
    from tailrank import Collection, Embedder

    _, out = qwen3
    emb = Embedder(models.exported_st(tmp_path_factory, pooling="mean", normalize=True)[1], threads=1)
    ce = CrossEncoder(out, threads=1, max_length=MAX_LENGTH, max_batch_size=3)
    docs = [d for _, d in _pairs(12)]
    col = Collection.create(tmp_path / "col", embedder=emb, reranker=ce)
    col.add(docs)
    q = "insulin regulates glucose"
    first = col.search(q, k=len(docs), candidates=len(docs), rerank=False).ids()
    res = col.search(q, k=len(docs), candidates=len(docs), deadline_ms=1e-6)
    assert res.degraded and res.reranked == 0 and res.ids() == first
    # After its first batch the clock jumps past any deadline: exactly the 3 best first-stage
    # candidates are reranked, ranked by score, the rest in first-stage order.
    import time

    BatchClock(monkeypatch, ce, step=1e6, base=time.monotonic)
    res = col.search(q, k=len(docs), candidates=len(docs), deadline_ms=60_000)
    assert res.degraded and res.reranked == 3
    assert {h.id for h in res.hits[:3]} == set(first[:3]) and all(h.reranked for h in res.hits[:3])
    assert [h.id for h in res.hits[3:]] == first[3:] and not any(h.reranked for h in res.hits[3:])
    scores = [h.rerank_score for h in res.hits[:3]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("reuse", [True, False], ids=["prefix-reuse", "full-prompt"])
def test_the_score_cache_serves_llm_pairs_exactly_keyed_by_instruction(qwen3, reuse):
    """A repeat is answered from the cache, bit-identical to the miss that stored it and as the
    uncached model scores; another instruction (other prompt ids) misses; the two scoring paths
    never read each other's entries."""
    from tailrank import ScoreCache

    _, out = qwen3
    plain = CrossEncoder(out, threads=1, max_length=MAX_LENGTH, prefix_reuse=reuse)
    cached = CrossEncoder(out, threads=1, max_length=MAX_LENGTH, prefix_reuse=reuse, cache_bytes=1 << 20)
    docs = [d for _, d in _pairs(13)]
    q = "insulin and glucose"
    miss = cached.predict([(q, d) for d in docs])
    assert cached.cache_stats().misses == len(docs) and cached.cache_stats().hits == 0
    hit = cached.predict([(q, d) for d in docs])
    assert cached.cache_stats().hits == len(docs)
    np.testing.assert_array_equal(hit, miss)
    np.testing.assert_allclose(miss, plain.predict([(q, d) for d in docs]), atol=1e-6, rtol=0)
    inst = "Find the passage about hormones"
    other = cached.predict([(q, d) for d in docs], instruction=inst)
    assert cached.cache_stats().hits == len(docs)  # no hit for the other instruction
    np.testing.assert_allclose(other, plain.predict([(q, d) for d in docs], instruction=inst), atol=1e-6, rtol=0)
    assert not np.allclose(other, miss, atol=1e-4)
    ranked = cached.rank(q, docs)
    assert cached.cache_stats().hits == 2 * len(docs)
    assert [r["score"] for r in ranked] == sorted(hit.tolist(), reverse=True)
    # Shared with the other path's model: its fingerprint differs, nothing is read across.
    shared = ScoreCache(1 << 20)
    a = CrossEncoder(out, threads=1, max_length=MAX_LENGTH, prefix_reuse=True, score_cache=shared)
    b = CrossEncoder(out, threads=1, max_length=MAX_LENGTH, prefix_reuse=False, score_cache=shared)
    assert a.score_fingerprint != b.score_fingerprint
    a.predict([(q, d) for d in docs])
    b.predict([(q, d) for d in docs])
    assert shared.stats().hits == 0 and shared.stats().entries == 2 * len(set(docs))


def test_the_score_cache_key_holds_the_template(qwen3, tmp_path):
    """Same weights and tokenizer, a template differing only in its answer layout: the
    fingerprints (part of every key) differ."""
    _, out = qwen3
    other = tmp_path / "m"
    shutil.copytree(out, other)
    t = json.loads((other / "rerank_template.json").read_text())
    (other / "rerank_template.json").write_text(json.dumps({**t, "name": "renamed", "score": "logit"}))
    a = CrossEncoder(out, threads=1, max_length=MAX_LENGTH)
    b = CrossEncoder(other, threads=1, max_length=MAX_LENGTH)
    assert a.score_fingerprint != b.score_fingerprint


def test_a_deadline_with_the_cache_stores_only_what_was_scored(qwen3, monkeypatch):
    _, out = qwen3
    ce = CrossEncoder(out, threads=1, max_length=MAX_LENGTH, max_batch_size=2, cache_bytes=1 << 20)
    docs = [d for _, d in _pairs(14)][:8]
    q = "protein binding"
    want = ce.predict([(q, d) for d in docs])  # all cached now
    ce.score_cache.clear()
    BatchClock(monkeypatch, ce)
    part = ce.predict([(q, d) for d in docs], deadline_ms=1500)  # two batches: 4 documents
    assert np.isfinite(part[:4]).all() and np.isnan(part[4:]).all()
    assert ce.cache_stats().entries == 4
    again = ce.predict([(q, d) for d in docs], deadline_ms=1500)  # 4 hits free, then 2 batches of misses
    np.testing.assert_array_equal(again[:4], part[:4])
    assert np.isfinite(again).all()
    np.testing.assert_allclose(again, want, atol=1e-6, rtol=0)


def test_cli_search_and_eval_take_an_instruction(qwen3, tmp_path, tmp_path_factory, capsys):
    from tailrank import Collection, Embedder
    from tailrank._cli_collection import evaluate

    _, out = qwen3
    emb_dir = models.exported_st(tmp_path_factory, pooling="mean", normalize=True)[1]
    ce = CrossEncoder(out, threads=1)
    docs = [d for _, d in _pairs(15)]
    col = Collection.create(tmp_path / "col", embedder=Embedder(emb_dir, threads=1), reranker=ce)
    ids = col.add(docs)
    q, inst = "insulin regulates glucose", "Find the passage about hormones"
    model_args = ["--embedder", str(emb_dir), "--reranker", str(out), "--threads", "1"]
    for extra in ([], ["--instruction", inst]):
        assert main(["search", str(tmp_path / "col"), q, "-k", "5", "--candidates", "12", "--json", *extra,
                     *model_args]) == 0
        got = json.loads(capsys.readouterr().out)["hits"]
        want = col.search(q, k=5, candidates=12, instruction=inst if extra else None)
        assert [h["id"] for h in got] == want.ids()
        np.testing.assert_allclose([h["rerank_score"] for h in got], [h.rerank_score for h in want.hits], atol=1e-5)
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"_id": f"q{j}", "text": docs[j][:30]}) + "\n" for j in range(4)))
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("".join(f"q{j}\t{ids[j]}\t1\n" for j in range(4)))
    assert main(["eval", str(tmp_path / "col"), "--queries", str(queries), "--qrels", str(qrels), "--candidates",
                 "12", "--instruction", inst, "--json", *model_args]) == 0
    ev = json.loads(capsys.readouterr().out)
    want = evaluate(col, {f"q{j}": docs[j][:30] for j in range(4)}, {f"q{j}": {str(ids[j]): 1} for j in range(4)},
                    candidates=12, instruction=inst)
    assert ev["reranked"] == pytest.approx(want["reranked"], abs=1e-9)
    col.close()
    # A sequence classifier has no instruction slot: a clear refusal, exit status 2.
    _, enc = models.exported(tmp_path_factory, "bert", 1)
    col = Collection.create(tmp_path / "enc", embedder=Embedder(emb_dir, threads=1), reranker=CrossEncoder(enc, threads=1))
    col.add(docs)
    col.close()
    assert main(["search", str(tmp_path / "enc"), q, "--instruction", inst, "--embedder", str(emb_dir),
                 "--reranker", str(enc)]) == 2
    assert "instruction" in capsys.readouterr().err
