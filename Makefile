# make train: set up .venv if needed, fetch MNIST, train the reference recipe, print test accuracy.
# make test:  set up .venv if needed and run the test suite.
# make test-fast: the tests that start no process (about a minute), while working.
# make serve: the drawing page and HTTP API for the run in RUN_DIR, on http://127.0.0.1:PORT/.
# make lint:  ruff's lint and format checks (configured in pyproject.toml); make format fixes the format.
PYTHON_SYSTEM ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data
RUN_DIR ?= runs/reference
PORT ?= 8000
CONFIG ?= configs/train/reference.yaml
# One process: the first GPU if there is one, else the CPU.
LAUNCH_CONFIG ?= configs/accelerate/single_gpu.yaml
# Known-good builds; pip falls back to the index if they are not cached locally.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install data train test test-fast serve lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

data: install
	$(VENV)/bin/mnist-dist data download --data-dir $(DATA_DIR)

train: data
	$(VENV)/bin/accelerate launch --config_file $(LAUNCH_CONFIG) -m mnist_dist.train \
		--config $(CONFIG) --data-dir $(DATA_DIR) --output-dir $(RUN_DIR)

test: install
	MNIST_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q

test-fast: install
	MNIST_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q -m "not slow"

serve: install
	$(VENV)/bin/mnist-dist serve --weights $(RUN_DIR) --port $(PORT)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(RUN_DIR) .pytest_cache
