# Newcomer commands: `make demo` (the HTML report of the bundled demo model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL := models/demo.onnx
DEMO_IMAGES := builtin:glyphs:256
DEMO_OUT := demo-out
# demo-model only: a Python with torch==2.13.0 (see models/train_demo.py); never needed by fdsub itself.
TORCH_PYTHON ?= /tmp/bench/bin/python

.PHONY: install chromium lint test test-gpu demo demo-model fuzz clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes (or .venv is gone).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[cpu,test]"
	touch $(STAMP)

# Best effort: headless Chromium for the report's browser test (tests/present/test_report.py skips, with the
# reason, where it is missing). Installed with apt when this runs as root on Debian/Ubuntu.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	     && { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
	          || { apt-get update -q >/dev/null 2>&1 \
	               && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; }; } \
	|| echo "note: chromium not installed (needs root and apt-get); the browser test of the report will be skipped"

# ruff (rules in pyproject.toml) and the one-way import contract (import-linter; docs/architecture.md)
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

test: install chromium lint
	$(BIN)/python -m pytest -q

# On a CUDA machine: the gpu extra (onnxruntime-gpu, CuPy) in its own venv, then the GPU tests.
# FDSUB_REQUIRE_GPU=1 makes a missing GPU a failure instead of a skip.
test-gpu:
	$(PYTHON) -m venv .venv-gpu
	.venv-gpu/bin/python -m pip install -q -e ".[gpu,test]"
	.venv-gpu/bin/python -m pytest -q -rs tests/compose/test_gpu.py

# The report command prints where the report is, once.
demo: install
	$(BIN)/fdsub inspect $(DEMO_MODEL)
	$(BIN)/fdsub report $(DEMO_MODEL) --images $(DEMO_IMAGES) --out $(DEMO_OUT)/

# Thousands of hostile command lines through every command but diff and fingerprint, with a summary by input class
# (docs/reliability.md).
fuzz: install
	$(BIN)/python tools/fuzz.py --cases $(or $(CASES),3000)

# Retrain the bundled demo model (deterministic, about 4 minutes on one core). Needs torch:
# make demo-model TORCH_PYTHON=/path/to/python-with-torch
demo-model:
	$(TORCH_PYTHON) models/train_demo.py $(DEMO_MODEL)

clean:
	rm -rf $(VENV) .venv-gpu $(DEMO_OUT) fdsub-out build *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
