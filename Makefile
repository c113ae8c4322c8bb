# LatencyPrism: `make demo` runs the main job, `make test` runs the whole suite.
# Both create .venv and install the project with its dev extra first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint system-deps venv clean bench

venv: $(STAMP)

# setup.py builds the simulator's C runtime: rebuild when its sources change
$(STAMP): pyproject.toml setup.py prism_sim/runtime/simxpu.c prism_sim/runtime/simxpu.h
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Mosquitto (the broker the alerting tests start), a C compiler (the test targets) and
# tmux (the end-to-end test of `prism demo` in a real terminal), Prometheus (the server
# that scrapes `prism watch --metrics-port` in tests/test_metrics.py).
# Installed with apt-get when missing and we are root; otherwise say what to install.
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v cc >/dev/null 2>&1 || missing="$$missing build-essential"; \
	command -v strip >/dev/null 2>&1 || missing="$$missing binutils"; \
	command -v unshare >/dev/null 2>&1 || missing="$$missing util-linux"; \
	command -v tmux >/dev/null 2>&1 || missing="$$missing tmux"; \
	command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
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

test: $(STAMP) system-deps lint
	$(BIN)/pytest -q

demo: $(STAMP)
	$(BIN)/prism demo

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
