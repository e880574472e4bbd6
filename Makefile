# make test / make bench work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
# The optional integrations (extras of the package), installed so that their tests run; keep in step with
# the "dev" extra of pyproject.toml. Installed after torch, so pip finds it satisfied.
EXTRAS_SPEC ?= "lightning>=2.4" "transformers>=4.46" "accelerate>=1.0" "scikit-learn>=1.3" "matplotlib>=3.7" \
	"pytorch-optimizer>=4.1" "tqdm>=4.60" "scipy>=1.10"
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*)
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu)
CUDA_OBJECTS := $(patsubst csrc/cuda/%.cu,build/cuda-check/%.o,$(CUDA_SOURCES))
NVCC ?= nvcc
NVCC_FLAGS ?= -std=c++17 -O3 -Icsrc -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
CUDA_HOST_CHECKS := $(patsubst csrc/cuda/%.cpp,build/cuda-check/%.cpp.ok,$(wildcard csrc/cuda/*.cpp))
HOST_HEADERS := $(wildcard csrc/*.h csrc/cuda/*.h)
CUDA_STUB_DIR := build/cuda-check/stub
CUDA_STUB := $(CUDA_STUB_DIR)/c10/cuda/impl/cuda_cmake_macros.h
HOST_CHECK_FLAGS ?= -std=c++17 -fsyntax-only -DFASTSAM_WITH_CUDA=1 -Icsrc
# Recursive variables: python and nvcc run only when a host check does. The venv's torch without importing it;
# the toolkit's include directory as nvcc itself has it (nvcc may be a wrapper script outside the toolkit).
TORCH_INCLUDE = $(shell $(PY) -c "import importlib.util as u; \
  print(u.find_spec('torch').submodule_search_locations[0])")/include
CUDA_INCLUDE = $(shell $(NVCC) --dryrun -x cu -E /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p')
# `make test` requires these impls to be present, so a broken build fails instead of skipping.
REQUIRE_IMPLS ?= cpu,triton
# pytest-xdist processes (auto: one per core; 0: none), each test file on one of them (--dist loadfile: a module's
# fixtures run once), and one torch thread each: two processes of two OpenMP threads on 2 cores spin against each
# other and ran the suite slower than one process did.
TEST_WORKERS ?= auto
# `make gpu-check` runs with the GPU machine's own python (torch with CUDA preinstalled, no network): not .venv.
GPU_PYTHON ?= python3

.PHONY: test bench cuda-check gpu-check install clean

# Remade when this file changes (a new dependency); pip leaves what is already installed alone.
$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "$(TRITON_SPEC)" numpy ninja pillow "pytest>=8" "pytest-benchmark>=4" "pytest-xdist>=3"
	$(PIP) install -q $(EXTRAS_SPEC)
	touch $@

# Rebuilt when a C++/CUDA source or the build files change (a new venv package alone does not rebuild it).
$(VENV)/.fastsam: $(SOURCES) | $(VENV)/.deps
	$(PIP) install -q --no-build-isolation --no-deps -e ".[dev]"
	touch $@

install: $(VENV)/.fastsam

build/cuda-check/%.o: csrc/cuda/%.cu $(wildcard csrc/cuda/*.cuh csrc/cuda/*.h)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_FLAGS) -c $< -o $@

# The host glue of the CUDA ops (csrc/cuda/*.cpp) builds against torch, which here may lack CUDA: a syntax check
# against the venv's torch headers and the CUDA toolkit's, whose warnings -isystem silences. The CPU wheel lacks
# c10's generated CUDA build header; the stub below stands in for it. Needs the venv (make install; make test
# installs it first), which it does not remake: a change of the Makefile would otherwise rerun pip.
$(CUDA_HOST_CHECKS): build/cuda-check/%.cpp.ok: csrc/cuda/%.cpp $(HOST_HEADERS) $(CUDA_STUB)
	@test -d "$(TORCH_INCLUDE)" || { echo "no torch headers: $(PY) has no torch (make install)"; exit 1; }
	$(CXX) $(HOST_CHECK_FLAGS) -isystem $(CUDA_STUB_DIR) -isystem $(TORCH_INCLUDE) \
	  -isystem $(TORCH_INCLUDE)/torch/csrc/api/include -isystem $(CUDA_INCLUDE) $<
	@touch $@

$(CUDA_STUB):
	@mkdir -p $(dir $@)
	printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > $@

# Compiles every CUDA kernel source with plain nvcc (no GPU, no torch needed) and syntax-checks the host glue.
cuda-check: $(CUDA_OBJECTS) $(CUDA_HOST_CHECKS)

test: install
	@if command -v $(NVCC) >/dev/null 2>&1; then $(MAKE) --no-print-directory -j2 cuda-check; \
	  else echo "nvcc not found: skipping the CUDA compile check"; fi
	OMP_NUM_THREADS=1 FASTSAM_REQUIRE_IMPLS=$(REQUIRE_IMPLS) $(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(PY) -m fastsam.bench $(BENCH_ARGS)

# On a GPU machine: build for its GPU, the CUDA/Triton tests, compute-sanitizer, the benchmark (tools/gpu_check.py;
# README "Verifying on a GPU"). GPU_CHECK_ARGS passes flags to the script, e.g. --bench-args "...".
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build fastsam/_C*.so *.egg-info
