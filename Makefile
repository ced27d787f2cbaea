# `make train` sets up .venv (torch pinned first: its CPU wheel) and runs a tiny CPU pretraining.
# `make test` sets up .venv with the dev extra and runs the whole test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	@echo "building DeepSpeed's cpu_adam op for train.optimizer_offload=cpu (once, about 1-2 minutes)"
	$(BIN)/python -c "from scimoe.train.master import load_cpu_adam; load_cpu_adam()" >/dev/null 2>&1 \
		|| echo "warning: DeepSpeed's cpu_adam op did not build (needs g++ and ninja); train.optimizer_offload=cpu is unavailable"
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	WANDB_MODE=offline $(BIN)/scimoe-train hydra.run.dir=outputs/tiny-cpu $(ARGS)

test: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q --timeout=900 $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/moe_layer.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python -m torch.distributed.run --standalone --nproc_per_node=4 benchmarks/moe_expert_parallel.py
	$(BIN)/python benchmarks/rollout.py
	$(BIN)/python benchmarks/data_pipeline.py

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache
