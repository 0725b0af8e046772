"""Request and response bodies of the HTTP API: the Cohere/Jina and TEI rerank dialects (told apart
by the body: ``texts`` is TEI, ``documents`` is Cohere/Jina) and the collection search."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

__all__ = [
    "CohereRerankRequest",
    "TeiRerankRequest",
    "RerankRequest",
    "SearchRequest",
    "dialect_of",
    "document_text",
    "MAX_DEADLINE_MS",
]

MAX_DEADLINE_MS = 600_000.0

_DEADLINE = Field(
    default=None,
    gt=0,
    le=MAX_DEADLINE_MS,
    description="Time budget of this request in milliseconds (also the X-Request-Timeout-Ms header); "
    "past it the server answers with what it has ranked (degraded) and appends the rest in input order.",
)


_INSTRUCTION = Field(
    default=None,
    description="LLM rerankers: the task instruction of the prompt (default: the model's template's). "
    "Refused (422) when the served model is a sequence classifier, which has no instruction slot.",
)


class _Strict(BaseModel):
    # JSON types exactly (no "5" for 5); unknown fields are ignored, as SDKs add fields over time.
    model_config = ConfigDict(strict=True, extra="ignore")


class CohereRerankRequest(_Strict):
    """Cohere v1/v2 and Jina rerank request."""

    model: str | None = Field(default=None, description="Accepted and echoed; the server's model answers.")
    query: str
    documents: list[str | dict[str, Any]] = Field(
        description='Strings, or objects with a "text" field (or the fields named by rank_fields).'
    )
    top_n: int | None = Field(default=None, ge=1, description="Return only the best top_n (default: all).")
    return_documents: bool = False
    max_tokens_per_doc: int | None = Field(default=None, ge=1, description="Cut each document to this many tokens.")
    rank_fields: list[str] | None = Field(default=None, description="Cohere v1: object fields to rank on, in order.")
    max_chunks_per_doc: int | None = Field(default=None, description="Accepted and ignored (no chunking).")
    priority: int | None = Field(default=None, description="Accepted and ignored.")
    deadline_ms: float | None = _DEADLINE
    instruction: str | None = _INSTRUCTION


class TeiRerankRequest(_Strict):
    """Hugging Face text-embeddings-inference rerank request."""

    query: str
    texts: list[str]
    raw_scores: bool = Field(default=False, description="Raw logits instead of the model's activation.")
    return_text: bool = False
    truncate: bool | None = Field(
        default=None, description="Cut pairs longer than the model's max_length (default: the server's setting); "
        "false answers 413 for such a pair."
    )
    truncation_direction: Literal["Right", "Left", "right", "left"] = "Right"
    deadline_ms: float | None = _DEADLINE
    instruction: str | None = _INSTRUCTION


def dialect_of(body: Any) -> str:
    """``"tei"`` for a body with ``texts``, else ``"cohere"``."""
    if isinstance(body, dict):
        return "tei" if "texts" in body else "cohere"
    return "tei" if hasattr(body, "texts") else "cohere"


RerankRequest = Annotated[
    Union[Annotated[CohereRerankRequest, Tag("cohere")], Annotated[TeiRerankRequest, Tag("tei")]],
    Discriminator(dialect_of),
]


def document_text(doc: str | dict[str, Any], i: int, rank_fields: list[str] | None) -> str:
    """The text to rank of one Cohere document; ValueError names what is missing."""
    if isinstance(doc, str):
        return doc
    if rank_fields:
        parts = []
        for f in rank_fields:
            if f in doc:
                if not isinstance(doc[f], (str, int, float, bool)):
                    raise ValueError(f"documents[{i}].{f} must be a string or a number for rank_fields")
                parts.append(f"{f}: {doc[f]}")
        if not parts:
            raise ValueError(f"documents[{i}] has none of the rank_fields {rank_fields}")
        return "\n".join(parts)
    text = doc.get("text")
    if not isinstance(text, str):
        raise ValueError(f'documents[{i}] must be a string or an object with a string "text" field')
    return text


class SearchRequest(_Strict):
    """Search of the served collection: first stage, then rerank."""

    query: str
    k: int = Field(default=10, ge=1, description="Hits to return.")
    candidates: int = Field(default=100, ge=1, description="First-stage candidates to rerank.")
    filter: dict[str, Any] | None = Field(default=None, description="Metadata filter (see Collection.search).")
    rerank: bool = True
    deadline_ms: float | None = _DEADLINE
    fusion: Literal["none", "rrf", "linear"] | None = Field(
        default=None, description="How reranked hits are ranked (see Collection.search); null: the collection's default.")
    fusion_weight: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False, description="Linear fusion: the reranker's weight in [0, 1].")
    instruction: str | None = _INSTRUCTION


# --- responses (documentation of the OpenAPI schema; the handlers build plain dicts) -------------


class CohereDocument(BaseModel):
    text: str


class CohereResult(BaseModel):
    index: int
    relevance_score: float | None = Field(description="null for documents not ranked before the deadline")
    document: CohereDocument | None = None


class CohereMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    api_version: dict[str, Any]
    billed_units: dict[str, Any]
    tokens: dict[str, Any]
    degraded: bool
    scored: int


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: CohereMeta
    usage: dict[str, int]


class TeiRank(BaseModel):
    index: int
    score: float | None
    text: str | None = None


RerankResponse = Union[CohereRerankResponse, list[TeiRank]]


class SearchHit(BaseModel):
    id: int | str
    score: float | None = Field(description="What the hit was ranked by: fused_score when the search fused, "
                                "else rerank_score when reranked, else first_stage_score.")
    first_stage_score: float | None = Field(description="The first stage's score (ANN similarity; squared "
                                            "distance for an l2 collection).")
    rerank_score: float | None = Field(description="The reranker's score; null when the hit was not reranked "
                                       "(rerank false, or the deadline came first).")
    fused_score: float | None = Field(description="The fused score of first stage and reranker (see the "
                                      "response's fusion); null without fusion or when not reranked.")
    text: str
    metadata: dict[str, Any]
    truncated: bool
    reranked: bool


class SearchResponse(BaseModel):
    hits: list[SearchHit]
    degraded: bool
    fusion: Literal["none", "rrf", "linear"] = Field(description="How reranked hits were ranked.")
    fusion_weight: float | None = Field(description="The reranker's weight of a linear fusion, else null.")
    timings: dict[str, float]


class ErrorBody(BaseModel):
    detail: str
    error_type: str


Dialect = Literal["cohere", "tei"]
