# Newcomer commands: `make demo` (decode the bundled demo model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL := models/demo.onnx
DEMO_LAYER := conv4
DEMO_OUT := demo-out

.PHONY: install test test-gpu demo demo-model clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes (or .venv is gone).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[cpu,test]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# On a CUDA machine: the gpu extra (onnxruntime-gpu, CuPy) in its own venv, then the GPU tests.
# FDSUB_REQUIRE_GPU=1 makes a missing GPU a failure instead of a skip.
test-gpu:
	$(PYTHON) -m venv .venv-gpu
	.venv-gpu/bin/python -m pip install -e ".[gpu,test]"
	.venv-gpu/bin/python -m pytest -q -rs tests/test_gpu.py

demo: install
	$(BIN)/fdsub inspect $(DEMO_MODEL)
	$(BIN)/fdsub decode $(DEMO_MODEL) --layer $(DEMO_LAYER) --out $(DEMO_OUT)/
	@echo "decoded filters of $(DEMO_LAYER): open $(DEMO_OUT)/filters.png (arrays in $(DEMO_OUT)/decoded.npz)"

# Rebuild the bundled demo model from its script (deterministic).
demo-model: install
	$(BIN)/python models/build_demo.py $(DEMO_MODEL)

clean:
	rm -rf $(VENV) .venv-gpu $(DEMO_OUT) fdsub-out build *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
