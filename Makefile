# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRETRAIN := $(VENV)/bin/pretrain
DEMO_DATA ?= demo_data
DEMO_RUN ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-fast install demo-data clean

install: $(VENV)/.installed

# Re-install when the package definition changes; the editable install follows code edits.
$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# Hugging Face's `kernels` (pulled in by transformers 5.25, now excluded in setup.py) breaks building this
	@# package from its checkout, whose kernels/ folder takes that name: remove it from venvs made meanwhile
	$(PY) -m pip uninstall --quiet --yes kernels 2>/dev/null || true
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo-data: install
	$(PRETRAIN) shards demo $(DEMO_DATA)

demo: demo-data
	$(PRETRAIN) train configs/demo.yaml train.run_dir=$(DEMO_RUN)

test: install
	$(PY) -m pytest $(PYTEST_ARGS) tests

# Everything but the multi-process, SLURM, wheel-building and demo-length tests (marked slow).
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS) tests

clean:
	rm -rf $(DEMO_DATA) $(DEMO_RUN) .pytest_cache
