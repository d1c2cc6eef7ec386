# Set-up and entry points. Every target creates .venv/ first if it is missing or out of date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= bloodcells_mini
ARGS ?=
RUN_DIR ?=

.PHONY: venv train data test lint bench bench-regimen

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

## Train, then score the run on its test split. Without options: the embedded bloodcells_mini
## sample and the preset that suits the machine (full on a CUDA GPU, cpu otherwise). Options go in
## ARGS="--data bloodmnist --preset full ..."; RUN_DIR=runs/NAME names the run folder. With
## --run-dir or --resume in ARGS the folder is the user's: train.py prints the test command.
train: $(STAMP)
	@case " $(ARGS) " in \
	*" --run-dir"*|*" --resume"*) \
		echo "$(PY) models/train.py $(ARGS)"; $(PY) models/train.py $(ARGS);; \
	*) \
		run="$(RUN_DIR)"; run="$${run:-runs/train-$$(date +%Y%m%d-%H%M%S)}"; \
		echo "$(PY) models/train.py --run-dir $$run $(ARGS)"; \
		$(PY) models/train.py --run-dir "$$run" $(ARGS) && \
		echo "$(PY) test.py --run-dir $$run" && \
		$(PY) test.py --run-dir "$$run";; \
	esac

data: $(STAMP)
	$(PY) -m dataset prepare $(DATA)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/data_throughput.py
	$(PY) bench/overhead.py

## The regimen against a plain loop, both arms (about 20 minutes for bloodcells and 30 for the brain MRI on 2 CPU cores).
bench-regimen: $(STAMP)
	$(PY) bench/regimen.py --data ../shared/data/bloodcells_pbc_28.npz
	$(PY) bench/regimen.py --data ../shared/data/brain_tumor_mri_64.npz
