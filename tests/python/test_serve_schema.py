"""Property-based tests of the HTTP API from its own OpenAPI schema (schemathesis): whatever body,
header or string the schema allows (and the negative cases it derives), no answer is a 5xx and
every answer conforms to the declared response schema. Auth off, on with the key, on without it;
a real tiny cross-encoder and a real Collection behind /search. Seeded (derandomized), bounded."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

import models

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from collection_fixtures import ce, ce_dir, emb, emb_dir  # noqa: E402,F401  (pytest fixtures)
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402
from tailrank import Collection  # noqa: E402
from tailrank.serve import create_app  # noqa: E402

KEY = "schema-key"
# Examples per operation and mode: 9 operations x 3 modes; the whole file stays well under a minute.
EXAMPLES = 30


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory, emb: Any, ce: Any) -> Iterator[Collection]:
    col = Collection.create(tmp_path_factory.mktemp("schema") / "col", embedder=emb, reranker=ce)
    rng = random.Random(7)
    col.add([models.sample_text(rng, rng.randint(3, 12)) for _ in range(40)],
            metadata=[{"year": 2000 + i % 5, "lang": "en" if i % 2 else "de"} for i in range(40)])
    yield col
    col.close()


def _no_5xx(response: Any, case: Any) -> None:
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text)


@pytest.mark.parametrize("mode", ["open", "key", "no_key"])
def test_openapi_schema_fuzz_no_5xx_and_responses_conform(ce: Any, collection: Collection, mode: str) -> None:
    app = create_app(ce, collection=collection, api_key=None if mode == "open" else KEY, default_deadline_ms=5_000)
    auth = {"Authorization": f"Bearer {KEY}"} if mode == "key" else {}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {KEY}"})
    assert app.state.tailrank.wait_ready(60)  # loading the schema started the lifespan
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/rerank", "/v1/rerank", "/v2/rerank", "/search", "/ready"}
    seen: dict[str, set[int]] = {}
    try:
        for op in operations:

            @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(), header=st.booleans())
            def check(case: Any, header: bool) -> None:
                headers = dict(auth)
                if header and "X-Request-Timeout-Ms" not in (case.headers or {}):
                    headers["X-Request-Timeout-Ms"] = "5000"
                response = case.call(headers=headers)
                _no_5xx(response, case)
                # Lone surrogates (valid JSON, not Unicode) and the server's configured limits are
                # 4xx by design though the schema allows them: that one check is off.
                case.validate_response(response, excluded_checks=[positive_data_acceptance])
                seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
                if mode == "no_key" and case.path != "/health":
                    assert response.status_code == 401

            check()
    finally:
        from schemathesis.python import asgi

        asgi.shutdown_lifespans()  # stops this app's scheduler
    if mode != "no_key":  # the fuzzing reached the model, not only the validators
        assert 200 in seen["POST /rerank"] and 200 in seen["POST /search"], seen


def test_search_response_schema_documents_every_score(ce: Any, collection: Collection) -> None:
    """The OpenAPI schema of /search names the ranking score and the scores it came from, each
    described and required (null where it does not apply), and the fusion the search used."""
    schema = create_app(ce, collection=collection).openapi()["components"]["schemas"]
    hit = schema["SearchHit"]
    for name in ("score", "first_stage_score", "rerank_score", "fused_score"):
        assert name in hit["required"] and hit["properties"][name]["description"], name
        assert {"type": "null"} in hit["properties"][name]["anyOf"], name
    response = schema["SearchResponse"]
    assert {"hits", "degraded", "fusion", "fusion_weight", "timings"} <= set(response["required"])
    assert response["properties"]["fusion"]["enum"] == ["none", "rrf", "linear"]
