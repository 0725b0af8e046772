"""Metadata filters: one small AST, validated once, translated to SQL over the ``fields`` table.

Every top-level metadata field of a document is one row of ``fields(doc_id, name, kind, value)``
with an index on ``(name, kind, value)``: an equality, ``$in`` or range condition is an index
range, so a selective filter reads only what it selects. Conditions combine as SQL set
operations on document ids (``INTERSECT`` for and, ``UNION`` for or, ``EXCEPT`` for negations);
the matching chunks' keys go into the HNSW walk as its allow-list.

Semantics (the tests hold a brute-force evaluator to these):

- ``{"f": v}`` is ``{"f": {"$eq": v}}``; several fields, or several operators on one field, must
  all hold; ``{"$and": [...]}`` / ``{"$or": [...]}`` take non-empty lists of filters.
- Values are str, int, float, bool or None. Numbers compare by value across int and float
  (``1 == 1.0``); bool is its own type (``True`` matches neither ``1`` nor ``"true"``); strings
  compare by code point. ``None`` matches a stored JSON null (``$eq``, ``$ne``, ``$in``, ``$nin``).
- ``$gt``/``$gte``/``$lt``/``$lte`` take a number or a string and match only values of that type.
- ``$ne``/``$nin`` match every document whose field does not equal the value(s), including
  documents without the field; ``$exists: false`` matches those without it. List and object
  values take part only in ``$exists`` (and so count as "not equal" for ``$ne``/``$nin``).
- A field name is any non-empty string not starting with ``$`` (quotes, dots, unicode alike:
  it is bound as a parameter, never spliced into SQL or a JSON path).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from ..errors import FilterError
from ._inputs import check_unicode

MAX_DEPTH = 8  # nesting of $and / $or
MAX_BRANCHES = 64  # filters in one $and / $or
MAX_CONDITIONS = 128  # field conditions in one filter (SQLite caps a compound SELECT at 500 terms)
MAX_LIST = 1000  # values in one $in / $nin
MAX_VALUES = 10_000  # values in one filter (bound parameters; SQLite allows 32,766)

# kinds of a stored field value
NULL, BOOL, NUMBER, STRING, OTHER = 0, 1, 2, 3, 4
_RANGE = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_OPS = ("$eq", "$ne", "$in", "$nin", "$exists", *_RANGE)
Scalar = Union[str, int, float, bool, None]


@dataclass(frozen=True)
class Cmp:
    field: str
    op: str  # one of _OPS but $in/$nin/$exists
    value: Scalar


@dataclass(frozen=True)
class In:
    field: str
    values: tuple[Scalar, ...]
    negate: bool


@dataclass(frozen=True)
class Exists:
    field: str
    present: bool


@dataclass(frozen=True)
class And:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Node, ...]


Node = Union[Cmp, In, Exists, And, Or]


def kind_of(v: Any) -> int:
    if v is None:
        return NULL
    if isinstance(v, bool):
        return BOOL
    if isinstance(v, (int, float)):
        return NUMBER
    if isinstance(v, str):
        return STRING
    return OTHER


def field_rows(doc_id: Any, meta: Mapping[str, Any]) -> list[tuple[Any, str, int, Any]]:
    """The ``fields`` rows of one document's (checked) metadata."""
    rows = []
    for name, v in meta.items():
        k = kind_of(v)
        value = int(v) if k == BOOL else (v if k in (NUMBER, STRING) else None)
        rows.append((doc_id, name, k, value))
    return rows


# --- parsing: the one validator of filters -------------------------------------------------------


class _Budget:
    def __init__(self) -> None:
        self.conditions = 0
        self.values = 0

    def spend(self, values: int) -> None:
        self.conditions += 1
        self.values += values
        if self.conditions > MAX_CONDITIONS:
            raise FilterError(f"a filter may hold at most {MAX_CONDITIONS} field conditions")
        if self.values > MAX_VALUES:
            raise FilterError(f"a filter may hold at most {MAX_VALUES} values in all")


def parse(flt: Any) -> Node:
    """Checks a filter and returns its AST; any problem is a FilterError that says what."""
    return _parse(flt, 1, _Budget())


def _parse(flt: Any, depth: int, budget: _Budget) -> Node:
    if not isinstance(flt, Mapping):
        raise FilterError(f"a filter must be a dict, got {type(flt).__name__}")
    if depth > MAX_DEPTH:
        raise FilterError(f"filters may nest $and/$or at most {MAX_DEPTH} deep")
    items: list[Node] = []
    for key, cond in flt.items():
        if not isinstance(key, str) or not key:
            raise FilterError(f"filter keys must be non-empty strings, got {key!r}")
        _unicode(key, "a filter key")
        if key in ("$and", "$or"):
            if not isinstance(cond, (list, tuple)) or not cond:
                raise FilterError(f"{key} takes a non-empty list of filters, got {cond!r}")
            if len(cond) > MAX_BRANCHES:
                raise FilterError(f"{key} may hold at most {MAX_BRANCHES} filters, got {len(cond)}")
            kids = tuple(_parse(c, depth + 1, budget) for c in cond)
            items.append(And(kids) if key == "$and" else Or(kids))
        elif key.startswith("$"):
            raise FilterError(f"unknown filter operator {key!r} at the top of a filter; known: $and, $or")
        elif isinstance(cond, Mapping):
            if not cond:
                raise FilterError(f"the condition on {key!r} has no operator")
            for op, arg in cond.items():
                items.append(_leaf(key, op, arg, budget))
        else:
            items.append(_leaf(key, "$eq", cond, budget))
    return items[0] if len(items) == 1 else And(tuple(items))


def _leaf(fld: str, op: Any, arg: Any, budget: _Budget) -> Node:
    if op not in _OPS:
        raise FilterError(f"unknown filter operator {op!r} on {fld!r}; known: {', '.join(_OPS)}")
    if op in ("$in", "$nin"):
        if not isinstance(arg, (list, tuple)):
            raise FilterError(f"{op} on {fld!r} takes a list, got {type(arg).__name__}")
        if len(arg) > MAX_LIST:
            raise FilterError(f"{op} on {fld!r} may hold at most {MAX_LIST} values, got {len(arg)}")
        budget.spend(len(arg))
        return In(fld, tuple(_scalar(fld, op, v) for v in arg), negate=op == "$nin")
    budget.spend(1)
    if op == "$exists":
        if not isinstance(arg, bool):
            raise FilterError(f"$exists on {fld!r} takes true or false, got {arg!r}")
        return Exists(fld, arg)
    v = _scalar(fld, op, arg)
    if op in _RANGE and kind_of(v) not in (NUMBER, STRING):
        raise FilterError(f"{op} on {fld!r} takes a number or a string, got {arg!r}")
    return Cmp(fld, op, v)


def _scalar(fld: str, op: str, v: Any) -> Scalar:
    if isinstance(v, str):
        return _unicode(v, f"the {op} value on {fld!r}")
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        if not -(2**63) <= v < 2**63:
            raise FilterError(f"{op} on {fld!r}: integer {v} is outside int64")
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise FilterError(f"{op} on {fld!r}: {v!r} is not a finite number")
        return v
    raise FilterError(f"filter values must be str, int, float, bool or None; got {v!r} for {op} on {fld!r}")


def _unicode(s: str, what: str) -> str:
    try:
        return check_unicode(s, what)
    except ValueError as e:  # the package's one Unicode check, as the filter's error type
        raise FilterError(str(e)) from e


# --- translation to SQL --------------------------------------------------------------------------

_ALL = "SELECT doc_id FROM docs"


def to_sql(node: Node) -> tuple[str | None, list[Any]]:
    """A SELECT of the matching documents' ids and its parameters; ``None``: every document."""
    return _sql(node)


def _sql(node: Node) -> tuple[str | None, list[Any]]:
    if isinstance(node, (And, Or)):
        parts: list[str] = []
        params: list[Any] = []
        for item in node.items:
            s, p = _sql(item)
            if s is None:
                if isinstance(node, Or):
                    return None, []  # one branch matches everything: so does the $or
                continue  # "everything" does not narrow an intersection
            parts.append(s)
            params += p
        if not parts:
            return None, []
        if len(parts) == 1:
            return parts[0], params
        glue = " INTERSECT " if isinstance(node, And) else " UNION "
        return glue.join(f"SELECT doc_id FROM ({p})" for p in parts), params
    if isinstance(node, Exists):
        inner = "SELECT doc_id FROM fields WHERE name = ?"
        return (inner if node.present else f"{_ALL} EXCEPT {inner}"), [node.field]
    if isinstance(node, In):
        by_kind: dict[int, list[Any]] = {}
        for v in node.values:
            by_kind.setdefault(kind_of(v), []).append(_stored(v))
        selects = []
        params = []
        for k, vals in sorted(by_kind.items()):
            if k == NULL:
                selects.append("SELECT doc_id FROM fields WHERE name = ? AND kind = ?")
                params += [node.field, NULL]
            else:
                marks = ",".join("?" * len(vals))
                selects.append(f"SELECT doc_id FROM fields WHERE name = ? AND kind = ? AND value IN ({marks})")
                params += [node.field, k, *vals]
        inner = " UNION ".join(selects) if selects else "SELECT doc_id FROM docs WHERE 0"
        return (f"{_ALL} EXCEPT SELECT doc_id FROM ({inner})" if node.negate else inner), params
    k = kind_of(node.value)
    if k == NULL:
        params = [node.field, NULL]
        inner = "SELECT doc_id FROM fields WHERE name = ? AND kind = ?"
    else:
        sym = _RANGE.get(node.op, "=")
        params = [node.field, k, _stored(node.value)]
        inner = f"SELECT doc_id FROM fields WHERE name = ? AND kind = ? AND value {sym} ?"
    return (f"{_ALL} EXCEPT {inner}" if node.op == "$ne" else inner), params


def _stored(v: Scalar) -> Any:
    return int(v) if isinstance(v, bool) else v


def fields_read(node: Node) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The field names a filter reads, each with the value kinds it compares (``()``: only
    ``$exists``), in first-seen order: the rows the store checks before trusting them."""
    seen: dict[str, set[int]] = {}

    def walk(n: Node) -> None:
        if isinstance(n, (And, Or)):
            for item in n.items:
                walk(item)
        elif isinstance(n, Exists):
            seen.setdefault(n.field, set())
        elif isinstance(n, In):
            seen.setdefault(n.field, set()).update(kind_of(v) for v in n.values)
        else:
            seen.setdefault(n.field, set()).add(kind_of(n.value))

    walk(node)
    return tuple((name, tuple(sorted(kinds))) for name, kinds in seen.items())
