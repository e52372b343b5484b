# Two commands on a fresh machine:
#   make demo   set up, run the whole pipeline on a generated image set, print how to explore it
#   make test   set up (system packages too) and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitscope-installed

.PHONY: setup demo explore test system-deps lint bench clean

setup: $(STAMP)

# torch is pinned to the release this project is tested with (a newer one is a multi-GB download).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=$${PREFECT_SERVER_ANALYTICS_ENABLED:-false} $(VENV)/bin/vitscope pipeline
	@echo
	@echo "Open the explorer:  $(VENV)/bin/vitscope explore --store .vitscope/store"

explore: setup
	$(VENV)/bin/vitscope explore --store .vitscope/store

system-deps:
	bash deploy/install-system-deps.sh

# On a machine without radosgw or Chromium, `$(PY) -m pytest` alone skips their tests (naming the
# install script); VITSCOPE_REQUIRE_ALL=1 (set by .ci/run) makes every skip a failure.
test: setup system-deps
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint Dockerfile.gpu

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf .vitscope .pytest_cache .ruff_cache
