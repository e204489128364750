# Two entry points for a fresh machine: `make quickstart` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow test-all quickstart bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The minutes-long end-to-end runs (image and molecule pipelines, ARM baselines); CI runs both sets.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

quickstart: $(STAMP)
	$(PY) scripts/quickstart.py

# Step times, peak memory and query speed of every path (outputs/bench/BENCH.md); run it on an idle machine.
bench: $(STAMP)
	$(PY) -m mamlib.bench --output outputs/bench

clean-venv:
	rm -rf $(VENV)
