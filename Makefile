# Quick start: `make demo` runs the main job, `make test` passes the tests. Both install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/equalbits quickstart --out demo_out --overwrite

test: $(STAMP)
	$(VENV)/bin/ruff check equalbits_cli tests benchmarks
	$(PY) -m pytest -n auto

lint: $(STAMP)
	$(VENV)/bin/ruff check equalbits_cli tests benchmarks
	$(VENV)/bin/ruff format --check equalbits_cli tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/quantizer.py
	$(PY) benchmarks/export_size.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/host_overhead.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/export_families.py
	$(PY) benchmarks/finetune.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .hypothesis
