# The two commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of this torch lies on disk here; on a GPU machine pass your own, e.g. TORCH="torch==2.6.0".
TORCH ?= torch==2.13.0
DEMO_OUT ?= outputs/demo

.PHONY: setup demo test clean

setup: $(VENV)/.installed
	@$(BIN)/distill setup

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/distill demo --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs
