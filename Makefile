# Two entry points: `make demo` (the main job) and `make test` (the whole default test suite).
# Each builds .venv on first use, installing the pinned CPU torch first so that nothing pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: demo test test-slow benchmark models venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,study]" "$(TORCH)"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/diffusion-mic demo --out demo-out

# Two pytest-xdist workers, one per core, each given whole test files (module fixtures are built once).
test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: venv
	$(PY) -m pytest -q -m slow

benchmark: venv
	$(VENV)/bin/diffusion-mic benchmark

# Retrain the six bundled models (about 2.5 hours on 2 CPU cores; see Resources/Models/train.sh).
models: venv
	Resources/Models/train.sh

clean:
	rm -rf $(VENV) demo-out
