# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: demo test test-fast lint install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip

# Stamps make both targets idempotent: pip runs again only when the package metadata changed.
$(VENV)/.stamp-install: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-install
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.stamp-install

install-dev: $(VENV)/.stamp-dev

demo: install
	@echo "Running the default federation: 5 synthetic banks, FedProx, MiniLM + LoRA, 3 rounds (outputs/...),"
	@echo "then the same banks pooled and each bank alone, and each bank's personalised head, for the comparison"
	$(BIN)/fingpt-sim baseline=true personalize.steps=20

# Tests run in TEST_WORKERS processes (pytest-xdist), a test file per process so that a module's
# fixtures (a consortium, a trained run) are built once; one thread each, as on the 2-core CI machine.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# pytest exits 5 when it collected no test: report that as a failure of the suite, not a pass.
test: install-dev
	$(PYTEST) --timeout=1200 -q -m "" --durations=20 ; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# Everything not marked slow: the unit and component tests, about 1.5 minutes on 2 cores.
test-fast: install-dev
	$(PYTEST) --timeout=600 -q -m "not slow" ; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests" >&2; fi; exit $$rc

# mypy cannot follow setuptools' editable-install finder (the repository root is the package
# fingpt_federated), so it checks the package through a link named after it.
TYPECHECK := build/typecheck
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	mkdir -p $(TYPECHECK) && ln -sfn ../.. $(TYPECHECK)/fingpt_federated
	cd $(TYPECHECK) && MYPYPATH=. ../../$(BIN)/mypy -p fingpt_federated

clean:
	rm -rf $(VENV) outputs multirun build
