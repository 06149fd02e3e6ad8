# make demo: train on the bundled MNIST sample (2 CPU processes here, every GPU on a GPU machine).
# make test: the whole test suite (real processes, real files).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DATA ?= $(HOME)/.cache/disttrain/mnist
DEMO_ARGS ?=
DEMO_FORMAT ?= folder
DEMO_SHARDS ?= $(DEMO_DATA)-shards
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')

ifeq ($(GPUS),0)
LAUNCH := --config_file configs/accelerate/cpu_2proc.yaml
else ifeq ($(GPUS),1)
LAUNCH := --num_processes 1
else
LAUNCH := --multi_gpu --num_processes $(GPUS)
endif

.PHONY: demo test venv clean

venv: $(STAMP)

# (Re)install when the venv is missing or pyproject.toml changed since the last install.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# make demo DEMO_FORMAT=shards: the same run from webdataset shards written by `disttrain prepare`
demo: $(STAMP)
	$(BIN)/disttrain demo-data $(DEMO_DATA)
ifeq ($(DEMO_FORMAT),shards)
	$(BIN)/disttrain prepare $(DEMO_DATA) $(DEMO_SHARDS) --presize 28 --quality 95 --no-progress
	$(BIN)/disttrain launch $(LAUNCH) launch/train.py --config configs/demo.yaml data.format=shards data.root=$(DEMO_SHARDS) $(DEMO_ARGS)
else
	$(BIN)/disttrain launch $(LAUNCH) launch/train.py --config configs/demo.yaml data.root=$(DEMO_DATA) $(DEMO_ARGS)
endif

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
