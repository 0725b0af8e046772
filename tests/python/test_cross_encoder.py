"""CrossEncoder: fidelity against transformers' forward pass, the ranking API, errors, threads."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import models


from tailrank import CrossEncoder, DocStore  # noqa: E402
from tailrank.errors import ModelError  # noqa: E402

ATOL = 1e-4
CASES = [(f, n) for f in models.FAMILIES for n in (1, 2)]
# The OpenVINO provider comes with the onnxruntime-openvino wheel, which replaces onnxruntime:
# `make test-openvino` runs the tests named "openvino" in a virtual environment that has it.
HAS_OPENVINO = "OpenVINOExecutionProvider" in __import__("onnxruntime").get_available_providers()
DEVICES = ["cpu", "openvino"] if HAS_OPENVINO else ["cpu"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _reference_scores(logits: np.ndarray) -> np.ndarray:
    """sentence-transformers' default activation: sigmoid (1 logit), softmax p(label 1) (2 logits)."""
    if logits.shape[1] == 1:
        return _sigmoid(logits[:, 0])
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e[:, 1] / e.sum(axis=1)


def _assert_same_order(got: np.ndarray, want: np.ndarray, gap: float = 2 * ATOL) -> None:
    """Every two pairs whose reference scores differ by more than ``gap`` are ordered alike."""
    diff_want = want[:, None] - want[None, :]
    diff_got = got[:, None] - got[None, :]
    separated = diff_want > gap
    assert np.all(diff_got[separated] > 0), "ranking differs from the reference"


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{n}" for f, n in CASES])
def family_model(request, tmp_path_factory):
    family, labels = request.param
    return models.exported(tmp_path_factory, family, labels)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return models.exported(tmp_path_factory, "bert", 1)


# --- fidelity -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_predict_matches_transformers(family_model, device):
    hf_dir, model_dir = family_model
    raw = CrossEncoder(model_dir, activation="none", threads=2, device=device)
    scored = CrossEncoder(model_dir, threads=2, device=device)
    assert raw.device == device and raw.inference_precision == ("fp32" if device == "openvino" else None)
    pairs = models.mixed_pairs(seed=7)
    want = models.reference_logits(hf_dir, pairs, raw.max_length)
    assert raw.max_length == models.MAX_POSITIONS

    logits = raw.predict(pairs)
    assert logits.dtype == np.float32
    if raw.n_labels == 1:
        assert logits.shape == (len(pairs),)
        np.testing.assert_allclose(logits, want[:, 0], atol=ATOL, rtol=0)
    else:
        assert logits.shape == (len(pairs), 2)  # as sentence-transformers with no activation
        np.testing.assert_allclose(logits, want, atol=ATOL, rtol=0)

    scores = scored.predict(pairs)
    ref = _reference_scores(want)
    np.testing.assert_allclose(scores, ref, atol=ATOL, rtol=0)
    _assert_same_order(scores, ref)

    if raw.n_labels == 2:  # raw two-logit ranking orders by the log-odds of label 1
        docs = [d for _, d in pairs[:8]]
        ranked = raw.rank(pairs[0][0], docs)
        log_odds = raw.predict([(pairs[0][0], d) for d in docs]) @ np.array([-1.0, 1.0])
        assert [r["corpus_id"] for r in ranked] == list(np.argsort(-log_odds, kind="stable"))

    # Any input order: the same scores, permuted.
    perm = np.random.default_rng(3).permutation(len(pairs))
    np.testing.assert_allclose(scored.predict([pairs[i] for i in perm]), scores[perm], atol=1e-6, rtol=0)


def test_pairs_really_mix_short_empty_and_truncated(bert):
    ce = CrossEncoder(bert[1], threads=2)
    pairs = models.mixed_pairs(seed=7)
    assert any(q == "" for q, _ in pairs) and any(d == "" for _, d in pairs)
    truncated = [ce.rank(q, [d])[0]["truncated"] for q, d in pairs]
    assert any(truncated) and not all(truncated)


def test_long_query_takes_the_uncached_path_exactly(bert):
    hf_dir, model_dir = bert
    ce = CrossEncoder(model_dir, activation="none", threads=2)
    rng = random.Random(5)
    q = models.sample_text(rng, 120)  # longer than max_length on its own
    pairs = [(q, models.sample_text(rng, n)) for n in (0, 2, 30, 100, 200)]
    want = models.reference_logits(hf_dir, pairs, ce.max_length)[:, 0]
    np.testing.assert_allclose(ce.predict(pairs), want, atol=ATOL, rtol=0)
    # The same documents again with a short query come from the cache, cut, and still match.
    pairs2 = [("cell", d) for _, d in pairs]
    want2 = models.reference_logits(hf_dir, pairs2, ce.max_length)[:, 0]
    np.testing.assert_allclose(ce.predict(pairs2), want2, atol=ATOL, rtol=0)


def test_explicit_max_length_and_small_batches(bert):
    hf_dir, model_dir = bert
    ce = CrossEncoder(model_dir, activation="none", max_length=20, batch_tokens=40, max_batch_size=3, threads=1)
    pairs = models.mixed_pairs(seed=11, n=17)
    want = models.reference_logits(hf_dir, pairs, 20)[:, 0]
    np.testing.assert_allclose(ce.predict(pairs), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(ce.predict(pairs, batch_size=1), want, atol=ATOL, rtol=0)


def _int32_inputs(model_dir: Path, out: Path) -> Path:
    """A copy of the model whose graph takes int32 inputs (cast to int64 inside)."""
    import onnx  # noqa: E402
    from onnx import TensorProto, helper

    shutil.copytree(model_dir, out)
    path = out / "onnx" / "model.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    casts = []
    for inp in graph.input:
        inner = inp.name + "_int64"
        for node in graph.node:
            node.input[:] = [inner if x == inp.name else x for x in node.input]
        casts.append(helper.make_node("Cast", [inp.name], [inner], to=TensorProto.INT64))
        inp.type.tensor_type.elem_type = TensorProto.INT32
    for i, c in enumerate(casts):
        graph.node.insert(i, c)
    onnx.save(model, str(path))
    return out


def test_int32_inputs(bert, tmp_path):
    hf_dir, model_dir = bert
    ce = CrossEncoder(_int32_inputs(model_dir, tmp_path / "i32"), activation="none", threads=1)
    assert "int32" in repr(ce)
    pairs = models.mixed_pairs(seed=12, n=10)
    want = models.reference_logits(hf_dir, pairs, ce.max_length)[:, 0]
    np.testing.assert_allclose(ce.predict(pairs), want, atol=ATOL, rtol=0)


SHARED = Path(os.environ.get("TAILRANK_SHARED", Path(__file__).resolve().parents[3] / "shared"))
SCIFACT_MODEL = SHARED / "models" / "scifact-minilm-l6-ce"


@pytest.mark.slow
@pytest.mark.skipif(not SCIFACT_MODEL.is_dir(), reason=f"trained fixture not available at {SCIFACT_MODEL}")
def test_scifact_minilm_matches_transformers(tmp_path_factory):
    from tailrank.export import export

    out = export(SCIFACT_MODEL, tmp_path_factory.mktemp("scifact") / "onnx")
    ce = CrossEncoder(out, activation="none")
    assert ce.max_length == 384 and ce.n_labels == 1
    query = "Insulin resistance increases the risk of type 2 diabetes."
    docs = [
        "Insulin resistance is a major risk factor for type 2 diabetes mellitus. " * 3,
        "",
        "The heart pumps blood.",
        "Obesity, insulin resistance and glucose intolerance in a cohort study of adults. " * 40,  # truncated
        "Vaccines against influenza reduce mortality in older adults.",
    ]
    pairs = [(query, d) for d in docs]
    want = models.reference_logits(SCIFACT_MODEL, pairs, 384)[:, 0]
    got = ce.predict(pairs)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert [r["corpus_id"] for r in ce.rank(query, docs)] == list(np.argsort(-want, kind="stable"))


# --- API ------------------------------------------------------------------------------------


def test_rank_orders_best_first_with_sentence_transformers_keys(bert):
    ce = CrossEncoder(bert[1], threads=2)
    rng = random.Random(1)
    docs = [models.sample_text(rng, rng.randint(0, 80)) for _ in range(15)] + [""]
    scores = ce.predict([("protein binding", d) for d in docs])
    ranked = ce.rank("protein binding", docs, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == list(np.argsort(-scores, kind="stable"))
    assert set(ranked[0]) == {"corpus_id", "score", "text", "truncated"}
    for r in ranked:
        assert r["text"] == docs[r["corpus_id"]]
        assert r["score"] == pytest.approx(float(scores[r["corpus_id"]]))
    top = ce.rank("protein binding", docs, top_k=3)
    assert [r["corpus_id"] for r in top] == [r["corpus_id"] for r in ranked[:3]]
    assert "text" not in top[0]


def test_empty_inputs(bert):
    ce = CrossEncoder(bert[1], threads=2)
    assert ce.rank("query", []) == []
    assert ce.predict([]).shape == (0,)
    out = ce.predict([("", ""), ("q", ""), ("", "d")])
    assert out.shape == (3,) and np.all(np.isfinite(out))


def test_predict_groups_queries(bert):
    ce = CrossEncoder(bert[1], threads=2)
    pairs = models.mixed_pairs(seed=2, n=30)
    together = ce.predict(pairs)
    for q in {q for q, _ in pairs}:
        idx = [i for i, (qq, _) in enumerate(pairs) if qq == q]
        alone = ce.predict([pairs[i] for i in idx])
        np.testing.assert_allclose(together[idx], alone, atol=1e-6, rtol=0)


def test_rank_ids_from_docstore_matches_rank(bert):
    ce = CrossEncoder(bert[1], threads=2)
    rng = random.Random(4)
    docs = [models.sample_text(rng, rng.randint(0, 90)) for _ in range(12)]
    store = DocStore(ce.vocab_size)
    ids = np.arange(100, 112)
    store.add(ids, ce.tokenize_documents(docs))
    by_text = ce.rank("immune response", docs)
    by_id = ce.rank_ids("immune response", store, ids[::-1])
    assert [r["corpus_id"] for r in by_id] == [int(ids[r["corpus_id"]]) for r in by_text]
    for a, b in zip(by_id, by_text):
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
        assert a["truncated"] == b["truncated"]
    assert ce.rank_ids("q", store, []) == []
    with pytest.raises(ValueError, match="vocab_size"):
        ce.rank_ids("q", DocStore(ce.vocab_size + 1), ids)


def test_token_cache_is_bounded(bert):
    ce = CrossEncoder(bert[1], threads=1, cache_tokens=200)
    rng = random.Random(9)
    docs = [models.sample_text(rng, 30) for _ in range(40)]
    ce.rank("q", docs)
    assert 0 < ce._cache.tokens <= 200
    no_cache = CrossEncoder(bert[1], threads=1, cache_tokens=0)
    np.testing.assert_allclose(no_cache.predict([("q", d) for d in docs]), ce.predict([("q", d) for d in docs]))
    assert len(no_cache._cache) == 0


def test_threads_share_one_model(bert):
    ce = CrossEncoder(bert[1], threads=1)
    pairs = models.mixed_pairs(seed=5, n=40)
    want = ce.predict(pairs)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                results.append(ce.predict(pairs))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 20
    for r in results:
        np.testing.assert_allclose(r, want, atol=1e-6, rtol=0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_no_memory_growth_per_call(bert):
    ce = CrossEncoder(bert[1], threads=1)
    rng = random.Random(8)
    docs = [models.sample_text(rng, rng.randint(1, 90)) for _ in range(50)]
    for _ in range(5):
        ce.rank("cell growth", docs)
    before = _rss_bytes()
    for _ in range(60):
        ce.rank("cell growth", docs)
    assert _rss_bytes() - before < 4 << 20


def test_repr_and_properties(bert):
    ce = CrossEncoder(bert[1], threads=1)
    assert ce.device == "cpu" and ce.n_labels == 1
    assert ce.input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert "max_length=64" in repr(ce)


def _threads_at_nice(nice: int) -> set[int]:
    """Native ids of this process's threads whose nice value is ``nice`` (from /proc)."""
    out = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
        if int(fields[16]) == nice:  # field 19 of proc(5): nice
            out.add(int(task.name))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_nice_puts_onnx_runtime_threads_below_the_caller(bert):
    me = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    lowered = min(19, me + 5)
    before = _threads_at_nice(lowered)
    ce = CrossEncoder(bert[1], threads=2, nice=5)
    new = _threads_at_nice(lowered) - before
    assert new, "ONNX Runtime's intra-op thread should run 5 nice steps lower"
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == me  # the caller is untouched
    pairs = [("cell growth", "the cell grows"), ("risk", "a risk factor for disease in adults")] * 8
    np.testing.assert_array_equal(ce.predict(pairs), CrossEncoder(bert[1], threads=2).predict(pairs))
    with pytest.raises(ValueError, match="nice"):
        CrossEncoder(bert[1], threads=1, nice=-1)


def _idle_class_threads() -> set[int]:
    out = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            if os.sched_getscheduler(int(task.name)) == os.SCHED_IDLE:
                out.add(int(task.name))
        except OSError:  # the thread ended meanwhile
            continue
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_idle_priority_puts_onnx_runtime_threads_in_the_idle_class(bert):
    before = _idle_class_threads()
    ce = CrossEncoder(bert[1], threads=2, nice="idle")
    assert _idle_class_threads() - before, "ONNX Runtime's intra-op thread should be SCHED_IDLE"
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the caller is untouched
    pairs = [("cell growth", "the cell grows"), ("risk", "a risk factor for disease in adults")] * 8
    np.testing.assert_array_equal(ce.predict(pairs), CrossEncoder(bert[1], threads=2).predict(pairs))
    for bad in ("lowest", 20, 1.5):
        with pytest.raises(ValueError, match="nice"):
            CrossEncoder(bert[1], threads=1, nice=bad)


def test_cuda_request_without_cuda_falls_back_with_one_log_line(bert, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    with caplog.at_level(logging.INFO, logger="tailrank"):
        ce = CrossEncoder(bert[1], device="cuda", threads=1)
    assert ce.device == "cpu"
    lines = [r for r in caplog.records if r.name == "tailrank"]
    assert len(lines) == 1 and "CPU" in lines[0].getMessage()


@pytest.mark.skipif(HAS_OPENVINO, reason="OpenVINO is available here")
def test_openvino_request_without_openvino_falls_back_with_one_log_line(bert, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tailrank"):
        ce = CrossEncoder(bert[1], device="openvino", threads=1)
    assert ce.device == "cpu" and ce.inference_precision is None
    lines = [r for r in caplog.records if r.name == "tailrank"]
    assert len(lines) == 1 and "onnxruntime-openvino" in lines[0].getMessage()
    # A directory that asks for bf16 on OpenVINO (tailrank optimize --bf16) scores its fp32 graph here.
    model = _copy(bert[1], tmp_path)
    (model / "tailrank.json").write_text(json.dumps({"device": "openvino", "precision": "bf16"}))
    pairs = models.mixed_pairs(seed=3)
    fallback = CrossEncoder(model, threads=1)
    assert fallback.device == "cpu"
    np.testing.assert_array_equal(fallback.predict(pairs), CrossEncoder(bert[1], threads=1).predict(pairs))
    assert fallback.fingerprint != ce.fingerprint  # the run-time settings are part of the identity


def test_bad_runtime_file(bert, tmp_path):
    model = _copy(bert[1], tmp_path)
    for bad in ('{"device": "tpu"}', '{"precision": "int4"}', "[1]", "{"):
        (model / "tailrank.json").write_text(bad)
        with pytest.raises(ModelError, match="tailrank.json"):
            CrossEncoder(model, threads=1)


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(), reason="needs onnxruntime-gpu"
)
def test_cuda_matches_cpu(bert):
    pairs = models.mixed_pairs(seed=3)
    cpu = CrossEncoder(bert[1], device="cpu").predict(pairs)
    gpu = CrossEncoder(bert[1], device="cuda")
    assert gpu.device == "cuda"
    np.testing.assert_allclose(gpu.predict(pairs), cpu, atol=ATOL, rtol=0)


# --- errors ---------------------------------------------------------------------------------


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    return out


def test_missing_directory_and_files(bert, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        CrossEncoder(tmp_path / "nope")
    d = _copy(bert[1], tmp_path)
    (d / "onnx" / "model.onnx").rename(d / "model.onnx")  # the top-level location works too
    assert CrossEncoder(d, threads=1).n_labels == 1
    (d / "model.onnx").unlink()
    with pytest.raises(ModelError, match="no ONNX model"):
        CrossEncoder(d)


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json"])
def test_missing_tokenizer_or_config(bert, tmp_path, name):
    d = _copy(bert[1], tmp_path)
    (d / name).unlink()
    with pytest.raises(ModelError, match=name.replace(".", r"\.")):
        CrossEncoder(d)


def test_invalid_onnx_and_json(bert, tmp_path):
    d = _copy(bert[1], tmp_path)
    (d / "onnx" / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ModelError, match="cannot load"):
        CrossEncoder(d)
    d2 = _copy(bert[1], tmp_path / "b")
    (d2 / "config.json").write_text("{ broken")
    with pytest.raises(ModelError, match="not valid JSON"):
        CrossEncoder(d2)


def test_tokenizer_larger_than_the_model(bert, tmp_path):
    d = _copy(bert[1], tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["vocab_size"] = 50
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="tokenizer .* tokens but the model embeds only 50"):
        CrossEncoder(d)


def _three_logit_graph(path: Path, declared: object) -> None:
    """A valid ONNX graph whose 'logits' are [N, 3]."""
    import onnx  # noqa: E402
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", declared])
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["f"], ["s"], keepdims=1),
        helper.make_node("Concat", ["s", "s", "s"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(nodes, "three", [ids, mask], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize("declared", [3, "labels"], ids=["declared", "found-at-first-inference"])
def test_not_a_cross_encoder(bert, tmp_path, declared):
    d = _copy(bert[1], tmp_path)
    _three_logit_graph(d / "onnx" / "model.onnx", declared)
    with pytest.raises(ModelError, match=r"\[N, 1\] or \[N, 2\]"):
        CrossEncoder(d)


def test_bad_arguments(bert):
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        CrossEncoder(bert[1], max_length=65)
    with pytest.raises(ValueError, match="activation"):
        CrossEncoder(bert[1], activation="softmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device"):
        CrossEncoder(bert[1], device="tpu")
    with pytest.raises(ValueError, match="batch_tokens"):
        CrossEncoder(bert[1], batch_tokens=10)
    ce = CrossEncoder(bert[1], threads=1)
    with pytest.raises(TypeError, match="pair 0"):
        ce.predict(["just a string"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="document 1"):
        ce.rank("q", ["ok", 3])  # type: ignore[list-item]


def test_building_blocks_match_rank_and_stop_at_a_deadline(bert):
    """batcher + score_assembly + scores_from_logits (what the server and Collection use) give
    rank()'s scores; a past deadline scores nothing; the fingerprint names the files."""
    import time

    ce = CrossEncoder(bert[1], threads=2, max_batch_size=4)
    rng = random.Random(7)
    docs = [models.sample_text(rng, rng.randint(0, 60)) for _ in range(13)]
    by_rank = {r["corpus_id"]: r["score"] for r in ce.rank("gene expression", docs)}
    (q,) = ce.tokenize(["gene expression"])
    assembly = ce.batcher().assemble(q, ce.tokenize(docs))
    logits, scored = ce.score_assembly(assembly)
    assert scored.all() and len(assembly.batches) >= 4
    scores = ce.scores_from_logits(logits)
    for i, s in by_rank.items():
        assert float(scores[i]) == pytest.approx(s, abs=1e-6)
    raw = ce.scores_from_logits(logits, raw=True)
    np.testing.assert_allclose(1 / (1 + np.exp(-raw.astype(np.float64))), scores, atol=1e-6)

    logits, scored = ce.score_assembly(ce.batcher().assemble(q, ce.tokenize(docs)), deadline=time.monotonic() - 1)
    assert not scored.any() and np.isnan(logits).all()

    assert len(ce.fingerprint) == 64
    assert CrossEncoder(bert[1], threads=1).fingerprint == ce.fingerprint
