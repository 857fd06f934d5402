# The two commands: `make run` and `make test`. Each sets everything up first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup plugins run test lint check clean bench

setup: $(VENV)/.installed plugins

# The modules mypyc compiles (src/wasmgate/compiled.py) are rebuilt when their source changes.
COMPILED_PY := $(shell $(PYTHON) -c 'import runpy; print(*("src/" + m.replace(".", "/") + ".py" \
	for m in runpy.run_path("src/wasmgate/compiled.py")["MODULES"]))')

$(VENV)/.installed: pyproject.toml setup.py src/wasmgate/engine/_glue.pyx src/wasmgate/compiled.py $(COMPILED_PY)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

plugins:
	@command -v go >/dev/null || { echo "Go >= 1.24 is needed to build the plugins (https://go.dev/dl)"; exit 1; }
	bash scripts/build-plugins.sh

run: setup
	$(VENV)/bin/wasmgate run

lint: setup
	$(VENV)/bin/ruff check src tests scripts benchmarks
	$(VENV)/bin/mypy

test: lint
	bash scripts/test-deps.sh
	$(VENV)/bin/pytest -q

bench: setup
	$(PY) benchmarks/run.py --install-deps $(BENCH_ARGS)

clean:
	rm -rf $(VENV) examples/allow-header/plugin.wasm tests/plugins/build
