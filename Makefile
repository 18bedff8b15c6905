# hark task runner. `make demo` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench up down status clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt -c constraints.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/hark models install
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/hark run data/speech/austen_passage.flac data/speech/forever_input_2_16k.wav --json .hark/demo.jsonl

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.pipeline

up: $(STAMP)
	$(BIN)/hark up
down:
	$(BIN)/hark down
status:
	$(BIN)/hark status

clean:
	rm -rf $(VENV) .hark
