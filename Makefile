# Two entry points on a fresh machine: `make demo` and `make test`. Each builds .venv first
# (with the test and export extras, so the ONNX equivalence tests run in CI).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ustad-installed

.PHONY: demo test lint bench-cpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,export]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ustad demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal

lint: $(STAMP)
	$(VENV)/bin/ruff check ustad tests benchmarks configs

clean:
	rm -rf $(VENV) demo_out
