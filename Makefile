# Two commands set up and check everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip
PYTEST_ARGS ?=

.PHONY: install demo lint test test-fast bench clean-venv system-deps-demo system-deps-test

# The Debian packages each needs (scripts/system-deps.sh holds the one list): installed when missing
# and this user can (root, passwordless sudo); otherwise one line with the apt-get command, at once.
system-deps-demo:
	@bash scripts/system-deps.sh demo

system-deps-test:
	@bash scripts/system-deps.sh test

# Re-install when the dependency lists change. Every pip call gets constraints.txt, so nothing can
# pull numpy 2 (which breaks rknn-toolkit2). rknn-toolkit2 goes in with --no-deps: it pins torch<=2.4.
# The ray extra too, so the Ray launcher's test runs (ray 2.60 resolves within constraints.txt).
$(STAMP): pyproject.toml setup.py constraints.txt Makefile | system-deps-demo
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23.2" -c constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[dev,ray]'
	$(PIP) install -q --no-deps -c constraints.txt rknn-toolkit2==2.5.0
	$(BIN)/python -c "import engine, torch, onnxruntime, ncnn, rknn.api; print('edgepipe installed, torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: system-deps-demo $(STAMP)
	$(BIN)/edgepipe run +experiment=quickstart
	@echo; echo "report:   runs/latest/report.html   (and runs/latest/report.md, runs/latest/stages/eval/eval.md)"
	@echo "packages: $$(ls runs/latest/stages/package_*/package.zip | tr '\n' ' ')"
	@echo "again (all cached): $(BIN)/edgepipe run +experiment=quickstart"

# The architecture DEVELOPERS.md draws, kept: ruff (pyproject's [tool.ruff]), import-linter's contracts
# (layers, no loops, the engine's public contract) and no use of another module's _private names.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python scripts/lint_private_names.py .

# One pytest-xdist worker per core this process may use (nproc), at most 4 (each holds torch and its
# models), one OpenMP thread each; tests/conftest.py decides which tests share a worker.
# `make test TEST_WORKERS=0` runs them in one process.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
XDIST := -n $(TEST_WORKERS)

test: system-deps-test lint $(STAMP)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: system-deps-test lint $(STAMP)
	$(BIN)/python -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/engine_overhead.py

clean-venv:
	rm -rf $(VENV)
