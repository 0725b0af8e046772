"""The systems a benchmark compares: tailrank itself and the usual ways to run the same model.

Each factory returns a :data:`~tailrank.bench.measure.Scorer` ((query, documents) -> scores in
input order) that uses exactly ``threads`` compute threads. Factories raise ImportError when
their package is missing; callers report that as skipped.

  tailrank (docstore)  tailrank.CrossEncoder scoring pre-tokenized documents from a DocStore
                       (the product path); call :meth:`TailrankDocStore.ingest` before timing.
  tailrank (texts)     tailrank.CrossEncoder on raw texts with its token cache off.
  st                   sentence-transformers CrossEncoder (PyTorch), batch_size 32.
  st-onnx*, st-openvino*  sentence-transformers CrossEncoder on its ONNX / OpenVINO backends,
                       exported with its own helpers (O1-O4, dynamic int8, OpenVINO static int8).
  ort                  plain onnxruntime on the same graph: tokenizers ``encode_batch``, pairs in
                       input order, batches of 32 padded to their longest pair.
  flashrank            FlashRank's Ranker pointed at the same ONNX graph (offline), its session
                       rebuilt with the same thread budget.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "TailrankDocStore",
    "tailrank_texts",
    "st_system",
    "ort_session",
    "ort_plain_system",
    "flashrank_system",
    "PEER_BATCH",
    "time_system",
    "ST_BACKENDS",
    "st_backend_system",
]

from .measure import Request, Scorer, time_requests

PEER_BATCH = 32  # the peers' batch size (sentence-transformers' default)
F32 = npt.NDArray[np.float32]


class TailrankDocStore:
    """tailrank.CrossEncoder.rank_ids over a DocStore of the documents, keyed by their text."""

    def __init__(self, model_dir: str | os.PathLike[str], threads: int, device: str = "auto") -> None:
        from ..cross_encoder import CrossEncoder
        from ..docstore import DocStore

        self.ce = CrossEncoder(model_dir, threads=threads, device=device)
        if device != "auto" and self.ce.device != device:
            raise RuntimeError(f"device {device!r} is not available to this onnxruntime")
        self.store = DocStore(self.ce.vocab_size)
        self._ids: dict[str, int] = {}

    def ingest(self, docs: list[str]) -> None:
        """Pre-tokenizes documents not seen yet into the store (untimed, as in the product)."""
        fresh = [d for d in dict.fromkeys(docs) if d not in self._ids]
        if not fresh:
            return
        new_ids = np.arange(len(self._ids), len(self._ids) + len(fresh), dtype=np.int64)
        self._ids.update(zip(fresh, new_ids.tolist()))
        self.store.add(new_ids, self.ce.tokenize_documents(fresh))

    def __call__(self, query: str, docs: list[str]) -> F32:
        ids = np.array([self._ids[d] for d in docs], dtype=np.int64)
        ranked = self.ce.rank_ids(query, self.store, ids)
        pos = {int(i): k for k, i in enumerate(ids)}
        scores = np.empty(len(docs), dtype=np.float32)
        for r in ranked:
            scores[pos[r["corpus_id"]]] = r["score"]
        return scores


def tailrank_texts(model_dir: str | os.PathLike[str], threads: int) -> Any:
    """tailrank.CrossEncoder.rank on raw texts, tokenizing every document on every request."""
    from ..cross_encoder import CrossEncoder

    ce = CrossEncoder(model_dir, threads=threads, cache_tokens=0)

    def run(query: str, docs: list[str]) -> F32:
        scores = np.empty(len(docs), dtype=np.float32)
        for r in ce.rank(query, docs):
            scores[r["corpus_id"]] = r["score"]
        return scores

    return run


def st_system(hf_dir: str | os.PathLike[str], threads: int, max_length: int, *, bf16: bool = False) -> Any:
    """sentence-transformers CrossEncoder on the Hugging Face checkpoint (fp32 or bf16)."""
    import torch
    import transformers
    from sentence_transformers import CrossEncoder

    transformers.logging.disable_progress_bar()  # the benchmark shows its own progress
    torch.set_num_threads(threads)
    kwargs: dict[str, Any] = {"model_kwargs": {"torch_dtype": torch.bfloat16}} if bf16 else {}
    model = CrossEncoder(str(hf_dir), device="cpu", max_length=max_length, **kwargs)

    def run(query: str, docs: list[str]) -> F32:
        with torch.inference_mode():
            got = model.predict([(query, d) for d in docs], batch_size=PEER_BATCH, show_progress_bar=False)
        return np.asarray(got, dtype=np.float32)

    return run


def ort_session(onnx_path: str | os.PathLike[str], threads: int) -> Any:
    """A CPU ONNX Runtime session with ``threads`` intra-op threads and all graph optimizations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def ort_plain_system(model_dir: str | os.PathLike[str], threads: int, max_length: int) -> Any:
    """Plain onnxruntime: tokenizers encode_batch, input order, batches padded to their longest."""
    from tokenizers import Tokenizer

    from .._ort import find_onnx

    sess = ort_session(find_onnx(Path(model_dir)), threads)
    names = {i.name for i in sess.get_inputs()}
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.enable_truncation(max_length, strategy="longest_first")
    tok.enable_padding()

    def run(query: str, docs: list[str]) -> F32:
        out = []
        for s in range(0, len(docs), PEER_BATCH):
            enc = tok.encode_batch([(query, d) for d in docs[s : s + PEER_BATCH]])
            feed = {
                "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            }
            if "token_type_ids" in names:
                feed["token_type_ids"] = np.array([e.type_ids for e in enc], dtype=np.int64)
            out.append(sess.run(None, feed)[0][:, 0])
        logits = np.concatenate(out).astype(np.float32)
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)

    return run


def flashrank_system(model_dir: str | os.PathLike[str], threads: int, max_length: int, cache: str | os.PathLike[str]) -> Any:
    """FlashRank offline on our ONNX graph: the files are copied under a model name FlashRank
    knows, so it never downloads. Raises FileNotFoundError when the model lacks a file FlashRank
    reads (config.json, tokenizer_config.json, special_tokens_map.json, tokenizer.json)."""
    from flashrank import Ranker, RerankRequest
    from flashrank.Config import model_file_map

    from .._ort import find_onnx

    src = Path(model_dir)
    needed = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")
    missing = [f for f in needed if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(f"FlashRank reads {', '.join(missing)}, which {src} lacks")
    name = "ms-marco-MiniLM-L-12-v2"  # a name FlashRank knows; the files inside are ours
    target = Path(cache) / name
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(find_onnx(src), target / model_file_map[name])
    for f in (*needed, "vocab.txt"):
        if (src / f).exists():
            shutil.copy(src / f, target / f)
    ranker = Ranker(model_name=name, cache_dir=str(cache), max_length=max_length, log_level="WARNING")
    ranker.session = ort_session(target / model_file_map[name], threads)  # same thread budget

    def run(query: str, docs: list[str]) -> F32:
        res = ranker.rerank(RerankRequest(query=query, passages=[{"id": i, "text": d} for i, d in enumerate(docs)]))
        scores = np.empty(len(docs), dtype=np.float32)
        for r in res:
            scores[int(r["id"])] = float(r["score"])
        return scores

    return run


def time_system(
    factory: Callable[[], Scorer],
    requests: Sequence[Request],
    *,
    warmup: int = 2,
    repeats: int = 1,
    progress: Callable[[int], Any] | None = None,
) -> tuple[list[int], list[F32]]:
    """Builds a system, lets the DocStore path pre-tokenize the documents (untimed, as in the
    product), and times it with :func:`~tailrank.bench.measure.time_requests`. The system is
    released on return."""
    fn = factory()
    if isinstance(fn, TailrankDocStore):
        fn.ingest([d for _, docs in requests for d in docs])
    return time_requests(fn, requests, warmup=warmup, repeats=repeats, progress=progress)


# --- sentence-transformers' own backends -------------------------------------------------------
# CrossEncoder(backend="onnx" | "openvino") runs through optimum (optimum-onnx / optimum-intel),
# whose releases pin transformers ranges of their own: where they conflict with this environment's
# the suite runs these in a worker process over an overlay of compatible packages (see
# benchmarks/bench_scorer.py --st-onnx-path / --st-openvino-path).
ST_BACKENDS = {
    "st-onnx": ("onnx", None),
    "st-onnx-O1": ("onnx", "O1"),
    "st-onnx-O2": ("onnx", "O2"),
    "st-onnx-O3": ("onnx", "O3"),
    "st-onnx-O4": ("onnx", "O4"),
    "st-onnx-qint8": ("onnx", "qint8"),
    "st-openvino": ("openvino", None),
    "st-openvino-qint8": ("openvino", "qint8"),
}


def _checkpoint_copy(hf_dir: Path, work: Path) -> Path:
    """A writable copy of the checkpoint (sentence-transformers saves its exports next to it)."""
    dst = work / "st-checkpoint"
    if not (dst / "config.json").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        for f in hf_dir.iterdir():
            if f.is_file():
                shutil.copy(f, dst / f.name)
    return dst


def st_backend_system(
    hf_dir: str | os.PathLike[str], threads: int, max_length: int, name: str, work: str | os.PathLike[str],
    calibration: Sequence[tuple[str, str]] = (),
) -> Any:
    """sentence-transformers CrossEncoder on one of its backends (``ST_BACKENDS[name]``), exported
    with its own helpers into a copy of the checkpoint under ``work``: ``export_optimized_onnx_model``
    (O1-O4), ``export_dynamic_quantized_onnx_model`` ("avx512_vnni") and, for OpenVINO static int8,
    what ``export_static_quantized_openvino_model`` does (OVQuantizer, default OVQuantizationConfig,
    pairs padded to 384 tokens) with ``calibration`` pairs in place of its default GLUE download."""
    import onnxruntime as ort
    import transformers
    from sentence_transformers import CrossEncoder

    transformers.logging.disable_progress_bar()
    backend, variant = ST_BACKENDS[name]
    ckpt = _checkpoint_copy(Path(hf_dir), Path(work))
    kwargs: dict[str, Any] = {}
    if backend == "onnx":
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        kwargs = {"provider": "CPUExecutionProvider", "session_options": so}
    else:
        kwargs = {"ov_config": {"INFERENCE_NUM_THREADS": str(threads)}}
    if variant is None:
        model = CrossEncoder(str(ckpt), device="cpu", max_length=max_length, backend=backend, model_kwargs=kwargs)
    elif backend == "onnx":
        file_name = f"onnx/model_{variant}.onnx" if variant != "qint8" else "onnx/model_qint8_avx512_vnni.onnx"
        if not (ckpt / file_name).is_file():
            from sentence_transformers import export_dynamic_quantized_onnx_model, export_optimized_onnx_model

            base = CrossEncoder(str(ckpt), device="cpu", max_length=max_length, backend="onnx", model_kwargs=kwargs)
            if variant == "qint8":
                export_dynamic_quantized_onnx_model(base, "avx512_vnni", str(ckpt))
            else:
                export_optimized_onnx_model(base, variant, str(ckpt))
        model = CrossEncoder(str(ckpt), device="cpu", max_length=max_length, backend="onnx",
                             model_kwargs={**kwargs, "file_name": file_name})
    else:
        file_name = "openvino/openvino_model_qint8_quantized.xml"
        if not (ckpt / file_name).is_file():
            _st_openvino_static_int8(ckpt, max_length, kwargs, calibration)
        model = CrossEncoder(str(ckpt), device="cpu", max_length=max_length, backend="openvino",
                             model_kwargs={**kwargs, "file_name": file_name})

    def run(query: str, docs: list[str]) -> F32:
        got = model.predict([(query, d) for d in docs], batch_size=PEER_BATCH, show_progress_bar=False)
        return np.asarray(got, dtype=np.float32)

    return run


def _st_openvino_static_int8(ckpt: Path, max_length: int, kwargs: dict[str, Any], calibration: Sequence[tuple[str, str]]) -> None:
    from optimum.intel.openvino import OVConfig, OVQuantizationConfig, OVQuantizer  # isort: skip (named first when missing)
    import nncf
    from sentence_transformers import CrossEncoder

    if not calibration:
        raise ValueError("OpenVINO static int8 needs calibration pairs")
    base = CrossEncoder(str(ckpt), device="cpu", max_length=max_length, backend="openvino", model_kwargs=kwargs)
    cfg = OVConfig(quantization_config=OVQuantizationConfig(num_samples=len(calibration)))
    items = []
    for q, d in calibration:
        enc = base.tokenizer(q, d, padding="max_length", max_length=384, truncation=True, return_tensors="np")
        items.append({k: v for k, v in enc.items()})
    quantizer = OVQuantizer.from_pretrained(base.model)
    tmp = ckpt / "openvino-qint8-tmp"
    quantizer.quantize(nncf.Dataset(items), save_directory=str(tmp), ov_config=cfg)
    (ckpt / "openvino").mkdir(exist_ok=True)
    xml = next(tmp.rglob("openvino_model.xml"))  # optimum-intel versions differ in the subfolder
    shutil.move(str(xml.with_suffix(".bin")), str(ckpt / "openvino" / "openvino_model_qint8_quantized.bin"))
    shutil.move(str(xml), str(ckpt / "openvino" / "openvino_model_qint8_quantized.xml"))
    shutil.rmtree(tmp)
