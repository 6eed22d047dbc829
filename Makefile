# Two entry points: `make demo` (the main job) and `make test` (the whole default test suite).
# Each builds .venv on first use, installing the pinned CPU torch first so that nothing pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
# The real nnU-Net for the segmentation study. nnunetv2 and dynamic-network-architectures go in
# without their requirements (which add timm, and timm a torchvision that fails to import beside
# the CPU torch; nnU-Net's plain UNet never imports timm); the rest of nnunetv2's requirements:
NNUNET := nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
NNUNET_REQUIRES := "acvl-utils>=0.2.6,<0.3" "batchgeneratorsv2>=0.3.2" "batchgenerators>=0.25.1" \
	"blosc2>=3.3.2" yacs seaborn imagecodecs graphviz

.PHONY: demo test test-slow benchmark models venv nnunet clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,study]" "$(TORCH)"
	$(MAKE) nnunet
	touch $@

venv: $(VENV)/.installed

nnunet:
	$(PY) -m pip install -q --no-deps $(NNUNET)
	$(PY) -m pip install -q $(NNUNET_REQUIRES) "$(TORCH)"

demo: venv
	$(VENV)/bin/diffusion-mic demo --out demo-out

# Two pytest-xdist workers, one per core, each given whole test files (module fixtures are built once),
# the slowest files first (Testing/Python/conftest.py orders them; xdist would reorder by test count).
test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-slow: venv
	$(PY) -m pytest -q -m slow

benchmark: venv
	$(VENV)/bin/diffusion-mic benchmark

# Retrain the six bundled models (about 2.5 hours on 2 CPU cores; see Resources/Models/train.sh).
models: venv
	Resources/Models/train.sh

clean:
	rm -rf $(VENV) demo-out
