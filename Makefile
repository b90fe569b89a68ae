# Two commands on a fresh clone:  `make run` (the main job)  and  `make test` (the suite).
# Both create .venv and install everything first; re-running skips what is already done.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deltatune-installed
# Fashion-MNIST (image examples, CNN benchmark) is a Debian package, not a pip one.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup run test lint typecheck clean bench bench-cnn fashion-mnist chromium

setup: $(STAMP) fashion-mnist chromium

$(STAMP): pyproject.toml requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps -r requirements-assets.txt
	@$(BIN)/python -c "import torch; assert '+cpu' in torch.__version__ or torch.version.cuda, torch.__version__"
	touch $(STAMP)

# Installs dataset-fashion-mnist with apt when it is missing and this user can (root, or
# password-less sudo); otherwise prints how to, and set-up goes on (only the Fashion-MNIST
# examples need it).
fashion-mnist:
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: no apt-get here; Fashion-MNIST (data.source=fashion_mnist) needs the Debian package dataset-fashion-mnist, or its IDX files in /usr/share/datasets/fashion-mnist/"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" = none ]; then \
	    echo "note: Fashion-MNIST is not installed; run \`sudo apt-get install -y dataset-fashion-mnist\` for data.source=fashion_mnist"; \
	  else \
	    echo "installing Fashion-MNIST: $${SUDO:+$$SUDO }apt-get install -y dataset-fashion-mnist"; \
	    $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	      || { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
	      || echo "note: apt-get could not install dataset-fashion-mnist; data.source=fashion_mnist will not work until it is installed"; \
	  fi; \
	fi

# Installs Chromium with apt when it is missing and this user can (root, or password-less
# sudo); otherwise prints how to, and set-up goes on. Only the test that renders
# `deltatune compare`'s report.html in headless Chromium (tests/test_compare.py) needs it.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: no apt-get here; install Chromium (chromium or chromium-browser on PATH) for the report screenshot test"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" = none ]; then \
	    echo "note: Chromium is not installed; run \`sudo apt-get install -y chromium\` for the report screenshot test"; \
	  else \
	    echo "installing Chromium: $${SUDO:+$$SUDO }apt-get install -y chromium"; \
	    $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
	      || { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q chromium >/dev/null 2>&1; } \
	      || echo "note: apt-get could not install chromium; the report screenshot test will be skipped"; \
	  fi; \
	fi

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

bench-cnn: setup
	$(BIN)/python bench/cnn_compare.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
