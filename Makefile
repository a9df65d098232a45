PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# Torch from the local wheel cache where one exists; torch>=2.4 works (trainer=fsdp: torch>=2.7).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# test processes (pytest-xdist); each test runs on one intra-op thread (tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: install test demo lint format

install:
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	@$(PIP) show -q titok-lightning >/dev/null 2>&1 \
		&& $(PYTHON) -c "import lightning, hydra, webdataset, braceexpand, tensorboard, torch_fidelity, sklearn, pytest, xdist, lpips, open_clip, submitit" 2>/dev/null \
		|| $(PIP) install -q -e ".[dev]"

test: install
	$(PYTHON) -m pytest -q -x -n $(TEST_WORKERS) --durations=15 tests

# the offline end-to-end demo: tokenizer -> pretokenized digits -> generator -> samples -> class check
demo: install
	$(PYTHON) -m titok_lightning.demo

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .
