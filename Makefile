# Two commands on a fresh machine:
#   make demo    prepare Shakespeare at character level, train, print a sample (about 2 minutes on 2 CPU
#                cores, plus the installation: torch from PyPI brings several GB of CUDA libraries on Linux)
#   make test    the whole test suite
#   make bench   bench.py's default run (a small preset on a CPU, GPT-2 124M on a GPU)
#   make gpu-check  on a CUDA GPU: the tests only a GPU runs, then the speed targets' benchmarks (GPT-2 124M
#                training and generation, the shakespeare-char run from start to exit), kept as bench-*.json
#   make clean   delete .venv and the demo's data set (data/shakespeare_char, except its input.txt); data sets
#                prepared by hand, checkpoints/ and runs/ stay
# Offline: make demo SHAKESPEARE=path/to/input.txt, and TIKTOKEN_CACHE_DIR=dir for the GPT-2 tokenizer files.
# Linux without a GPU: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu installs the small CPU build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, so requirements.txt's torch>=2.11 is already satisfied: any recent one where
# an NVIDIA driver is present, else the version the project is tested with.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.11' || echo 'torch==2.13.0')
# the index torch alone comes from; empty means pip's default (PyPI, whose Linux wheels bring the CUDA
# libraries). https://download.pytorch.org/whl/cpu has the much smaller CPU build.
TORCH_INDEX ?=
# tinyshakespeare's input.txt; empty means download it
SHAKESPEARE ?=
# the demo trains the GPU preset when CUDA is available, else the CPU preset
DEMO_PRESET ?= $$($(PY) -c "import torch; print('shakespeare-char' if torch.cuda.is_available() else 'shakespeare-char-cpu')")
DEMO_DIR ?= checkpoints/demo
# where prepare_data.py puts the demo's data set
DEMO_DATA = data/shakespeare_char

.PHONY: demo test bench gpu-check clean help FORCE

help:
	@sed -n '1,/^$$/p' Makefile

# the torch that was asked for: installing again when TORCH or TORCH_INDEX differ from what was installed.
# Decided when make reads this file, so that make -n says whether an installation would run.
TORCH_SPEC = $(strip $(TORCH) $(TORCH_INDEX))
ifneq ($(TORCH_SPEC),$(strip $(shell cat $(VENV)/.torch-spec 2>/dev/null)))
$(VENV)/.installed: FORCE
endif

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	echo '$(TORCH_SPEC)' > $(VENV)/.torch-spec
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) prepare_data.py --dataset shakespeare --tokenizer char $(if $(SHAKESPEARE),--input "$(SHAKESPEARE)")
	$(PY) train.py --preset=$(DEMO_PRESET) --checkpoint_dir=$(DEMO_DIR)
	@echo
	@echo "=== a sample from the model ($(DEMO_DIR)) ==="
	$(PY) generate.py --checkpoint_dir $(DEMO_DIR) --prompt "ROMEO:" --max_new_tokens 500 --seed 1337
	@echo
	@echo "Watch the run: $(PY) -m tensorboard.main --logdir runs   (or: tensorboard --logdir runs)"

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench.py

# With PY=python3 (a machine whose Python already has torch, pytest and the requirements) nothing is installed.
# The demo's data set is prepared first (from SHAKESPEARE, else its input.txt, else a download): the tests
# train on its text, and the whole run on the data set.
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/.installed-dev)
	@$(PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit('error: make gpu-check needs a CUDA GPU; ' \
	  'torch ' + torch.__version__ + ' sees none (make test runs everything else)')"
	$(PY) prepare_data.py --dataset shakespeare --tokenizer char $(if $(SHAKESPEARE),--input "$(SHAKESPEARE)")
	SHAKESPEARE="$(or $(SHAKESPEARE),$(DEMO_DATA)/input.txt)" $(PY) -m pytest -q -rs -m cuda tests
	$(PY) bench.py --preset gpt2 --batch_size 16 --block_size 1024 --json bench-gpt2.json
	$(PY) bench.py --whole_run --preset shakespeare-char --json bench-whole-run.json

# the demo's data set only: every other one under data/ (OpenWebText: hours of work) is the user's
clean:
	rm -rf $(VENV) $(addprefix $(DEMO_DATA)/,train.bin val.bin meta.json tokenizer.json)
