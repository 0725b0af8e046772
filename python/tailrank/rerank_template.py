"""Rerank templates of decoder-only (LLM) rerankers: how a (query, document) pair becomes one
prompt, which two tokens' logits make the score, and the built-in layouts of the models people use.

A prompt is ``prefix + head + document + suffix`` where each part is tokenized on its own:

- ``prefix``: text before the query (a chat preamble), tokenized alone;
- ``head``: the ``query`` text (with ``{query}`` and maybe ``{instruction}``) and the ``middle``
  text; tokenized as one string when ``joined`` (Qwen3-Reranker tokenizes its whole
  ``<Instruct>/<Query>/<Document>`` body as one string), else ``query`` and ``middle`` alone;
- ``document``: the document's own segment (e.g. ``" {document}"``), tokenized alone; this is what
  a DocStore holds for the model, so the same ids go into every prompt;
- ``suffix``: text after the document, tokenized alone.

Everything before the document (prefix + head) is the same for every document of one request:
it is what the prefix-reuse path computes once.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .errors import CorruptFileError, ModelError

__all__ = ["RerankTemplate", "BUILTIN_TEMPLATES", "TEMPLATE_FILE", "load_template", "resolve_template"]

#: The file in a model directory that makes it an LLM reranker (written by ``tailrank export``).
TEMPLATE_FILE = "rerank_template.json"
_FORMAT = "tailrank-rerank-template"
_VERSION = 1
Score = Literal["sigmoid", "logit"]
_MAX_TEXT = 1 << 16  # characters per template text: far above any real prompt

# Slots each text may use.
_SLOTS = {
    "prefix": {"instruction"},
    "query": {"query", "instruction"},
    "middle": {"instruction"},
    "document": {"document"},
    "suffix": {"instruction"},
}


@dataclass(frozen=True)
class RerankTemplate:
    """A rerank template (see the module docstring for the layout).

    ``yes``/``no`` name the two tokens whose logits decide: ``score="sigmoid"`` is
    sigmoid(logit(yes) - logit(no)) (the two-way softmax); ``score="logit"`` is the raw logit of
    ``yes`` (``no`` unused). ``yes_id``/``no_id`` are the resolved token ids (set by export).
    ``instruction`` formats a given instruction into the ``{instruction}`` slots (e.g.
    ``"instruction: {instruction}\\n"``); without one, ``default_instruction`` is used, and with
    neither the slots are empty. ``query_share``: the query segment is cut to at most this share
    of ``max_length`` minus the suffix (bge-reranker-v2-gemma cuts ``A: {query}`` to 3/4).
    """

    name: str
    prefix: str
    query: str
    middle: str
    document: str
    suffix: str
    yes: str
    no: str | None
    score: Score = "sigmoid"
    joined: bool = False
    instruction: str = "{instruction}"
    default_instruction: str | None = None
    query_share: float | None = None
    max_length: int | None = None
    yes_id: int | None = None
    no_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def instruction_text(self, instruction: str | None) -> str:
        """The text that fills ``{instruction}`` slots for this request's instruction."""
        text = instruction if instruction is not None else self.default_instruction
        return "" if text is None else self.instruction.format(instruction=text)

    def texts(self, query: str, instruction: str | None) -> tuple[str, str, str, str]:
        """``(prefix, query, middle, suffix)`` texts for one request."""
        inst = self.instruction_text(instruction)
        return (
            self.prefix.format(instruction=inst),
            self.query.format(query=query, instruction=inst),
            self.middle.format(instruction=inst),
            self.suffix.format(instruction=inst),
        )

    def document_text(self, document: str) -> str:
        """The document's segment text."""
        return self.document.format(document=document)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return {"format": _FORMAT, "version": _VERSION, **d}

    def with_ids(self, yes_id: int, no_id: int | None) -> RerankTemplate:
        return replace(self, yes_id=yes_id, no_id=no_id)


_QWEN3_SYSTEM = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
    'Note that the answer can only be "yes" or "no".'
)
_BGE_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by "
    "providing a prediction of either 'Yes' or 'No'."
)
_MXBAI_TASK = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your "
    "binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)

#: The built-in layouts, by the name ``tailrank export --rerank-template`` takes.
BUILTIN_TEMPLATES: dict[str, RerankTemplate] = {
    # Qwen3-Reranker: the model card's prefix / body / suffix; the body is one string there, so
    # head and document must split at a pre-tokenizer boundary (after "<Document>:").
    "qwen3": RerankTemplate(
        name="qwen3",
        prefix=f"<|im_start|>system\n{_QWEN3_SYSTEM}<|im_end|>\n<|im_start|>user\n",
        query="<Instruct>: {instruction}\n<Query>: {query}",
        middle="\n<Document>:",
        document=" {document}",
        suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        yes="yes",
        no="no",
        score="sigmoid",
        joined=True,
        default_instruction="Given a web search query, retrieve relevant passages that answer the query",
        max_length=8192,
    ),
    # mxbai-rerank-v2 (Qwen2): chat preamble, "query: ..." / "document: ..." segments, the task
    # prompt and the assistant turn after the document; "1" vs "0".
    "mxbai-v2": RerankTemplate(
        name="mxbai-v2",
        prefix=(
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n{instruction}"
        ),
        query="query: {query}",
        middle="\n",
        document="document: {document}",
        suffix=f"\n{_MXBAI_TASK}<|im_end|>\n<|im_start|>assistant\n",
        yes="1",
        no="0",
        score="sigmoid",
        instruction="instruction: {instruction}\n",
        max_length=8192,
    ),
    # bge-reranker-v2-gemma: <bos> "A: {query}" "\n" "B: {passage}" "\n" prompt, each tokenized
    # alone; the score is the raw logit of "Yes"; the instruction is the prompt.
    "bge-gemma": RerankTemplate(
        name="bge-gemma",
        prefix="<bos>",
        query="A: {query}",
        middle="\n",
        document="B: {document}",
        suffix="\n{instruction}",
        yes="Yes",
        no=None,
        score="logit",
        default_instruction=_BGE_PROMPT,
        query_share=0.75,
        max_length=1024,
    ),
}


def _fail(where: str, msg: str, corrupt: bool) -> Exception:
    return (CorruptFileError if corrupt else ModelError)(f"{where}: {msg}")


def _check_format(text: Any, key: str, where: str, corrupt: bool) -> str:
    if not isinstance(text, str):
        raise _fail(where, f"{key!r} must be a string, got {type(text).__name__}", corrupt)
    if len(text) > _MAX_TEXT:
        raise _fail(where, f"{key!r} is longer than {_MAX_TEXT} characters", corrupt)
    allowed = _SLOTS.get(key, {"instruction"})
    try:
        parsed = list(string.Formatter().parse(text))
        fields = [f for _, f, _, _ in parsed if f is not None]
        for _, f, spec, conv in parsed:
            if f is not None and (spec or conv):
                raise ValueError(f"slot {{{f}}} may not have a format spec or conversion")
    except ValueError as e:
        raise _fail(where, f"{key!r} is not a valid template text ({e}); write a literal brace as {{{{ or }}}}", corrupt) from e
    for f in fields:
        if f not in allowed:
            raise _fail(where, f"{key!r} has slot {{{f}}}; allowed: {sorted('{' + s + '}' for s in allowed)}", corrupt)
    need = {"query": "query", "document": "document"}.get(key)
    if need is not None and fields.count(need) != 1:
        raise _fail(where, f"{key!r} must hold the {{{need}}} slot exactly once", corrupt)
    return text


def template_from_json(obj: Any, where: str, *, corrupt: bool) -> RerankTemplate:
    """Validates a template object (a template file's or a model directory's ``rerank_template.json``).

    ``corrupt``: failures raise CorruptFileError (a file tailrank wrote) instead of ModelError.
    """
    if not isinstance(obj, dict):
        raise _fail(where, "a rerank template must be a JSON object", corrupt)
    if obj.get("format", _FORMAT) != _FORMAT or obj.get("version", _VERSION) != _VERSION:
        raise _fail(where, f"not a {_FORMAT} version {_VERSION} file", corrupt)
    known = {f for f in RerankTemplate.__dataclass_fields__ if f != "extra"} | {"format", "version"}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise _fail(where, f"unknown keys {unknown}", corrupt)
    texts = {}
    for key in ("prefix", "query", "middle", "document", "suffix"):
        if key not in obj and key not in ("prefix", "middle", "suffix"):
            raise _fail(where, f"{key!r} is missing", corrupt)
        texts[key] = _check_format(obj.get(key, ""), key, where, corrupt)
    inst = _check_format(obj.get("instruction", "{instruction}"), "instruction", where, corrupt)
    yes = obj.get("yes")
    no = obj.get("no")
    score = obj.get("score", "sigmoid")
    if score not in ("sigmoid", "logit"):
        raise _fail(where, f"'score' must be \"sigmoid\" or \"logit\", got {score!r}", corrupt)
    if not isinstance(yes, str) or not yes:
        raise _fail(where, "'yes' must be a non-empty string (the positive answer token)", corrupt)
    if score == "sigmoid" and (not isinstance(no, str) or not no or no == yes):
        raise _fail(where, "'no' must be a non-empty string other than 'yes' when score is \"sigmoid\"", corrupt)
    if no is not None and not isinstance(no, str):
        raise _fail(where, "'no' must be a string or null", corrupt)
    default = obj.get("default_instruction")
    if default is not None and (not isinstance(default, str) or len(default) > _MAX_TEXT):
        raise _fail(where, "'default_instruction' must be a string or null", corrupt)
    joined = obj.get("joined", False)
    if not isinstance(joined, bool):
        raise _fail(where, "'joined' must be true or false", corrupt)
    share = obj.get("query_share")
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1):
        raise _fail(where, "'query_share' must be a number in (0, 1] or null", corrupt)
    if share is not None and joined:
        raise _fail(where, "'query_share' needs a query tokenized alone ('joined' false)", corrupt)
    max_length = obj.get("max_length")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or not 0 < max_length <= 1 << 20):
        raise _fail(where, "'max_length' must be a positive integer or null", corrupt)
    ids = {}
    for key in ("yes_id", "no_id"):
        v = obj.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise _fail(where, f"{key!r} must be a token id (integer >= 0) or null", corrupt)
        ids[key] = v
    name = obj.get("name", "custom")
    if not isinstance(name, str) or len(name) > 200:
        raise _fail(where, "'name' must be a short string", corrupt)
    return RerankTemplate(
        name=name, prefix=texts["prefix"], query=texts["query"], middle=texts["middle"], document=texts["document"],
        suffix=texts["suffix"], yes=yes, no=no, score=score, joined=joined, instruction=inst,
        default_instruction=default, query_share=None if share is None else float(share), max_length=max_length,
        yes_id=ids["yes_id"], no_id=ids["no_id"],
    )


def load_template(path: str | os.PathLike[str], *, corrupt: bool = True) -> RerankTemplate:
    """Reads and validates a template file (CorruptFileError, or ModelError with ``corrupt=False``)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        if len(raw) > 1 << 20:
            raise _fail(str(p), "larger than 1 MiB; not a rerank template", corrupt)
        obj = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ModelError(f"rerank template file not found: {p}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, (CorruptFileError, ModelError)):
            raise
        raise _fail(str(p), f"not valid UTF-8 JSON ({e})", corrupt) from e
    return template_from_json(obj, str(p), corrupt=corrupt)


def resolve_template(spec: str | os.PathLike[str]) -> RerankTemplate:
    """A built-in template by name, or a user's template file (errors are ModelError)."""
    if isinstance(spec, str) and spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if not Path(spec).is_file():
        raise ModelError(
            f"unknown rerank template {str(spec)!r}: use one of {sorted(BUILTIN_TEMPLATES)} or a template JSON file"
        )
    return load_template(spec, corrupt=False)
