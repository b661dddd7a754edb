# Fresh-machine entry points: `make repro` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test repro bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: its CPU wheel; an unpinned resolve pulls multi-GB CUDA builds.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 $(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# Main job: the DVC pipeline of params.yaml (quickstart data -> REDS-like training -> Vimeo-like
# finetuning -> evaluation and reports, plus the model report), on CPU. Stages already up to date
# are skipped and interrupted ones resume. DVC runs `gsm`, so the venv goes first on PATH.
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true $(BIN)/dvc repro

bench: $(STAMP)
	$(BIN)/python benchmarks/scan.py

clean:
	rm -rf $(VENV) .pytest_cache
