# The two README commands: `make test` and `make bench`. Each sets up .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CUDA_VENV := .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2

SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: all build test bench lint cuda-check gpu-check clean

all: test

$(VENV)/.ready: requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $@

# The CPU build of torch has no CUDA, so this builds the CPU kernels only.
build: $(VENV)/.ready $(SOURCES)
	$(PY) setup.py --quiet build_ext --inplace

# TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors, so all three backends are tested.
# One pytest worker per core: the interpreter is single-threaded Python (23 min -> ~15 on 2 cores).
test: build lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra -n auto tests

# The quick preset (< 5 min here): JSON + charts in benchmarks/results/, then the README table from it.
bench: build
	$(PY) -m benchmarks --preset quick
	@echo "refresh the README table: $(PY) -m benchmarks --summary benchmarks/results/quick.json --update-readme"

# The shape sweep (not part of bench): sweep.json, sweep-heatmap.png, sweep-losses.md and a summary.
.PHONY: sweep
sweep: build
	$(PY) -m benchmarks --preset sweep

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check alchemy_ops tests benchmarks tools setup.py
	$(VENV)/bin/ruff format --check alchemy_ops tests benchmarks tools setup.py

# Builds every .cu for sm_80 and sm_90 against the CUDA build of torch, fails on register
# spills or stack frames, prints the register table, and checks every op has a CUDA kernel.
# Then compiles every Triton kernel for sm_80 and sm_90 at the launchers' specializations
# (tools/triton_check.py, also runnable alone in .venv-cuda) and fails on errors or spills.
$(CUDA_VENV)/.ready: requirements/cuda-check.txt
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install --quiet --upgrade pip
	$(CUDA_PY) -m pip install --quiet -r requirements/cuda-check.txt
	touch $@

cuda-check: $(CUDA_VENV)/.ready
	CUDA_HOME=$(CUDA_HOME) PATH=$(CUDA_HOME)/bin:$$PATH $(CUDA_PY) tools/cuda_check.py

# The one command for a GPU box (docs/gpu.md): fails at once when no GPU is visible, else adds the test
# and bench deps to .venv-cuda, builds the CUDA kernels, runs every CUDA test and the quick benchmark on
# the device and prints one summary (tools/gpu_check.py; results in benchmarks/results/gpu-*.json).
$(CUDA_VENV)/.gpu-ready: $(CUDA_VENV)/.ready requirements/gpu-check.txt
	$(CUDA_PY) -m pip install --quiet -r requirements/gpu-check.txt
	$(CUDA_PY) -m pip install --quiet --no-deps liger-kernel==0.8.5 \
		|| echo "gpu-check: Liger-Kernel not installed; the benchmark runs without it"
	touch $@

gpu-check:
	CUDA_HOME=$(CUDA_HOME) PATH=$(CUDA_HOME)/bin:$$PATH $(PYTHON) tools/gpu_check.py --preflight
	$(MAKE) $(CUDA_VENV)/.gpu-ready
	CUDA_HOME=$(CUDA_HOME) PATH=$(CUDA_HOME)/bin:$$PATH $(CUDA_PY) tools/gpu_check.py

clean:
	rm -rf build alchemy_ops/_C*.so
