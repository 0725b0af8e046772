"""Collection filters: every operator against a brute-force evaluator (hypothesis), limits and
bad filters as FilterError, one error type per kind of bad input, and index use; on both storage
backends (the embedded store and a real Milvus server), adversarial strings included."""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models

from tailrank import Embedder
from tailrank.collection import Collection
from tailrank.collection import _filters
from tailrank.collection._milvus_expr import EXACT_INT, compile_filter
from tailrank.errors import FilterError

from collection_fixtures import BACKENDS
from milvus_fixtures import milvus_uri

N = 24
# Field names that would break naive SQL or JSON paths.
NAMES = ["a", 'q"uote', "dot.ted", "ünï", "sp ace", "back\\slash", "'single'", "[0]"]
VALUES: list[Any] = [0, 1, -1, 2, 1.0, 0.5, -0.0, 2.5, 2**53 + 1, float(2**53), True, False, None,
                     "", "a", "b", "B", "ab", "é", "日本", "1", "true", "x\x00y"]
OTHERS: list[Any] = [[1, 2], {"k": 1}, []]


@pytest.fixture(scope="module", params=BACKENDS)
def col(request, tmp_path_factory):
    emb = Embedder(models.exported_st(tmp_path_factory, pooling="mean", normalize=True)[1], threads=1)
    if request.param == "embedded":
        where: Any = tmp_path_factory.mktemp("filters") / "c"
    else:
        where = milvus_uri(request.getfixturevalue("milvus_server"), "filters")
    c = Collection.create(where, embedder=emb)
    c.backend = request.param
    vecs = np.random.default_rng(0).standard_normal((N, emb.dim)).astype(np.float32)
    c.add([f"doc {i}" for i in range(N)], ids=[f"d{i}" for i in range(N)], vectors=vecs)
    c.vecs = vecs
    return c


# --- the oracle: the documented semantics, evaluated in Python -----------------------------------

_MISSING = object()
_CMP = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}


def _type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    return "other"


def _eq(a: Any, v: Any) -> bool:
    return v is not _MISSING and _type(v) == _type(a) != "other" and (a is None or a == v)


def _op(op: str, arg: Any, v: Any) -> bool:
    if op == "$eq":
        return _eq(arg, v)
    if op == "$ne":
        return not _eq(arg, v)
    if op == "$in":
        return any(_eq(a, v) for a in arg)
    if op == "$nin":
        return not any(_eq(a, v) for a in arg)
    if op == "$exists":
        return (v is not _MISSING) == arg
    return v is not _MISSING and _type(v) == _type(arg) and _CMP[op](v, arg)


def oracle(flt: dict[str, Any], meta: dict[str, Any]) -> bool:
    for key, cond in flt.items():
        if key == "$and":
            ok = all(oracle(f, meta) for f in cond)
        elif key == "$or":
            ok = any(oracle(f, meta) for f in cond)
        elif isinstance(cond, dict):
            ok = all(_op(op, arg, meta.get(key, _MISSING)) for op, arg in cond.items())
        else:
            ok = _op("$eq", cond, meta.get(key, _MISSING))
        if not ok:
            return False
    return True


# --- strategies ------------------------------------------------------------------------------------

values = st.sampled_from(VALUES)
range_values = st.sampled_from([v for v in VALUES if _type(v) in ("number", "string")])
metas = st.lists(
    st.dictionaries(st.sampled_from(NAMES), st.one_of(values, st.sampled_from(OTHERS)), max_size=4),
    min_size=N, max_size=N,
)


def _cond() -> st.SearchStrategy[Any]:
    ops = st.one_of(
        st.tuples(st.sampled_from(["$eq", "$ne"]), values),
        st.tuples(st.sampled_from(["$in", "$nin"]), st.lists(values, max_size=4)),
        st.tuples(st.sampled_from(list(_CMP)), range_values),
        st.tuples(st.just("$exists"), st.booleans()),
    )
    return st.one_of(values, st.lists(ops, min_size=1, max_size=2).map(dict))


leaf = st.dictionaries(st.sampled_from(NAMES), _cond(), min_size=1, max_size=2)
filters = st.recursive(
    leaf,
    lambda kids: st.one_of(
        st.builds(lambda xs: {"$and": xs}, st.lists(kids, min_size=1, max_size=3)),
        st.builds(lambda xs: {"$or": xs}, st.lists(kids, min_size=1, max_size=3)),
        st.builds(lambda a, b: {**a, **b}, leaf, st.builds(lambda xs: {"$or": xs}, st.lists(kids, min_size=1, max_size=2))),
    ),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(metas=metas, flts=st.lists(filters, min_size=1, max_size=5))
def test_every_operator_matches_the_brute_force_evaluator(col, metas, flts):
    metas, flts = _exact(col, metas), _exact(col, flts)
    ids = [f"d{i}" for i in range(N)]
    col.upsert([f"doc {i}" for i in range(N)], ids=ids, metadata=metas, vectors=col.vecs)
    for flt in flts:
        want = {i for i, m in zip(ids, metas) if oracle(flt, m)}
        got = {h.id for h in col.search("q", k=N, candidates=N, rerank=False, filter=flt).hits}
        assert got == want, flt


def _exact(col: Any, obj: Any) -> Any:
    """Milvus compares numbers as doubles and so refuses integers beyond +-2**53 (tested below):
    on it the one such value of VALUES becomes the largest exact one."""
    if col.backend != "milvus":
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool) and abs(obj) > EXACT_INT:
        return EXACT_INT - 1
    if isinstance(obj, dict):
        return {k: _exact(col, v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_exact(col, v) for v in obj]
    return obj


ATTACKS = ['" or chunk >= 0 or "', '\\" or true or \\"', "') or (1 == 1", '"] == 1 or mf["', "\\", '"', "\n",
           "\u0022", "\\u0022 or true", "é\x00\u2028😀", "x\" || chunk >= 0 || \"", "not", "'"]
adversarial = st.one_of(st.text(max_size=10), st.sampled_from(ATTACKS))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(strs=st.lists(adversarial, min_size=N, max_size=N), probe=adversarial,
       op=st.sampled_from(["$eq", "$ne", "$gt", "$lte", "$in", "$nin"]), name=st.one_of(st.text(min_size=1), adversarial))
def test_adversarial_strings_are_values_never_syntax(col, strs, probe, op, name):
    """Any string as a value or a field name matches exactly what the evaluator says: quotes,
    backslashes, escapes and operators inside it never reach the store's query language."""
    if name.startswith("$") or not name:
        name = "f" + name
    metas = [{name: x} if i % 5 else {} for i, x in enumerate(strs)]
    ids = [f"d{i}" for i in range(N)]
    col.upsert([f"doc {i}" for i in range(N)], ids=ids, metadata=metas, vectors=col.vecs)
    arg: Any = [probe, strs[1]] if op in ("$in", "$nin") else probe
    flt = {name: {op: arg}}
    want = {i for i, m in zip(ids, metas) if oracle(flt, m)}
    got = {h.id for h in col.search("q", k=N, candidates=N, rerank=False, filter=flt).hits}
    assert got == want, flt
    assert all(ord(c) < 128 for c in compile_filter(_filters.parse(flt)))  # every literal escaped to ASCII


def test_integers_beyond_double_precision_are_refused_by_milvus(col):
    if col.backend == "embedded":  # SQLite compares them exactly
        col.upsert(["t"], ids=["big"], metadata=[{"n": 2**53 + 1}], vectors=col.vecs[:1])
        assert [h.id for h in col.search("q", k=N, candidates=N, rerank=False, filter={"n": 2**53 + 1}).hits] == ["big"]
        col.delete(["big"])
        return
    before = (len(col), col.chunk_count)
    with pytest.raises(ValueError, match="2\\*\\*53"):
        col.upsert(["t"], ids=["big"], metadata=[{"n": 2**53 + 1}], vectors=col.vecs[:1])
    with pytest.raises(FilterError, match="2\\*\\*53"):
        col.search("q", filter={"n": {"$gt": -(2**60)}}, rerank=False)
    assert (len(col), col.chunk_count) == before and "big" not in col


def test_documented_semantics(col):
    metas = [{"n": 1}, {"n": 1.0}, {"n": True}, {"n": "1"}, {"n": None}, {"n": [1]}, {}, {"n": 2}] + [{}] * (N - 8)
    col.upsert([f"doc {i}" for i in range(N)], ids=[f"d{i}" for i in range(N)], metadata=metas, vectors=col.vecs)

    def ids(flt):
        return {int(h.id[1:]) for h in col.search("q", k=N, candidates=N, rerank=False, filter=flt).hits}

    rest = set(range(8, N))
    assert ids({"n": 1}) == {0, 1}  # int and float by value; bool, string and list apart
    assert ids({"n": True}) == {2} and ids({"n": "1"}) == {3} and ids({"n": None}) == {4}
    assert ids({"n": {"$ne": 1}}) == {2, 3, 4, 5, 6, 7} | rest  # missing fields included
    assert ids({"n": {"$gte": 1}}) == {0, 1, 7} and ids({"n": {"$lt": "2"}}) == {3}
    assert ids({"n": {"$exists": True}}) == {0, 1, 2, 3, 4, 5, 7}
    assert ids({"n": {"$nin": [1, None]}}) == {2, 3, 5, 6, 7} | rest
    assert ids({"$or": [{"n": 2}, {"n": True}], "n": {"$exists": True}}) == {2, 7}


@pytest.mark.parametrize("col", ["embedded"], indirect=True)  # the SQL plan of the embedded store
def test_selective_conditions_read_an_index(col):
    db = col._reader()
    for flt in ({"a": 1}, {"a": {"$gte": 1, "$lt": 3}}, {"a": {"$in": ["x", 2]}}, {"$or": [{"a": 1}, {"b": "x"}]}):
        sql, params = _filters.to_sql(_filters.parse(flt))
        plan = " | ".join(r[-1] for r in db.execute(f"EXPLAIN QUERY PLAN SELECT key FROM chunks WHERE doc_id IN ({sql})",
                                                     params))
        assert "SCAN fields" not in plan and "fields_by_value" in plan, (flt, plan)
        assert "SCAN chunks" not in plan, (flt, plan)


def test_any_key_string_is_a_field_name(col):
    metas = [{name: i} for i, name in zip(range(N), NAMES * 3)]
    col.upsert([f"doc {i}" for i in range(N)], ids=[f"d{i}" for i in range(N)], metadata=metas, vectors=col.vecs)
    for i, name in enumerate(NAMES):
        got = {h.id for h in col.search("q", k=N, candidates=N, rerank=False, filter={name: i}).hits}
        assert got == {f"d{i}"}, name


BAD = [
    ([], "must be a dict"),
    ({"a": {"$regex": "x"}}, "unknown filter operator"),
    ({"$not": {"a": 1}}, "unknown filter operator"),
    ({"a": {}}, "no operator"),
    ({"a": [1, 2]}, "filter values"),
    ({"a": {"$in": "ab"}}, "takes a list"),
    ({"a": {"$in": list(range(_filters.MAX_LIST + 1))}}, f"at most {_filters.MAX_LIST} values"),
    ({"$or": [{"a": {"$in": list(range(900))}}] * 12}, f"at most {_filters.MAX_VALUES} values"),
    ({"$and": [{"a": i} for i in range(_filters.MAX_BRANCHES + 1)]}, f"at most {_filters.MAX_BRANCHES} filters"),
    ({"$and": [{"$or": [{f"f{i}": j} for j in range(50)]} for i in range(3)]}, f"at most {_filters.MAX_CONDITIONS}"),
    ({"a": {"$gt": None}}, "number or a string"),
    ({"a": {"$lt": True}}, "number or a string"),
    ({"a": {"$exists": 1}}, "true or false"),
    ({"a": float("nan")}, "finite"),
    ({"a": {"$eq": float("inf")}}, "finite"),
    ({"a": 2**70}, "int64"),
    ({"a": b"bytes"}, "filter values"),
    ({"$and": []}, "non-empty list"),
    ({"$or": {"a": 1}}, "non-empty list"),
    ({"": 1}, "non-empty strings"),
    ({1: 1}, "non-empty strings"),
    ({"a\udcff": 1}, "lone surrogate"),
    ({"a": "x\ud800"}, "lone surrogate"),
]


def _nested(depth: int) -> dict[str, Any]:
    f: dict[str, Any] = {"a": 1}
    for _ in range(depth):
        f = {"$and": [f]}
    return f


@pytest.mark.parametrize("flt,msg", BAD + [(_nested(_filters.MAX_DEPTH), f"at most {_filters.MAX_DEPTH} deep")])
def test_bad_filters_are_filter_errors_that_say_what_and_change_nothing(col, flt, msg):
    before = (len(col), col.chunk_count, col.search("q", k=5, rerank=False).ids())
    with pytest.raises(FilterError, match=msg.replace("$", r"\$").replace("[", r"\[")):
        col.search("q", filter=flt, rerank=False)
    assert (len(col), col.chunk_count, col.search("q", k=5, rerank=False).ids()) == before
    assert col.search("q", filter=_nested(_filters.MAX_DEPTH - 1), rerank=False) is not None


def test_a_lone_surrogate_is_one_error_type_everywhere(col):
    before = (len(col), col.chunk_count)
    bad = "x\udcff"
    calls = [
        lambda: col.add([bad]),
        lambda: col.add(["t"], ids=[bad]),
        lambda: col.add(["t"], metadata=[{bad: 1}]),
        lambda: col.add(["t"], metadata=[{"k": bad}]),
        lambda: col.add(["t"], metadata=[{"k": [{"deep": bad}]}]),
        lambda: col.search(bad, rerank=False),
        lambda: col.search("q", filter={"k": bad}, rerank=False),
        lambda: col.delete([bad]),
        lambda: col.get([bad]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="lone surrogate"):
            call()
    assert (len(col), col.chunk_count) == before
    assert bad not in col
    assert not math.isnan(col.search("q", k=1, rerank=False).hits[0].first_stage_score)
