# make train | make test | make sample CKPT=... | make edit CKPT=... | make bench | make lint
# Both create .venv and install fewstep with its dependencies when needed: a fresh machine needs only Python 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fewstep-installed

.PHONY: install train test test-fast lint sample edit bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

sample: $(STAMP)
	$(PY) sample.py ckpt=$(CKPT) $(ARGS)

edit: $(STAMP)
	$(PY) edit.py ckpt=$(CKPT) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/samplers.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
