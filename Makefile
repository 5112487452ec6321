# The two jobs the README opens with. Both set up a virtual environment first.
#   make serve   install, build the default model repository on first run, serve it on :50051
#   make test    install, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REPOSITORY ?= model_repository
PORT ?= 50051
METRICS_PORT ?= 9090

.PHONY: setup setup-serve serve build-default test protos check-protos clean

# torch==2.13.0 is pinned in the `train` extra: it installs the CPU build kept on these machines' disk.
# Serving needs the core and, to build the default repository, `train`; the tests need every extra.
$(BIN)/.installed-serve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train]'
	touch $@

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,dev,ray,bench]'
	touch $@

setup: $(BIN)/.installed

setup-serve: $(BIN)/.installed-serve

build-default: setup-serve
	$(BIN)/seqserve build-default --repository $(REPOSITORY) --if-missing

serve: build-default
	TOKENIZERS_PARALLELISM=false $(BIN)/seqserve serve --repository $(REPOSITORY) --port $(PORT) --metrics-port $(METRICS_PORT)

test: setup
	TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

protos: setup
	$(BIN)/python protos/generate.py

check-protos: setup
	$(BIN)/python protos/generate.py --check

clean:
	rm -rf $(VENV) build *.egg-info
