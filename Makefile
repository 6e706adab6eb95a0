# The two commands of the README: `make run` (the whole stack) and `make test` (the suite bar
# the tests marked slow, which `make proof` runs).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install run test check docs pytest bench proof services clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/astra-ops dev

test: install check pytest

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/python -m starters.runbook_docs --check

# docs/runbooks/, generated from the code: commit what this writes.
docs: install
	$(BIN)/python -m starters.runbook_docs

# Three processes, each with its own Temporal dev server: most tests wait on timers, rollouts
# and servers rather than the CPU, so three share a 2-core machine well (on one: 530 s against
# 630 s with two, the CPU about three-quarters busy).
PYTEST_WORKERS ?= 3

# The tests marked slow run in `make proof` (pyproject.toml says which and why).
pytest: install
	$(BIN)/pytest -n $(PYTEST_WORKERS) -m "not slow"

bench: install
	$(BIN)/python bench/step_overhead.py
	$(BIN)/python bench/cli_latency.py

# The long proof (not part of `make test`, whose tests/test_worker_recovery.py kills a worker
# inside one step): the tests marked slow, among them PROOF_KILLS worker kills at a random
# activity of each of the other ten runbooks (tests/test_kill_anywhere.py; the outcome of each
# test goes to bench/proof-tests.xml), then bench/proof.py's fault injection on Shard Scaling:
# PROOF_TRIALS worker kills, two workers under load, the dev server killed, the Kubernetes API
# failing (the summary goes to bench/proof.json). At the defaults, 110 worker kills in all, 10
# for each of the 11 runbooks, about half a minute each; bench/report.py puts both on RESULTS.md.
PROOF_TRIALS ?= 10
PROOF_KILLS ?= 10
# Two processes: the proof's tests each run stacks of whole processes (workers they kill,
# database clusters), which three at a time would starve.
PROOF_WORKERS ?= 2

# A failed trial is a finding, not a reason to skip the rest: both halves run, and the target
# fails at the end if either did.
proof: install
	ASTRA_OPS_PROOF_KILLS=$(PROOF_KILLS) $(BIN)/pytest -n $(PROOF_WORKERS) -m slow \
		--junitxml=bench/proof-tests.xml; tests=$$?; \
	PROOF_TRIALS=$(PROOF_TRIALS) $(BIN)/python bench/proof.py; trials=$$?; \
	exit $$(( tests || trials ))

clean:
	rm -rf $(VENV) .astra .mypy_cache .ruff_cache .pytest_cache
