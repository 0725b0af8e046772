"""The filter language (``_filters``) compiled to Milvus boolean expressions, over a typed
shadow of each document's metadata kept in the JSON field ``mf`` of every chunk row.

The shadow keeps the embedded store's semantics exact in Milvus, whose JSON comparisons would
otherwise mix types (``true == 1``) and whose JSON paths would splice user field names: a field
``name`` with value ``v`` becomes ``mf[<kind>_<h>]`` where ``h`` is a hash of the name (so no user
string ever appears as a path) and the kind prefix keeps numbers, strings, bools, nulls and
other values apart; ``e_<h>`` marks presence. String values are escaped into ASCII-only literals
(``\\uXXXX`` / ``\\UXXXXXXXX``), numbers are written by Python from checked finite values, so no
filter value can end a literal or add an operator.

Milvus compares JSON numbers as doubles; integers beyond +-2**53 would compare inexactly with
floats, so a Milvus collection refuses them in metadata and in filters (store them as strings).
Milvus 2.3's JSON ``in`` is unreliable for numbers (it ignores floats): numbers use ``==`` chains.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from ..errors import FilterError
from ._filters import BOOL, NULL, NUMBER, OTHER, STRING, And, Cmp, Exists, In, Node, Or, kind_of

EXACT_INT = 2**53  # the largest magnitude a double holds exactly with all integers below it
_PREFIX = {NULL: "z", BOOL: "b", NUMBER: "n", STRING: "s", OTHER: "o"}
_SYM = {"$eq": "==", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
ALL = "chunk >= 0"  # every row (chunk numbers start at 0)
NONE = "chunk < 0"


def _raw_key(kind: str, name: str) -> str:
    return f"{kind}_{hashlib.blake2b(name.encode('utf-8'), digest_size=8).hexdigest()}"


def _key(kind: str, name: str) -> str:
    return f'mf["{_raw_key(kind, name)}"]'  # hex only: no user string in the path


def check_number(v: Any, where: str) -> None:
    """Integers a Milvus collection compares exactly (ValueError otherwise)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > EXACT_INT:
        raise ValueError(f"{where}: integer {v} is beyond +-2**53, which Milvus compares inexactly; store it as a string")


def shadow(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The ``mf`` JSON of one document's checked metadata."""
    out: dict[str, Any] = {}
    for name, v in meta.items():
        k = kind_of(v)
        out[_raw_key("e", name)] = 1
        if k == NUMBER:
            check_number(v, f"metadata field {name!r}")
            out[_raw_key("n", name)] = v
        elif k in (STRING, BOOL):
            out[_raw_key(_PREFIX[k], name)] = v
        else:
            out[_raw_key(_PREFIX[k], name)] = 1
    return out


def literal(v: Any) -> str:
    """A Milvus expression literal of a checked scalar (str, int, float, bool)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        if abs(v) > EXACT_INT:
            raise FilterError(f"integer {v} is beyond +-2**53, which Milvus compares inexactly; store it as a string")
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise FilterError(f"{v!r} is not a finite number")
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    raise FilterError(f"no Milvus literal for {v!r}")


def _string(s: str) -> str:
    out = ['"']
    for ch in s:
        c = ord(ch)
        if 0x20 <= c < 0x7F and ch not in '"\\':
            out.append(ch)
        elif c <= 0xFFFF:
            out.append(f"\\u{c:04x}")
        else:
            out.append(f"\\U{c:08x}")
    out.append('"')
    return "".join(out)


def compile_filter(node: Node) -> str:
    """The Milvus expression of a parsed filter (rows of matching documents)."""
    if isinstance(node, (And, Or)):
        glue = " and " if isinstance(node, And) else " or "
        return "(" + glue.join(compile_filter(x) for x in node.items) + ")"
    if isinstance(node, Exists):
        e = f"{_key('e', node.field)} == 1"
        return f"({e})" if node.present else f"(not ({e}))"
    if isinstance(node, In):
        parts = [_eq(node.field, v) for v in node.values]
        inner = "(" + " or ".join(parts) + ")" if parts else f"({NONE})"
        return f"(not {inner})" if node.negate else inner
    assert isinstance(node, Cmp)
    if node.op == "$ne":
        return f"(not {_eq(node.field, node.value)})"
    if node.op == "$eq":
        return _eq(node.field, node.value)
    k = kind_of(node.value)
    return f"({_key(_PREFIX[k], node.field)} {_SYM[node.op]} {literal(node.value)})"


def _eq(field: str, v: Any) -> str:
    k = kind_of(v)
    if k == NULL:
        return f"({_key('z', field)} == 1)"
    return f"({_key(_PREFIX[k], field)} == {literal(v)})"
