# The two set-up commands: `make train` (main job) and `make test` (whole suite).
# Both create .venv if missing and install llmjax with pinned versions (constraints.txt), with the
# test and tpu extras (libtpu: `llmjax compile` and its tests; CPU runs never start it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,tpu]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/llmjax train --config=experiments/lm/stdlib_gpt.py --workdir=runs/stdlib_gpt

# Two workers (tests/conftest.py groups the files): a 2-core machine's second core does the other
# half of the suite while the first compiles.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests

clean:
	rm -rf $(VENV) runs
