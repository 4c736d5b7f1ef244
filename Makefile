# Two commands for a fresh machine: `make demo` (set up + offline quickstart) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := .ci/constraints.txt

.PHONY: demo test test-fast setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m cyb_lightning fit --config conf/quickstart.yaml

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs/* data/quickstart
