# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# GENMODELS_FASHION_MNIST_DIR from the environment (a path, file:// or s3://) wins over the default.
FASHION_MNIST_DIR ?= $(or $(GENMODELS_FASHION_MNIST_DIR),/usr/share/datasets/fashion-mnist)
# Where torch's wheel comes from: empty, pip's configured index (here a CPU wheel on disk); elsewhere
# e.g. https://download.pytorch.org/whl/cpu, as PyPI's Linux wheel is the CUDA build.
TORCH_INDEX ?=
PRESET ?= quick

.PHONY: setup data browser run test clean

# torch first, pinned: its CPU wheel is on disk here, and a range resolved by pip alone would
# pull a CUDA build of several GB. constraints.txt pins every other version (reproducible installs);
# a change to it or to pyproject.toml reinstalls.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -c constraints.txt -e '.[all,test]'
	touch $(STAMP)

setup: $(STAMP)

data:
	@if case "$(FASHION_MNIST_DIR)" in s3://*) true;; *) false;; esac; then \
		echo "Fashion-MNIST is read from $(FASHION_MNIST_DIR) when the retrain prepares it"; \
	elif [ -f "$(FASHION_MNIST_DIR:file://%=%)/train-images-idx3-ubyte.gz" ] || [ -f "$(FASHION_MNIST_DIR:file://%=%)/train-images-idx3-ubyte" ]; then \
		echo "Fashion-MNIST found in $(FASHION_MNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing from $(FASHION_MNIST_DIR). Install it with" >&2; \
		echo "  sudo apt-get install dataset-fashion-mnist" >&2; \
		echo "or put the four IDX files in a folder and run: make run FASHION_MNIST_DIR=/that/folder" >&2; \
		exit 1; \
	fi

# The playground's test drives Debian's headless Chromium.
browser:
	@if command -v chromium >/dev/null; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "chromium is missing (the playground test needs it): sudo apt-get install chromium" >&2; \
		exit 1; \
	fi

# The retrain pipeline on the embedded defaults (local Ray, Prefect's ephemeral server, MLflow on
# sqlite and file:// storage under ./.genmodels); families that already have a champion are
# skipped. Then the online API on the champions, at http://127.0.0.1:8000 (Ctrl-C stops).
run: setup data
	GENMODELS_FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(BIN)/genmodels retrain --family all --preset $(PRESET) --if-no-champion
	$(BIN)/genmodels serve --host 127.0.0.1 --port 8000

test: setup browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .genmodels .pytest_cache
