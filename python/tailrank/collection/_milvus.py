"""The Milvus storage backend of :class:`Collection`: the same API over a Milvus server.

Milvus holds one row per chunk in the collection ``NAME``::

    pk     INT64 primary key: a hash of (document id, chunk number), so a repeated write of the
           same document lands on the same rows (upserts are idempotent, retries safe)
    emb    FLOAT_VECTOR[dim], HNSW with the collection's metric (COSINE, IP, L2)
    tok    ARRAY<INT32>: the reranker's token ids of the chunk, cut to
           min(max_length - specials + 1, 4096) tokens (longer pairs are truncated anyway)
    cut    BOOL: the cut dropped tokens a pair could hold (only when that cap is 4096): ``truncated``
    doc    VARCHAR: the document id, typed ("i:12", "s:abc")
    chunk  INT32: the chunk number within its document
    text   VARCHAR: the chunk's text; ``full``: the whole text on chunk 0 of a chunked document
    meta   VARCHAR: the metadata JSON as the embedded store keeps it (exact round trip)
    mf     JSON: the typed filter shadow of the metadata (see ``_milvus_expr``)

and the side collection ``NAME__tailrank`` one row: the manifest (format, metric, dim, chunking,
model fingerprints, the default fusion, the next automatic id). A side collection, not the
collection's description or properties, because the manifest changes (``set_default_fusion``,
automatic ids) and Milvus 2.3 cannot alter a description; a side collection is also where
``open`` finds out that a name is a tailrank collection at all (written last on create).

A search is one Milvus ``search`` with ``output_fields``: the candidates' ids, scores, token
arrays, texts and metadata come back together; the pairs are assembled from those arrays (no
re-tokenization, no second round trip), then scored as in the embedded store.

Milvus has no multi-row transactions. A write goes in batches of whole documents; a batch that
fails is retried (upserts by pk are idempotent), and a write that still fails raises
:class:`BackendError` saying which documents were stored, so repeating it with ``upsert``
completes it. Searches read at the URI's consistency level (default ``Strong``: every write
acknowledged before the search started). Automatic ids come from a counter in the manifest:
give explicit ids when several processes add to one collection.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from ..cross_encoder import CrossEncoder
from ..embedder import Embedder
from ..errors import (
    BackendError,
    CorruptFileError,
    DuplicateIdError,
    FusionError,
    LimitError,
    ModelError,
    ModelMismatchError,
    TailrankError,
    UnknownIdError,
)
from . import _filters
from ._chunking import Chunker
from ._collection import Collection
from ._fusion import Fusion
from ._fusion import resolve as resolve_fusion
from ._inputs import DocId, check_ids, metadata_json
from ._location import MilvusURI
from ._fusion import from_manifest
from ._manifest import FORMAT_VERSION, as_embedder, as_reranker, check_model, model_entry
from ._milvus_expr import ALL, compile_filter, literal, shadow
from ._results import Candidates, SearchPlan, ms

SIDE_SUFFIX = "__tailrank"
MAX_TOKENS = 4096  # Milvus's cap on an ARRAY field's elements
MAX_VARCHAR = 65535  # bytes in a Milvus VARCHAR: a longer text or metadata is a LimitError
MAX_ID_BYTES = 1024
MAX_TOPK = 16384  # Milvus's cap on a search's limit
WRITE_ATTEMPTS = 3
_METRIC = {"cosine": "COSINE", "ip": "IP", "l2": "L2"}
_LIST = 1000  # ids per query expression
T = TypeVar("T")


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as e:  # the [milvus] extra
        raise ModelError("a milvus:// collection needs pymilvus: pip install 'tailrank[milvus]'") from e
    return pymilvus


def doc_key(i: DocId) -> str:
    return f"i:{i}" if isinstance(i, int) else f"s:{i}"


def from_key(k: str) -> DocId:
    if k.startswith("i:"):
        return int(k[2:])
    if k.startswith("s:"):
        return k[2:]
    raise CorruptFileError(f"a Milvus row holds the document id {k!r}, which tailrank did not write")


def chunk_pk(key: str, j: int) -> int:
    h = hashlib.blake2b(f"{key}\x00{j}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8"))


class MilvusCollection(Collection):
    """A :class:`Collection` whose chunks live in a Milvus collection (``milvus://HOST:PORT/NAME``).
    Create and open it through :meth:`Collection.create` / :meth:`Collection.open` with the URI."""

    uri: MilvusURI
    token_cap: int
    write_batch_rows: int
    write_backoff_s: float
    ef_default: int
    index_wait_s: float
    _conn: Any
    _sleep: Callable[[float], None]

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def create_at(
        cls,
        uri: MilvusURI,
        *,
        embedder: Any,
        reranker: Any,
        metric: str,
        chunk_tokens: int | None,
        chunk_overlap: int,
        M: int,
        ef_construction: int,
        threads: int | None,
    ) -> MilvusCollection:
        emb = as_embedder(embedder, threads)
        rr = as_reranker(reranker, threads)
        client = connect(uri)
        side = uri.name + SIDE_SUFFIX
        if _call(uri, "has_collection", client.has_collection, uri.name) or \
                _call(uri, "has_collection", client.has_collection, side):
            raise FileExistsError(f"{uri} exists; use Collection.open (or drop the Milvus collections {uri.name} "
                                  f"and {side})")
        cap = min(int(rr._doc_cap), MAX_TOKENS) if rr is not None else 0  # more never fits a pair
        manifest = {
            "format": "tailrank.collection",
            "format_version": FORMAT_VERSION,
            "store": "milvus",
            "metric": metric,
            "dim": int(emb.dim),
            "chunk_tokens": chunk_tokens,
            "chunk_overlap": chunk_overlap,
            "M": int(M),
            "ef_construction": int(ef_construction),
            "token_cap": cap,
            "next_auto_id": 0,
            "embedder": model_entry(emb),
            "reranker": model_entry(rr) if rr is not None else None,
        }
        pm = _pymilvus()
        DataType = pm.DataType
        s = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                          description="tailrank collection (see NAME__tailrank)")
        s.add_field("pk", DataType.INT64, is_primary=True)
        s.add_field("emb", DataType.FLOAT_VECTOR, dim=int(emb.dim))
        if rr is not None:
            s.add_field("tok", DataType.ARRAY, element_type=DataType.INT32, max_capacity=max(cap, 1))
            s.add_field("cut", DataType.BOOL)
        s.add_field("doc", DataType.VARCHAR, max_length=MAX_ID_BYTES + 2)
        s.add_field("chunk", DataType.INT32)
        s.add_field("text", DataType.VARCHAR, max_length=MAX_VARCHAR)
        s.add_field("full", DataType.VARCHAR, max_length=MAX_VARCHAR)
        s.add_field("meta", DataType.VARCHAR, max_length=MAX_VARCHAR)
        s.add_field("mf", DataType.JSON)
        ip = client.prepare_index_params()
        ip.add_index(field_name="emb", index_type="HNSW", metric_type=_METRIC[metric],
                     params={"M": int(M), "efConstruction": int(ef_construction)})
        _call(uri, "create_collection", client.create_collection, uri.name, schema=s,
              consistency_level=uri.consistency)
        _call(uri, "create_index", client.create_index, uri.name, ip)
        ss = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                           description="tailrank manifest of " + uri.name)
        ss.add_field("pk", DataType.INT64, is_primary=True)
        ss.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus wants a vector field in every collection
        ss.add_field("manifest", DataType.VARCHAR, max_length=MAX_VARCHAR)
        sp = client.prepare_index_params()
        sp.add_index(field_name="v", index_type="FLAT", metric_type="L2")
        _call(uri, "create_collection", client.create_collection, side, schema=ss, consistency_level="Strong")
        _call(uri, "create_index", client.create_index, side, sp)
        _load(uri, client, [uri.name, side])
        _write_manifest(uri, client, manifest)  # last: its presence marks a whole collection
        return cls._attach(uri, client, manifest, emb, rr, threads)

    @classmethod
    def open_at(cls, uri: MilvusURI, *, embedder: Any, reranker: Any, threads: int | None) -> MilvusCollection:
        client = connect(uri)
        manifest = read_manifest(uri, client)
        _load(uri, client, [uri.name])  # released (or never loaded) after a restart: searchable again
        emb = as_embedder(embedder if embedder is not None else _recorded(manifest, "embedder", uri), threads)
        rr_src = reranker
        if rr_src is None and manifest["reranker"] is not None:
            rec = Path(manifest["reranker"]["path"])
            rr_src = rec if rec.is_dir() else None
        rr = as_reranker(rr_src, threads)
        return cls._attach(uri, client, manifest, emb, rr, threads)

    @classmethod
    def _attach(cls, uri: MilvusURI, client: Any, m: dict[str, Any], emb: Embedder, rr: CrossEncoder | None,
                threads: int | None) -> MilvusCollection:
        where: Any = str(uri)
        check_model(m["embedder"], emb, "embedder", where)
        if rr is not None:
            if m["reranker"] is None:
                raise ModelMismatchError(f"the collection at {uri} was created without a reranker; create it with one "
                                         "to rerank")
            check_model(m["reranker"], rr, "reranker", where)
        if int(emb.dim) != int(m["dim"]):
            raise ModelMismatchError(f"the embedder gives {emb.dim}-d vectors; the collection holds {m['dim']}-d")
        self = object.__new__(cls)
        self.uri = uri
        self.path = where
        self._conn = client
        self._manifest = m
        self._fusion_default = _stored_fusion(m, uri)
        self.embedder, self.reranker = emb, rr
        self.metric, self.dim = str(m["metric"]), int(m["dim"])
        self.chunk_tokens, self.chunk_overlap = m["chunk_tokens"], int(m["chunk_overlap"])
        self._threads = threads
        self._has_store = m["reranker"] is not None
        self._chunker = Chunker(emb, int(self.chunk_tokens), self.chunk_overlap) if self.chunk_tokens else None
        self.token_cap = int(m["token_cap"])
        self.checkpoint_error = None
        # close() here drops the connection and a later call reconnects: never closed for good.
        self._closed, self._users, self._users_cond = False, 0, threading.Condition()
        self._use_depth = threading.local()
        self.write_batch_rows = 512
        self.write_backoff_s = 0.5
        self.index_wait_s = 600.0
        self._sleep = time.sleep
        self.ef_default = max(64, int(m["ef_construction"]) // 2)  # as the embedded index
        return self

    # --- calls to the server -----------------------------------------------------------------

    @property
    def _client(self) -> Any:
        """The connection; after :meth:`close` a call reconnects (as the embedded store reopens
        its database)."""
        if self._conn is None:
            self._conn = connect(self.uri)
        return self._conn

    def _do(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return _call(self.uri, what, fn, *args, **kwargs)

    def _query(self, flt: str, fields: list[str], limit: int | None = None) -> list[dict[str, Any]]:
        kw: dict[str, Any] = {"filter": flt, "output_fields": fields, "consistency_level": self.uri.consistency}
        if limit is not None:
            kw["limit"] = limit
        return list(self._do("query", self._client.query, self.uri.name, **kw))

    # --- reading -----------------------------------------------------------------------------

    def __len__(self) -> int:
        rows = self._query("chunk == 0", ["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def __contains__(self, id: object) -> bool:
        if not isinstance(id, (int, str)) or isinstance(id, bool):
            return False
        try:
            want = check_ids([id], 1)
        except (TypeError, ValueError):
            return False
        return bool(self._existing(want))

    @property
    def chunk_count(self) -> int:  # type: ignore[override]
        """Chunks in the Milvus collection."""
        rows = self._query(ALL, ["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def _existing(self, ids: Sequence[DocId]) -> list[DocId]:
        found: list[DocId] = []
        keys = [doc_key(i) for i in ids]
        for s in range(0, len(keys), _LIST):
            part = keys[s : s + _LIST]
            expr = f"doc in [{', '.join(literal(k) for k in part)}] and chunk == 0"
            found += [from_key(r["doc"]) for r in self._query(expr, ["doc"], limit=len(part))]
        return found

    def get(self, ids: Sequence[DocId]) -> list[dict[str, Any]]:
        want = check_ids(ids, len(ids) if isinstance(ids, Sequence) and not isinstance(ids, str) else -1)
        rows: dict[str, dict[str, Any]] = {}
        keys = [doc_key(i) for i in want]
        for s in range(0, len(keys), _LIST):
            part = keys[s : s + _LIST]
            expr = f"doc in [{', '.join(literal(k) for k in part)}] and chunk == 0"
            for r in self._query(expr, ["doc", "text", "full", "meta"], limit=len(part)):
                rows[r["doc"]] = r
        missing = [i for i, k in zip(want, keys) if k not in rows]
        if missing:
            raise UnknownIdError(f"{len(missing)} unknown id(s), e.g. {missing[0]!r}")
        out = []
        for i, k in zip(want, keys):
            r = rows[k]
            out.append({"id": i, "text": r["full"] or r["text"], "metadata": _meta(r["meta"], self.uri)})
        return out

    # --- writing -----------------------------------------------------------------------------

    def delete(self, ids: Sequence[DocId]) -> None:
        want = check_ids(ids, -1)
        if not want:
            return
        have = {(type(i), i) for i in self._existing(want)}
        missing = [i for i in want if (type(i), i) not in have]
        if missing:
            raise UnknownIdError(f"{len(missing)} unknown id(s), e.g. {missing[0]!r}")
        keys = [doc_key(i) for i in want]
        for s in range(0, len(keys), _LIST):
            part = keys[s : s + _LIST]
            expr = f"doc in [{', '.join(literal(k) for k in part)}]"
            self._retry("delete", partial(self._client.delete, self.uri.name, filter=expr), s, len(keys))

    def _write(
        self,
        texts: Sequence[str],
        ids: Sequence[DocId] | None,
        metadata: Sequence[Mapping[str, Any] | None] | None,
        vectors: npt.ArrayLike | None,
        show_progress: bool | None,
        *,
        replace: bool,
    ) -> list[DocId]:
        # Every check, the chunking, embedding and tokenizing come before anything is sent.
        docs, given_ids, metas, vecs = self._check_write(texts, ids, metadata, vectors)
        n = len(docs)
        metas_json = [metadata_json(m) for m in metas]
        shadows = [shadow(m) for m in metas]
        for i, t in enumerate(docs):
            if _utf8_len(t) > MAX_VARCHAR:
                raise LimitError(f"text {i} is {_utf8_len(t)} bytes of UTF-8; a Milvus collection holds at most "
                                 f"{MAX_VARCHAR} per text (split it or chunk it into documents)")
            if _utf8_len(metas_json[i]) > MAX_VARCHAR:
                raise LimitError(f"metadata {i} is {_utf8_len(metas_json[i])} bytes as JSON; at most {MAX_VARCHAR}")
        for i, x in enumerate(given_ids or []):
            if isinstance(x, str) and _utf8_len(x) > MAX_ID_BYTES:
                raise LimitError(f"id {i} is {_utf8_len(x)} bytes; a Milvus collection takes ids of at most "
                                 f"{MAX_ID_BYTES}")
        if n == 0:
            return []
        if self._has_store and self.reranker is None:
            raise ModelError("this collection pre-tokenizes for its reranker; open it with the reranker to write")
        spans = self._chunker.spans(docs) if self._chunker is not None else [[(0, len(t))] for t in docs]
        chunk_texts = [docs[i][a:b] for i, sp in enumerate(spans) for a, b in sp]
        emb = vecs if vecs is not None else self._embed(chunk_texts, show_progress)
        tokens = self.reranker.tokenize(chunk_texts) if self._has_store and self.reranker is not None else None
        if given_ids is None:
            start = self._take_auto_ids(n)
            doc_ids: list[DocId] = list(range(start, start + n))
        else:
            doc_ids = list(given_ids)
            if not replace:
                taken = self._existing(doc_ids)
                if taken:
                    raise DuplicateIdError(f"{len(taken)} id(s) already exist, e.g. {taken[0]!r}; use upsert to replace")
        rows_of: list[list[dict[str, Any]]] = []
        j = 0
        for i, sp in enumerate(spans):
            key = doc_key(doc_ids[i])
            rows = []
            for c in range(len(sp)):
                row: dict[str, Any] = {
                    "pk": chunk_pk(key, c), "emb": emb[j].tolist(), "doc": key, "chunk": c, "text": chunk_texts[j],
                    "full": docs[i] if len(sp) > 1 and c == 0 else "", "meta": metas_json[i], "mf": shadows[i],
                }
                if tokens is not None:
                    tok = np.asarray(tokens[j], dtype=np.int32)
                    row["tok"] = tok[: self.token_cap].tolist()
                    row["cut"] = bool(tok.size > self.token_cap == MAX_TOKENS)
                rows.append(row)
                j += 1
            rows_of.append(rows)
        self._send(rows_of, doc_ids, replace)
        if given_ids is not None:
            top = max((x for x in given_ids if isinstance(x, int)), default=-1)
            if top >= int(self._manifest.get("next_auto_id", 0)):
                self._update_manifest(lambda m: m.__setitem__("next_auto_id", max(int(m["next_auto_id"]), top + 1)))
        return doc_ids

    def _send(self, rows_of: list[list[dict[str, Any]]], doc_ids: list[DocId], replace: bool) -> None:
        """Upserts whole documents in batches (each retried), then drops chunks an upsert left over."""
        n, done, s = len(rows_of), 0, 0
        while s < n:
            e, rows = s, list[dict[str, Any]]()
            while e < n and (not rows or len(rows) + len(rows_of[e]) <= self.write_batch_rows):
                rows += rows_of[e]
                e += 1
            self._retry("upsert", partial(self._client.upsert, self.uri.name, rows), done, n, doc_ids)
            done, s = e, e
        if replace:  # a shorter new version: its old chunks beyond the new count go
            by_count: dict[int, list[str]] = {}
            for i, rows in enumerate(rows_of):
                by_count.setdefault(len(rows), []).append(doc_key(doc_ids[i]))
            for count, keys in by_count.items():
                for p in range(0, len(keys), _LIST):
                    part = keys[p : p + _LIST]
                    expr = f"doc in [{', '.join(literal(k) for k in part)}] and chunk >= {count}"
                    self._retry("delete", partial(self._client.delete, self.uri.name, filter=expr), n, n, doc_ids)

    def _retry(self, what: str, fn: Callable[[], Any], done: int, total: int,
               doc_ids: Sequence[DocId] | None = None) -> None:
        pm = _pymilvus()
        last: BaseException | None = None
        for attempt in range(WRITE_ATTEMPTS):
            try:
                fn()
                return
            except (pm.exceptions.MilvusException, ConnectionError, TimeoutError, OSError) as e:
                last = e
                if attempt + 1 < WRITE_ATTEMPTS:
                    self._sleep(self.write_backoff_s * (attempt + 1))
        where = f"{done} of {total} documents were stored before it" if doc_ids is not None else \
            f"{done} of {total} ids were processed"
        first = f" (e.g. {doc_ids[done]!r} is not)" if doc_ids is not None and done < len(doc_ids) else ""
        raise BackendError(
            f"Milvus at {self.uri} failed the {what} after {WRITE_ATTEMPTS} attempts: {last}. {where}{first}; the write "
            "is idempotent: repeat it with upsert and the same ids to complete it. Check that the server is up and "
            "reachable, and its logs"
        ) from last

    def _take_auto_ids(self, n: int) -> int:
        got: list[int] = []

        def take(m: dict[str, Any]) -> None:
            got.append(int(m["next_auto_id"]))
            m["next_auto_id"] = got[0] + n

        self._update_manifest(take)  # before the documents: a failed write leaves a gap, never a reuse
        return got[0]

    def _update_manifest(self, change: Callable[[dict[str, Any]], None]) -> None:
        m = read_manifest(self.uri, self._client)
        change(m)
        _write_manifest(self.uri, self._client, m)
        self._manifest = m

    # --- searching ---------------------------------------------------------------------------

    def plan_search(self, query: str, **kwargs: Any) -> SearchPlan:  # type: ignore[override]
        plan = super().plan_search(query, **kwargs)
        if plan.candidates > MAX_TOPK:
            raise LimitError(f"candidates={plan.candidates}: Milvus returns at most {MAX_TOPK} per search")
        return plan

    def _where(self, node: _filters.Node) -> tuple[str, list[Any]] | None:
        return compile_filter(node), []

    def first_stage(
        self,
        plan: SearchPlan,
        query_vector: npt.NDArray[np.float32],
        query_tokens: npt.NDArray[np.int32] | None = None,
        *,
        assemble: bool = False,
    ) -> Candidates:
        """One Milvus search: ids, scores, token arrays, texts and metadata of the candidates."""
        timings = {"embed": 0.0, "ann": 0.0, "assemble": 0.0, "score": 0.0}
        fields = ["doc", "text", "meta"] + (["tok", "cut"] if plan.rerank else [])
        ef = max(plan.ef or self.ef_default, plan.candidates)
        t = time.perf_counter()
        res = self._do(
            "search", self._client.search, self.uri.name, data=[np.asarray(query_vector, np.float32).tolist()],
            anns_field="emb", limit=plan.candidates, filter=plan.where[0] if plan.where is not None else "",
            output_fields=fields, search_params={"metric_type": _METRIC[self.metric], "params": {"ef": ef}},
            consistency_level=self.uri.consistency,
        )
        hits = list(res[0]) if len(res) else []
        keys = np.fromiter((int(h["id"]) for h in hits), dtype=np.int64, count=len(hits))
        first = np.fromiter((float(h["distance"]) for h in hits), dtype=np.float32, count=len(hits))
        info: dict[int, tuple[DocId, str, dict[str, Any]]] = {}
        docs: list[npt.NDArray[np.int32]] | None = [] if plan.rerank else None
        cut = np.zeros(len(hits), dtype=bool)
        for i, h in enumerate(hits):
            e = h["entity"]
            info[int(h["id"])] = (from_key(e["doc"]), e["text"], _meta(e["meta"], self.uri))
            if docs is not None:
                docs.append(np.asarray(e["tok"], dtype=np.int32))
                cut[i] = bool(e["cut"])
        timings["ann"] = ms(t)  # the search with its token fetch
        return Candidates(keys, first, info, docs, None, timings, cut=cut if cut.any() else None)

    # --- state -------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Re-reads the manifest (a default fusion set elsewhere); searches always read the server."""
        fz = self._fusion_default
        self._manifest = read_manifest(self.uri, self._client)
        self._fusion_default = _stored_fusion(self._manifest, self.uri)
        return self._fusion_default != fz

    def checkpoint(self) -> bool:
        """Flushes the server's growing segments and waits (at most ``index_wait_s``) until the
        query nodes search every row through a sealed, indexed segment: the steady state, as the
        embedded store's checkpoint puts every chunk into the graph. Before that, Milvus searches
        recent rows through an interim index of lower recall (on SciFact 0.02 less Recall@100).

        Returns:
            False when the wait ran out (nothing is wrong; the server is still indexing).
        """
        self._do("flush", self._client.flush, self.uri.name)
        end = time.monotonic() + self.index_wait_s
        while not self._indexed():
            if time.monotonic() >= end:
                return False
            self._sleep(0.5)
        return True

    def _indexed(self) -> bool:
        info = self._do("describe_index", self._client.describe_index, self.uri.name, "emb")
        segs = self._do("list_loaded_segments", self._client.list_loaded_segments, self.uri.name)
        if int(info.get("pending_index_rows", 0)) or sum(int(g.num_rows) for g in segs) < int(info.get("total_rows", 0)):
            return False
        # Milvus builds no index for a segment under 1,024 rows (brute force there is exact).
        return all("Sealed" in str(g.state) and (g.index_name or int(g.num_rows) < 1024) for g in segs)

    def close(self, *, checkpoint: bool = True) -> None:
        if checkpoint:
            self.checkpoint()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a dead connection is not an error of the caller
                pass

    def set_default_fusion(
        self,
        fusion: Any,
        *,
        fusion_weight: float | None = None,
        rrf_k: int | None = None,
        tuned: Mapping[str, Any] | None = None,
    ) -> Fusion | None:
        fz = None if fusion is None else resolve_fusion(None, fusion, fusion_weight, rrf_k)
        if fusion is None and (fusion_weight is not None or rrf_k is not None):
            raise FusionError("fusion_weight and rrf_k need a fusion")
        entry = None
        if fz is not None:
            entry = fz.to_json()
            try:
                entry["tuned"] = json.loads(json.dumps(dict(tuned), allow_nan=False)) if tuned is not None else None
            except (TypeError, ValueError) as e:
                raise FusionError(f"tuned must be a JSON-able dict of finite numbers and strings: {e}") from None
        self._update_manifest(lambda m: m.__setitem__("fusion", entry))
        self._fusion_default = fz
        return fz

    def __repr__(self) -> str:
        return (f"Collection({str(self.uri)!r}, metric={self.metric!r}, "
                f"reranker={'yes' if self.reranker is not None else 'no'})")


# --- module functions: connection, manifest ---------------------------------------------------


def _call(uri: MilvusURI, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A server call; its failures become BackendError naming the URI and what to check."""
    pm = _pymilvus()
    try:
        return fn(*args, **kwargs)
    except TailrankError:
        raise
    except (pm.exceptions.MilvusException, ConnectionError, TimeoutError, OSError) as e:
        raise BackendError(f"Milvus at {uri} failed {what}: {e}. Check that the server is up and reachable at "
                           f"{uri.endpoint}, the token (TAILRANK_MILVUS_TOKEN) and TLS (milvus+https://)") from e


def _load(uri: MilvusURI, client: Any, names: list[str], within_s: float = 300.0) -> None:
    """Loads collections side by side (each load takes the server seconds) and waits, bounded."""
    for n in names:
        _call(uri, "load_collection", client.load_collection, n, _async=True)
    end = time.monotonic() + within_s
    for n in names:
        while "Loaded" not in str(_call(uri, "get_load_state", client.get_load_state, n).get("state")):
            if time.monotonic() >= end:
                raise BackendError(f"Milvus at {uri} did not load the collection {n} within {within_s:.0f} s; check "
                                   "the query nodes (memory, logs)")
            time.sleep(0.05)


def connect(uri: MilvusURI) -> Any:
    pm = _pymilvus()
    try:
        return pm.MilvusClient(**uri.client_kwargs())
    except Exception as e:  # noqa: BLE001 - any failure to connect is the server's side of things
        raise BackendError(f"cannot connect to Milvus at {uri} ({type(e).__name__}: {e}); check that the server runs "
                           f"and listens on {uri.endpoint}, the token (TAILRANK_MILVUS_TOKEN), TLS (milvus+https://) "
                           f"and the timeout (?timeout=S, now {uri.timeout:g} s)") from e


def read_manifest(uri: MilvusURI, client: Any | None = None) -> dict[str, Any]:
    """The manifest of the collection at ``uri``. FileNotFoundError: no tailrank collection there."""
    client = client if client is not None else connect(uri)
    side = uri.name + SIDE_SUFFIX
    if not _call(uri, "has_collection", client.has_collection, side):
        what = "a Milvus collection that tailrank did not create" if \
            _call(uri, "has_collection", client.has_collection, uri.name) else "no collection"
        raise FileNotFoundError(f"no tailrank collection at {uri} ({what} {uri.name}; no {side})")
    rows = _call(uri, "query", client.query, side, filter="pk == 0", output_fields=["manifest"],
                 consistency_level="Strong")
    if len(rows) != 1:
        raise CorruptFileError(f"the manifest of {uri} ({side}) is missing")
    try:
        m = json.loads(rows[0]["manifest"])
    except (TypeError, ValueError) as e:
        raise CorruptFileError(f"the manifest of {uri} ({side}) is not JSON: {e}") from None
    _check_manifest(m, uri)
    return m


def _check_manifest(m: Any, uri: MilvusURI) -> None:
    bad = CorruptFileError(f"the manifest of {uri} is damaged or not a tailrank Milvus manifest")
    if not isinstance(m, dict) or m.get("format") != "tailrank.collection" or m.get("store") != "milvus":
        raise bad
    if m.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(f"the manifest of {uri} has format version {m.get('format_version')}; this tailrank "
                               f"reads {FORMAT_VERSION}")
    ints = ("dim", "chunk_overlap", "M", "ef_construction", "token_cap", "next_auto_id")
    if m.get("metric") not in _METRIC or any(not isinstance(m.get(k), int) or isinstance(m.get(k), bool) or m[k] < 0
                                             for k in ints):
        raise bad
    if m.get("chunk_tokens") is not None and not isinstance(m["chunk_tokens"], int):
        raise bad
    for what in ("embedder", "reranker"):
        e = m.get(what)
        if e is None and what == "reranker":
            continue
        if not isinstance(e, dict) or not isinstance(e.get("fingerprint"), str) or not isinstance(e.get("path"), str):
            raise bad


def _write_manifest(uri: MilvusURI, client: Any, m: dict[str, Any]) -> None:
    text = json.dumps(m, sort_keys=True)
    _call(uri, "upsert", client.upsert, uri.name + SIDE_SUFFIX, [{"pk": 0, "v": [0.0, 0.0], "manifest": text}])


def _stored_fusion(m: dict[str, Any], uri: MilvusURI) -> Fusion | None:
    try:
        return from_manifest(m.get("fusion"), f"the manifest of {uri}")
    except FusionError as e:
        raise CorruptFileError(str(e)) from None


def _recorded(m: dict[str, Any], what: str, uri: MilvusURI) -> Path:
    rec = Path(m[what]["path"])
    if not rec.is_dir():
        raise ModelError(f"the collection's {what} {rec} (recorded in {uri}) is not on this machine; pass {what}= "
                         "explicitly")
    return rec


def recorded_model_dir(uri: MilvusURI, what: str) -> Path:
    """The model directory the collection at ``uri`` recorded (for servers that build their own)."""
    return _recorded(read_manifest(uri), what, uri)


def _meta(text: str, uri: MilvusURI) -> dict[str, Any]:
    try:
        m = json.loads(text)
    except (TypeError, ValueError):
        m = None
    if not isinstance(m, dict):
        raise CorruptFileError(f"a row of {uri} holds metadata tailrank did not write: {text[:80]!r}")
    return m
