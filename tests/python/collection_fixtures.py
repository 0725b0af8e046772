"""Module-scoped models shared by the Collection test modules (seeded tiny models, no hub), and
the two storage backends the behaviour-defining tests run against: ``embedded`` (a folder) and
``milvus`` (a collection on the session's real Milvus server, see milvus_fixtures)."""

from __future__ import annotations

import models
import pytest
from milvus_fixtures import milvus_uri

from tailrank import CrossEncoder, Embedder


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    return models.exported_st(tmp_path_factory, pooling="mean", normalize=True)[1]


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory):
    return models.exported(tmp_path_factory, "bert")[1]


@pytest.fixture(scope="module")
def emb(emb_dir):
    return Embedder(emb_dir, threads=1)


@pytest.fixture(scope="module")
def ce(ce_dir):
    return CrossEncoder(ce_dir, threads=1, max_batch_size=8)


BACKENDS = ["embedded", "milvus"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture()
def where(request, backend, tmp_path):
    """``where(name)``: a fresh location of a collection on this test's backend."""

    def make(name: str = "col"):
        if backend == "embedded":
            return tmp_path / name
        return milvus_uri(request.getfixturevalue("milvus_server"), name)

    return make
