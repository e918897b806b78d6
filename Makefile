# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The CPU wheel of torch; installed first so no dependency can pull a CUDA build.
TORCH   ?= torch==2.13.0
NPROC   ?= 2
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[test,mpi]"
	touch $(STAMP)

demo: venv
	$(VPY) launch/demo.py

test: venv
	$(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

test-fast: venv
	$(VPY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

lint: venv
	$(VENV)/bin/ruff check gpt_dist launch data_tools bench tests

bench: venv
	$(VPY) bench/preprocess_bench.py
	$(VPY) bench/train_bench.py

clean:
	rm -rf $(VENV) data/sample runs exports
