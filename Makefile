# Two commands for a newcomer:  `make demo`  and  `make test`.  Both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test test-all clean

$(BIN)/mars: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch>=2.2,<=2.13.0" -e ".[test]"
	touch $(BIN)/mars

install: $(BIN)/mars

demo: install
	$(BIN)/mars demo --out runs/demo

# the default suite (< 10 min on 2 cores); `slow` tests (fault matrix, long end-to-end and quality
# runs, the browser check of the report) run with `make test-all` or `pytest -m slow`
test: install
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
