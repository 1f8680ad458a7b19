# kvmlab: `make lab` runs the lab, `make test` runs every test. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LAB_STAMP := $(VENV)/.installed-lab
# Headless: print the URL (with its token) instead of opening a browser; root needs --allow-root.
LAB_ARGS := --notebook-dir=notebooks --no-browser --ip=127.0.0.1 \
	$(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: lab test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(LAB_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[lab]'
	touch $(LAB_STAMP)

lab: $(LAB_STAMP)
	@echo "kvmlab: JupyterLab on notebooks/ (start with 00-start-here.ipynb). Open the"
	@echo "kvmlab: http://127.0.0.1:<port>/lab?token=... URL printed below; Ctrl-C stops it."
	$(BIN)/jupyter lab $(LAB_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
