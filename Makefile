# The two commands: `make run` (set up, then all baselines at smoke scale on CPU)
# and `make test` (set up, then the test suite). Both create .venv when missing.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) bash scripts/bootstrap.sh

run: $(STAMP)
	$(BIN)/harness baselines --scale smoke

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check harness tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs data .pytest_cache .mypy_cache .ruff_cache .hypothesis
