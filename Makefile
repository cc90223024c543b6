# Two commands on a fresh machine with python3 and make:
#   make demo   trains SGD, SAM and NRS on embedded data and prints a comparison
#   make test   lint + format check + type check + the fast test suite (doctests included)
# and the documentation site (tutorials executed): make docs -> docs/_build/html;
# make test-compat: the library's tests at the declared version floors and the newest releases
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-compat lint format benchmark docs dist clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev,experiments,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.main --config experiments/configs/default.py --workdir workdir/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -n 2 --dist worksteal -q --durations=15

# The library's tests in two extra venvs: the declared floors (pyproject.toml), and the
# newest releases on Python 3.13 (found on PATH or through pyenv).
test-compat:
	$(PYTHON) .ci/compat.py min
	$(PYTHON) .ci/compat.py new

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 --dist worksteal -q --durations=15 -m slow

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: $(STAMP)
	rm -rf docs/_build docs/_autosummary
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

dist: $(STAMP)
	rm -rf dist
	$(PY) -m build
	$(VENV)/bin/twine check --strict dist/*

benchmark: $(STAMP)
	$(PY) -m experiments.benchmark
	$(PY) -m experiments.step_profile

clean:
	rm -rf $(VENV) .venv-compat workdir .pytest_cache docs/_build docs/_autosummary dist
