# Two commands on a fresh machine with python3 and make:
#   make demo   trains SGD, SAM and NRS on embedded data and prints a comparison
#   make test   lint + format check + the fast test suite (doctests included)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint format benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev,experiments]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.main --config experiments/configs/default.py --workdir workdir/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -n 2 -q --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -q --durations=15 -m slow

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

benchmark: $(STAMP)
	$(PY) -m experiments.benchmark

clean:
	rm -rf $(VENV) workdir .pytest_cache
