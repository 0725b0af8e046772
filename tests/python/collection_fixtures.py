"""Module-scoped models shared by the Collection test modules (seeded tiny models, no hub)."""

from __future__ import annotations

import models
import pytest

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
