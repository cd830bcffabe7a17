# One-command set-up: every target below creates .venv/ and installs what it needs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# The pinned CPU build for these machines; a CUDA cluster overrides it, e.g. TORCH_SPEC="torch==2.5.1".
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
EXTRAS ?= dev,plots,slurm,bench
PYTEST_ARGS ?=
# The venv's tools first, as in an activated venv: DeepSpeed's JIT op is built with whichever ninja
# comes first, and switching between two ninja versions rebuilds it (about 35 s) every time.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test bench lint clean

install: $(VENV)/.installed

# torch first (an unpinned torch pulls a multi-GB CUDA build); DeepSpeed builds from its
# sdist against that torch, hence --no-build-isolation.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(PY) -m tools.demo

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) -m tools.bench_attention --seq-len 8192 --heads 8 --head-dim 64 --cp 2 --layout zigzag

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
