# LatencyPrism: `make demo` runs the main job, `make test` runs the whole suite.
# Both create .venv and install the project with its dev extra first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# llama.cpp's Python bindings and server, the real engine the llama tests watch: built
# from PyPI's source for the CPU only (about 5 minutes on 2 cores the first time, then
# pip's wheel cache), once per venv; gguf writes the tests' tiny random-weight model.
LLAMA_STAMP := $(VENV)/.llama-cpp-stamp
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_PYTHON := llama-cpp-python[server]==$(LLAMA_CPP_VERSION)
# llama.cpp's C++ server from the same source package's llama.cpp, built once per machine
# into ~/.cache/latencyprism (about 5 minutes on 2 cores) and linked into the venv
LLAMA_SERVER := $(BIN)/llama-server
LLAMA_CMAKE_ARGS := -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

.PHONY: demo test lint system-deps venv clean bench bpf

venv: $(STAMP) $(LLAMA_STAMP) $(LLAMA_SERVER)

# setup.py builds the simulator's C runtime: rebuild when its sources change
$(STAMP): pyproject.toml setup.py prism_sim/runtime/simxpu.c prism_sim/runtime/simxpu.h
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# After system-deps (a C++ compiler); pip reuses its cached wheel when there is one
$(LLAMA_STAMP): $(STAMP) | system-deps
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet \
	  '$(LLAMA_CPP_PYTHON)' 'gguf>=0.17'
	touch $(LLAMA_STAMP)

$(LLAMA_SERVER): $(STAMP) scripts/build_llama_server.sh | system-deps
	bash scripts/build_llama_server.sh $(LLAMA_CPP_VERSION) $(VENV)

# The eBPF probe backend's program (probe.backend = "auto" falls back to perf without it)
BPF_OBJ := probes/bpf/spans.bpf.o
bpf: $(BPF_OBJ)
$(BPF_OBJ): probes/bpf/spans.bpf.c | system-deps
	clang -O2 -g -target bpf -I/usr/include/$$(uname -m)-linux-gnu -c $< -o $@

# Mosquitto (the broker the alerting tests start), C and C++ compilers and CMake (the test
# targets, llama.cpp's builds), tmux (the end-to-end test of `prism demo` in a real terminal) and
# Prometheus (the server that scrapes `prism watch --metrics-port` in tests/test_metrics.py),
# clang and libbpf-dev (the eBPF backend's program and its loader, libbpf.so.1).
# Installed with apt-get when missing and we are root; otherwise say what to install.
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v cc >/dev/null 2>&1 || missing="$$missing build-essential"; \
	command -v c++ >/dev/null 2>&1 || missing="$$missing g++"; \
	command -v cmake >/dev/null 2>&1 || missing="$$missing cmake"; \
	command -v strip >/dev/null 2>&1 || missing="$$missing binutils"; \
	command -v unshare >/dev/null 2>&1 || missing="$$missing util-linux"; \
	command -v tmux >/dev/null 2>&1 || missing="$$missing tmux"; \
	command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v clang >/dev/null 2>&1 || missing="$$missing clang"; \
	[ -e /usr/include/bpf/bpf_helpers.h ] || missing="$$missing libbpf-dev"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "please install:$$missing (for example: sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: $(STAMP) system-deps $(BPF_OBJ) $(LLAMA_STAMP) $(LLAMA_SERVER) lint
	$(BIN)/pytest -q --durations=20

demo: $(STAMP) $(BPF_OBJ)
	$(BIN)/prism demo

# The benches' own extra (matplotlib, for bench/soak.py's plot)
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP) $(BPF_OBJ) $(LLAMA_STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
