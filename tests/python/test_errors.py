"""tailrank.errors: one hierarchy, and the core raises exactly these classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tailrank
from tailrank import errors


def test_every_error_derives_from_tailrank_error() -> None:
    classes = [getattr(errors, name) for name in errors.__all__]
    assert errors.TailrankError in classes
    for cls in classes:
        assert issubclass(cls, errors.TailrankError), cls
        assert issubclass(cls, Exception)
    defined = {name for name, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, Exception)}
    assert defined == set(errors.__all__), "every error class is exported"


def test_unknown_id_error_is_also_a_key_error() -> None:
    assert issubclass(errors.UnknownIdError, KeyError)
    e = errors.UnknownIdError("id 5 is not in the index")
    assert str(e) == "id 5 is not in the index"  # not KeyError's quoted repr
    assert str(errors.UnknownIdError()) == ""


def test_concurrent_use_error_is_also_a_runtime_error() -> None:
    assert issubclass(errors.ConcurrentUseError, RuntimeError)


def test_the_core_raises_the_python_classes(tmp_path: Path) -> None:
    index = tailrank.VectorIndex(2)
    with pytest.raises(errors.UnknownIdError) as info:
        index.delete([5])
    assert type(info.value) is errors.UnknownIdError
    assert "5" in str(info.value)

    store = tailrank.DocStore(10)
    with pytest.raises(errors.UnknownIdError) as info:
        store.get(5)
    assert type(info.value) is errors.UnknownIdError

    path = tmp_path / "not-ours.bin"
    path.write_bytes(np.random.default_rng(0).bytes(200))
    for load in (tailrank.VectorIndex.load, tailrank.DocStore.load):
        with pytest.raises(errors.CorruptFileError) as info:
            load(path)
        assert type(info.value) is errors.CorruptFileError


def test_errors_module_is_exported() -> None:
    assert tailrank.errors is errors
    assert "errors" in tailrank.__all__
