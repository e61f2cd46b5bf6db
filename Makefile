# Two commands on a fresh machine (GNU make, python3 >= 3.10 with venv):
#   make train [ARGS="debug=fast ..."]   the Multi30k en -> de recipe; ARGS: Hydra overrides
#   make test [ARGS="-k name ..."]       ruff, then the test suite (what .ci/run runs)
# Both build .venv on first use (minutes: torch, then this package with its dev extras);
# later calls find .venv/.installed newer than pyproject.toml and go straight to the job.
# Works from anywhere: make -C path/to/transformer train.

ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
VENV ?= $(ROOT)/.venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

# torch, the version CI tests. Where no NVIDIA driver answers, PyTorch's CPU index is offered
# beside PyPI, so pip takes the CPU build (2.13.0+cpu sorts above 2.13.0) and not the
# multi-GB CUDA one that PyPI ships for Linux; TORCH_INDEX= turns that off. Only torch itself
# is looked up there (--no-deps): its dependencies come from PyPI with the package's. Where
# that index cannot be reached, pip warns, retries for ~10 s and takes the build it finds.
# -qq: errors only, else a cold set-up prints pages.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= $(if $(shell nvidia-smi -L 2>/dev/null),,https://download.pytorch.org/whl/cpu)

# The Multi30k files: $MULTI30K_DIR (a relative path counts from the repository root), else
# the shared copy beside the repository, else none: then the data code downloads them. Made
# absolute (the tests run in temporary folders) and shown in the command that make prints.
MULTI30K_DIR ?= $(wildcard $(ROOT)/../shared/data/multi30k)
DATA := $(if $(MULTI30K_DIR),MULTI30K_DIR=$(abspath $(if $(filter /%,$(MULTI30K_DIR)),,$(ROOT)/)$(MULTI30K_DIR)))

.PHONY: help setup train test tensorboard
help:
	@echo "make train [ARGS=\"debug=fast ...\"]  set up on first use, then train (Multi30k en -> de)"
	@echo "make test [ARGS=\"-k name ...\"]      set up on first use, then ruff and pytest"
	@echo "make tensorboard                    the curves of the runs in outputs/"
	@echo "make setup                          only the set-up: $(VENV)"
	@echo "data: $(or $(DATA),none found: the Multi30k files are downloaded)"

setup: $(STAMP)

$(STAMP): $(ROOT)/pyproject.toml
	@echo "setting up $(VENV) (first run only: a few minutes)"
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -qq --no-deps $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -qq -e "$(ROOT)[dev]"
	touch $@

train: $(STAMP)
	cd $(ROOT) && $(DATA) $(PYTHON) train.py experiment=multi30k_en_de $(ARGS)

test: $(STAMP)
	cd $(ROOT) && $(VENV)/bin/ruff check . && $(DATA) $(PYTHON) -m pytest -q $(ARGS)

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir $(ROOT)/outputs
