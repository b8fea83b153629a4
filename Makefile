# The user's menu: `make help`. Each target is one call into the package; set-up is automatic.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
DIR ?=
SWEEP ?= lr_epochs
EXP ?=
SEEDS ?=

.PHONY: help setup demo real test test-fast train evaluate bench sweep compare lint clean gpu-wheels gpu-check gpu-experiment gpu-rehearsal

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV) && touch $(STAMP)

setup: $(STAMP) ## create .venv and install (CPU torch on machines without a GPU)

demo: $(STAMP) ## the whole pipeline on the embedded default: tiny model, synthetic GSM8K, CPU
	$(PY) -m gsm8k_lora.train experiment=smoke $(ARGS)

# The real GSM8K from ../shared where it is present (this project's machines), else from the hub.
GSM8K_LOCAL := $(if $(wildcard ../shared/gsm8k/train.jsonl),data=local data.path=../shared/gsm8k)

real: $(STAMP) ## a real model (SmolLM2-135M-Instruct) on the real GSM8K, end to end on a CPU in < 30 min
	$(PY) -m gsm8k_lora.train experiment=real_cpu $(GSM8K_LOCAL) $(ARGS)

# One worker per core, each test file on one worker (its module fixtures, a training run each, are made once).
test: $(STAMP) ## the test suite (tiny model, CPU, offline; CUDA tests skip without a GPU)
	$(PY) -m pytest -n auto --dist loadfile $(ARGS)

test-fast: $(STAMP) ## the tests that run no training job
	$(PY) -m pytest -m "not slow" $(ARGS)

train: $(STAMP) ## a real run: make train ARGS="lora.r=8 trainer.learning_rate=1e-4"
	$(PY) -m gsm8k_lora.train $(ARGS)

lint: $(STAMP) ## ruff (style and common bugs)
	$(PY) -m ruff check gsm8k_lora tests

clean: ## remove run outputs (keeps .venv and the model cache)
	rm -rf outputs/runs outputs/multirun

evaluate: $(STAMP) ## GSM8K accuracy of a base model, or base vs adapter: make evaluate ARGS="adapter=outputs/runs/X"
	$(PY) -m gsm8k_lora.evaluate $(ARGS)

bench: $(STAMP) ## speed figures as ratios measured in one run; writes outputs/bench/<time>.json
	$(PY) -m gsm8k_lora.bench $(if $(wildcard ../shared/gsm8k/train.jsonl),--gsm8k ../shared/gsm8k) $(ARGS)

sweep: $(STAMP) ## a Hydra multirun of a sweep file: SWEEP=lr_epochs (default), parallel, optuna, slurm or slurm_local; EXP=smoke: the tiny CPU grid; SEEDS=3: seeds per setting
	$(PY) -m gsm8k_lora.train -m --config-dir sweeps --config-name $(SWEEP) $(if $(EXP),experiment=$(EXP)) $(if $(SEEDS),grid.seeds=$(SEEDS)) $(if $(filter real%,$(EXP)),$(GSM8K_LOCAL)) $(ARGS)

compare: $(STAMP) ## table and plots of a sweep: make compare DIR=outputs/multirun/<sweep>
	$(PY) -m gsm8k_lora.compare $(DIR)

gpu-wheels: $(STAMP) ## .gpu-carry/ for a lent GPU machine: the wheels its image lacks, the tiny model, GSM8K (checked)
	$(PY) scripts/gpu_carry.py build

gpu-check: ## on a lent GPU machine, carrying .gpu-carry: install it, the levers' bench, a short Falcon3-shaped run, pytest -m gpu
	bash scripts/gpu_check.sh

gpu-experiment: ## on a lent GPU machine, carrying .gpu-carry: the seed's whole experiment at Falcon3's shape (GPU_CHOSEN=levers)
	bash scripts/gpu_check.sh --experiment

gpu-rehearsal: gpu-wheels ## here, not in make test: the GPU check's call offline on a cached stand-in of the machine's image
	bash scripts/gpu_rehearsal.sh
