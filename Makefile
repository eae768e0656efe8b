# The two commands a newcomer needs: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= config.example.yaml
BIN := $(VENV)/bin

.PHONY: run test lint check bench clean

$(BIN)/signing-proxy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

## run: set up and run the proxy on $(CONFIG) (proxy 127.0.0.1:8080, admin 127.0.0.1:9090)
run: $(BIN)/signing-proxy
	$(BIN)/signing-proxy check --config $(CONFIG) || echo "(the proxy starts anyway; /readyz says what is missing)"
	exec $(BIN)/signing-proxy serve --config $(CONFIG)

## test: set up and run linters, the type checker and the test suite
test: lint
	$(BIN)/python -m pytest -q

lint: $(BIN)/signing-proxy
	$(BIN)/ruff check signing_proxy tests bench
	$(BIN)/ruff format --check signing_proxy tests bench
	$(BIN)/mypy

## bench: the benchmark table (installs nginx, wrk and peers on first run)
bench:
	bench/run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
