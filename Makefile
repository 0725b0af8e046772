# Two entry points (README): `make demo` runs the main job, `make test` runs every test.
# Each creates .venv, installs the package (building the native core) and its extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
DATA ?= $(SHARED)/data/scifact
JOBS ?= 2
PYBIND11_DIR = $$($(BIN)/python -m pybind11 --cmakedir)

.PHONY: venv install demo test test-cpp test-asan test-asan-py test-tsan test-fuzz test-fuzz-py test-py test-openvino stubtest bench bench-scorer bench-pipeline bench-serve bench-collection clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python

# Installs the package (non-editable; build dir cached under build/) with test and bench extras.
install: venv
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q ".[test,bench,export,serve,eval]"

demo: install
	$(BIN)/python -m tailrank.demo --data $(DATA) --docs 1000 --queries 3

test: install test-cpp test-asan test-tsan test-fuzz test-fuzz-py test-asan-py stubtest test-py test-openvino

test-cpp: venv
	scripts/ensure_system_deps.sh
	$(BIN)/pip install -q "pybind11>=2.12,<4" "cmake>=3.18" ninja
	$(BIN)/cmake -S . -B build/cpp -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DTAILRANK_BUILD_TESTS=ON -DTAILRANK_BUILD_PYTHON=OFF -DPython_EXECUTABLE=$(BIN)/python >/dev/null
	$(BIN)/cmake --build build/cpp -j $(JOBS)
	cd build/cpp && $(abspath $(BIN))/ctest --output-on-failure -j $(JOBS)

# AddressSanitizer + UndefinedBehaviorSanitizer build of the core, running the C++ tests.
test-asan: venv
	scripts/ensure_system_deps.sh
	$(BIN)/pip install -q "pybind11>=2.12,<4" "cmake>=3.18" ninja
	$(BIN)/cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DTAILRANK_SANITIZE=ON \
	  -DTAILRANK_BUILD_TESTS=ON -DTAILRANK_BUILD_PYTHON=OFF -DPython_EXECUTABLE=$(BIN)/python >/dev/null
	$(BIN)/cmake --build build/asan -j $(JOBS)
	cd build/asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  $(abspath $(BIN))/ctest --output-on-failure -j $(JOBS)

# The Python tests of the trusted core, the pair assembler and the Collection's loaders against an
# ASan build of _core (arrays outliving their owners, loaders fed damaged files). ASan alone:
# UBSan stops at hnswlib's memcpy(NULL, p, 0) in getConnectionsWithLock (harmless, not ours).
ASAN_PY = build/asan-py
test-asan-py: install
	$(BIN)/cmake -S . -B $(ASAN_PY) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTAILRANK_BUILD_PYTHON=ON -DTAILRANK_SANITIZE=OFF \
	  "-DCMAKE_CXX_FLAGS=-fsanitize=address -fno-omit-frame-pointer" "-DCMAKE_MODULE_LINKER_FLAGS=-fsanitize=address" \
	  -DPython_EXECUTABLE=$(BIN)/python -Dpybind11_DIR=$(PYBIND11_DIR) >/dev/null
	$(BIN)/cmake --build $(ASAN_PY) -j $(JOBS)
	rm -rf $(ASAN_PY)/pkg && mkdir -p $(ASAN_PY)/pkg && cp -r python/tailrank $(ASAN_PY)/pkg/ && cp $(ASAN_PY)/_core*.so $(ASAN_PY)/pkg/tailrank/
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so.6)" ASAN_OPTIONS=detect_leaks=0 \
	  PYTHONPATH=$(ASAN_PY)/pkg TAILRANK_FUZZ_EXAMPLES=20 TAILRANK_SHARED=$(abspath $(SHARED)) $(BIN)/python -m pytest -q \
	  -p no:cacheprovider -m "not slow" tests/python/test_trusted_core.py tests/python/test_pairs.py \
	  tests/python/test_collection_fuzz.py tests/python/test_collection_store.py

# ThreadSanitizer build of the core, running the C++ tests (the pool, parallel inserts and searches).
test-tsan: venv
	scripts/ensure_system_deps.sh
	$(BIN)/pip install -q "pybind11>=2.12,<4" "cmake>=3.18" ninja
	$(BIN)/cmake -S . -B build/tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTAILRANK_TSAN=ON \
	  -DTAILRANK_BUILD_TESTS=ON -DTAILRANK_BUILD_PYTHON=OFF -DPython_EXECUTABLE=$(BIN)/python >/dev/null
	$(BIN)/cmake --build build/tsan -j $(JOBS)
	cd build/tsan && TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" $(abspath $(BIN))/ctest --output-on-failure -j $(JOBS)

# libFuzzer (clang) over the index and DocStore loaders under ASan+UBSan, checksums recomputed on
# every input: the golden files seed it, tests/fuzz/regressions keeps any crash it ever found.
FUZZ_SECONDS ?= 60
FUZZ_SRC = csrc/core/common.cpp csrc/core/thread_pool.cpp csrc/core/distance.cpp csrc/core/index.cpp csrc/core/doc_store.cpp
test-fuzz: test-cpp
	mkdir -p build/fuzz/corpus
	clang++ -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize=pointer-overflow \
	  -fno-sanitize-recover=undefined -Icsrc/core -isystem build/cpp/_deps/hnswlib-0.8.0 \
	  $(FUZZ_SRC) tests/fuzz/fuzz_loaders.cpp -o build/fuzz/fuzz_loaders -lpthread
	build/fuzz/fuzz_loaders -runs=0 tests/fuzz/regressions tests/golden/v1 tests/golden/v2
	build/fuzz/fuzz_loaders -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -print_final_stats=1 \
	  -artifact_prefix=build/fuzz/ build/fuzz/corpus tests/golden/v1 tests/golden/v2 tests/fuzz/regressions \
	  > build/fuzz/fuzz.log 2>&1 || { tail -n 40 build/fuzz/fuzz.log; echo "fuzz: a crash input is in build/fuzz/ (keep it in tests/fuzz/regressions)"; exit 1; }
	tail -n 12 build/fuzz/fuzz.log

# atheris (libFuzzer for Python) over the Collection's manifest and SQLite-log loaders, bounded:
# tests/fuzz/collection_regressions (every input that ever failed) replays first.
FUZZ_PY_RUNS ?= 2000
test-fuzz-py: install
	$(BIN)/python tests/fuzz/fuzz_collection.py -runs=0 tests/fuzz/collection_regressions
	mkdir -p build/fuzz-py/corpus
	$(BIN)/python tests/fuzz/fuzz_collection.py -runs=$(FUZZ_PY_RUNS) -max_len=512 -rss_limit_mb=2048 \
	  -artifact_prefix=build/fuzz-py/ build/fuzz-py/corpus tests/fuzz/collection_regressions \
	  || { echo "fuzz-py: the failing input is in build/fuzz-py/ (keep it in tests/fuzz/collection_regressions)"; exit 1; }

stubtest: install
	cd /tmp && $(abspath $(BIN))/python -m mypy.stubtest tailrank._core --allowlist $(abspath tests/stubtest_allowlist.txt)

test-py: install
	TAILRANK_SHARED=$(abspath $(SHARED)) $(BIN)/python -m pytest -q tests/python

# The OpenVINO execution provider ships in the onnxruntime-openvino wheel, which replaces
# onnxruntime (same module): its own venv, where the tests named "openvino" run (fp32 fidelity
# against transformers on every model family, optimize --bf16 and --int8-openvino). Re-installed on each run, since
# reinstalling the package brings onnxruntime back over the same files.
VENV_OV := .venv-openvino
OPENVINO_ORT ?= onnxruntime-openvino>=1.24,<2
$(VENV_OV)/bin/python:
	$(PY) -m venv $(VENV_OV)
	$(VENV_OV)/bin/pip install -q --upgrade pip

test-openvino: $(VENV_OV)/bin/python
	$(VENV_OV)/bin/pip install -q "torch==2.13.0"
	$(VENV_OV)/bin/pip install -q ".[test,export,openvino]"
	$(VENV_OV)/bin/pip uninstall -q -y onnxruntime
	$(VENV_OV)/bin/pip install -q --force-reinstall --no-deps "$(OPENVINO_ORT)"
	$(VENV_OV)/bin/python -c "import onnxruntime as o; assert 'OpenVINOExecutionProvider' in o.get_available_providers(), o.get_available_providers()"
	TAILRANK_SHARED=$(abspath $(SHARED)) $(VENV_OV)/bin/python -m pytest -q tests/python/test_cross_encoder.py tests/python/test_export.py \
	  tests/python/test_int8_openvino.py -k openvino

bench: install
	$(BIN)/python benchmarks/run_all.py --data $(DATA)

# Cross-encoder scoring vs sentence-transformers, plain onnxruntime and FlashRank (~20 min on 2 cores).
bench-scorer: install
	$(BIN)/python benchmarks/bench_scorer.py --data $(DATA) --model $(SHARED)/models/scifact-minilm-l6-ce \
	  --queries 20 --threads 2 --work .cache/bench

# SciFact pipeline: HNSW vs exact first stage, nDCG@10 after reranking, per-stage search latency.
bench-pipeline: install
	$(BIN)/python benchmarks/bench_pipeline.py --data $(DATA) --reranker $(SHARED)/models/scifact-minilm-l6-ce \
	  --threads 2 --work .cache/bench --seed 0

# tailrank serve vs a sentence-transformers server under open-loop Poisson load (~30 min).
bench-serve: install
	$(BIN)/python benchmarks/bench_serve.py --data $(DATA) --model $(SHARED)/models/scifact-minilm-l6-ce \
	  --threads 2 --seed 0

# Collection store: write cost vs size, ingest, bytes written, filtered first stage, open time and
# RSS, this design against ba898a3's (taken from git at run time). About 25 min with the 1M point.
bench-collection: install
	$(BIN)/python benchmarks/bench_collection.py --work .cache/bench-collection --sizes 1000,10000,100000,1000000 \
	  --open-sizes 100000,1000000

clean:
	rm -rf build $(VENV) $(VENV_OV)
