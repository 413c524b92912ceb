# metafluence: two commands on a fresh machine
#   make demo   install everything in .venv and run the main job
#   make test   install everything in .venv and run the whole test suite
# Re-running is idempotent and fast: the venv is created once and each step leaves a stamp file
# in .venv/.stamps; the extension is rebuilt only when csrc/, CMakeLists.txt or pyproject.toml
# change. The editable install is the CMake build (prebuilt module, CUDA kernels when possible);
# its build folder is .venv/build (incremental rebuilds), never the source tree.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMPS := $(VENV)/.stamps
# torch FIRST and pinned: a bare `pip install torch` pulls a 5.5 GB CUDA build
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
BUILD_DEPS := scikit-build-core ninja
RUN_DEPS := numpy scipy tqdm pillow matplotlib kanjivg safetensors
TEST_DEPS := pytest hypothesis dattri==0.3.0 torchopt build
NATIVE_SRCS := CMakeLists.txt pyproject.toml $(shell find csrc -type f 2>/dev/null)
CUDA_ARCHS ?= 80 90
NVCC ?= $(shell command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)
PYTEST_ARGS ?=

.PHONY: demo test install cuda-check lint format bench clean

install: $(STAMPS)/install

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/deps: | $(PY)
	mkdir -p $(STAMPS)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q $(TORCH_SPEC) $(TRITON_SPEC) $(BUILD_DEPS) $(RUN_DEPS) $(TEST_DEPS)
	# kronfluence only without its dependencies (they would replace torch through torchvision);
	# higher (pure Python) for tests/integrations/test_maml_libraries.py; learn2learn does not build
	$(PIP) install -q --no-deps kronfluence accelerate einconv einops opt_einsum higher
	touch $@

$(STAMPS)/install: $(STAMPS)/deps $(NATIVE_SRCS)
	$(PIP) install -q --no-build-isolation --config-settings=build-dir=$(abspath $(VENV))/build \
	  -e '.[test]'
	touch $@

demo: install
	@rc=0; $(VENV)/bin/metafluence run || rc=$$?; \
	if [ $$rc -eq 2 ]; then \
	  echo "(metafluence run is not implemented yet: showing info + demo instead)"; \
	  $(VENV)/bin/metafluence info && $(VENV)/bin/metafluence demo; \
	else exit $$rc; fi

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Compile every CUDA kernel with nvcc for sm_80 and sm_90 (no GPU needed): a broken .cu fails.
# Then the host wrappers (*_cuda.cpp: argument checks, launches, registration) are checked with
# the C++ compiler (-fsyntax-only) against the torch in $(VENV) and nvcc's CUDA headers; a CPU
# build of torch lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h), given a stub.
cuda-check:
	@set -e; test -x "$(NVCC)" || { echo "cuda-check: nvcc not found"; exit 1; }; \
	tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	for f in $$(find csrc -name '*.cu' | sort); do \
	  echo "nvcc $$f"; \
	  "$(NVCC)" -std=c++17 -O2 -Icsrc $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
	    -c "$$f" -o "$$tmp/$$(basename $$f).o"; \
	done; \
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  echo "cuda-check: no torch in $(VENV) (make install): host wrappers not checked"; exit 1; fi; \
	tdir=$$($(PY) -c "import os, torch; print(os.path.dirname(torch.__file__))"); \
	pyinc=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])"); \
	cudainc=$$("$(NVCC)" --dryrun -x cu -E /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1); \
	mkdir -p $$tmp/stub/c10/cuda/impl; \
	test -f "$$tdir/include/c10/cuda/impl/cuda_cmake_macros.h" || \
	  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > $$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h; \
	for f in $$(find csrc -name '*_cuda.cpp' | sort); do \
	  echo "$(CXX) -fsyntax-only $$f"; \
	  $(CXX) -std=c++20 -fsyntax-only -isystem "$$tdir/include" \
	    -isystem "$$tdir/include/torch/csrc/api/include" -isystem $$tmp/stub -isystem "$$pyinc" \
	    -isystem "$$cudainc" -Icsrc "$$f"; \
	done; echo "cuda-check: OK"

lint: install
	$(PIP) install -q ruff mypy
	$(VENV)/bin/ruff check python tests benchmarks
	$(VENV)/bin/ruff format --check python tests benchmarks
	$(VENV)/bin/mypy python/metafluence/ops python/metafluence/_build.py \
	  python/metafluence/_loader.py python/metafluence/_jit.py python/metafluence/smoke.py \
	  python/metafluence/cli.py python/metafluence/kernels \
	  python/metafluence/reference

format:
	$(VENV)/bin/ruff format python tests benchmarks
	command -v clang-format >/dev/null && find csrc \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' \) \
	  | xargs clang-format -i || echo "clang-format not found (pip install clang-format)"

bench: install
	$(PY) benchmarks/bench_psg_linear.py

clean:
	rm -rf build dist $(VENV)/build $(STAMPS)
