# Fresh-machine entry points: `make repro` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup setup-cuda test repro repro-paper paper-params ablations schedule deploy worker mlflow-ui bench clean

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
# `gsm pipeline-run` nests the MLflow runs of this one execution under one parent run.
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true \
	  $(BIN)/gsm pipeline-run --name repro -- $(BIN)/dvc repro

# The paper's numbers: REDS + Vimeo-90K + Vid4, the paper's network and recipe, on CUDA GPUs
# (README "Reproducing the paper"). params.yaml becomes configs/paper.yaml; `git checkout
# params.yaml` returns to the quickstart. Data and runs are per profile, so nothing is mixed.
repro-paper: paper-params setup-cuda
	PATH="$(CURDIR)/$(BIN):$$PATH" DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true \
	  $(BIN)/gsm pipeline-run --name repro-paper -- $(BIN)/dvc repro

# The switch refuses (no backup is kept) when params.yaml holds uncommitted edits that
# configs/paper.yaml would overwrite; already the paper profile, it is a no-op. Put paper edits
# (a Vid4 mirror, checksums) in configs/paper.yaml, or commit them, before switching.
paper-params:
	@if ! cmp -s configs/paper.yaml params.yaml && ! git diff --quiet HEAD -- params.yaml; then \
	  echo "error: params.yaml has uncommitted changes that configs/paper.yaml would overwrite:" \
	    "commit or stash them, or copy them into configs/paper.yaml" >&2; exit 1; fi
	cp configs/paper.yaml params.yaml

# mamba-ssm and causal-conv1d ship as sources only. scripts/setup_cuda.py installs the projects'
# prebuilt wheel where one matches, else compiles for this machine's GPUs only (or CUDA_ARCHS,
# e.g. CUDA_ARCHS=8.0,9.0), then checks the kernels; a rerun with them in place only re-checks.
# Then the project with its cuda extra: pip finds the kernels at their pins, so it rebuilds
# nothing and adds only what is missing (usually nothing).
CUDA_ARCHS ?=
setup-cuda: $(STAMP)
	$(BIN)/python scripts/setup_cuda.py $(if $(strip $(CUDA_ARCHS)),--archs '$(strip $(CUDA_ARCHS))')
	$(BIN)/python -m pip install --quiet --no-build-isolation -e '.[cuda,test]'

# The paper's ablations (SPEC: anchor, scatter, alignment, scan order, window K) as DVC experiments
# of the current profile, each from the committed params, then one table. Quickstart: ~15 min each.
# Afterwards params.yaml and dvc.lock are the committed ones again, the checkpoints come back from
# the DVC cache, and reports/ holds the last experiment's until `make repro` re-evaluates.
WINDOW_ALT ?= 5   # the window-K ablation: the quickstart has K = 3; use WINDOW_ALT=3 for the paper's K = 5
ALIGN_ALT ?= implicit  # the alignment ablation: the quickstart aligns bilinearly; ALIGN_ALT=bilinear for the paper
ABLATIONS := anchor-forward=model.anchor=forward no-scatter=model.scatter=false \
             $(strip $(ALIGN_ALT))-align=model.align=$(strip $(ALIGN_ALT)) spatial-first=model.scan_order=spatial_first \
             window-$(strip $(WINDOW_ALT))=model.window=$(strip $(WINDOW_ALT))
ablations: $(STAMP)
	set -e; for a in $(ABLATIONS); do \
	  git checkout -- params.yaml dvc.lock; \
	  PATH="$(CURDIR)/$(BIN):$$PATH" DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true \
	    $(BIN)/gsm pipeline-run --name "$${a%%=*}" -- $(BIN)/dvc exp run -n "$${a%%=*}" -S "$${a#*=}"; \
	done
	git checkout -- params.yaml dvc.lock && $(BIN)/dvc checkout --quiet || true
	$(BIN)/dvc exp show --no-pager --only-changed --md --drop 'Created|State|Executor|sha256|checkpoint'

# Scheduled retraining: serve the Prefect `retrain` deployment on params.yaml's `prefect.retrain_cron`
# until Ctrl-C (README "Scheduled retraining"). Without PREFECT_API_URL a private local Prefect
# server runs the scheduler; with it, that server does. `--dry-run` shows the next runs.
schedule: $(STAMP)
	DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false \
	  $(BIN)/python -m pipelines.serve --params params.yaml

# For teams (README "For teams: a work pool"): `make deploy` registers `gsm-pipeline` (on demand) and
# `retrain` (on prefect.retrain_cron) with the work pool prefect.work_pool of the Prefect server at
# PREFECT_API_URL, creating the pool if missing; the runs execute in the checkout WORKDIR (absolute,
# on the worker machine; default: this one). `make worker`, on each GPU machine after
# `make setup-cuda`, runs what the pool hands it, one at a time, until Ctrl-C.
WORKDIR ?=
deploy: $(STAMP)
	$(BIN)/python -m pipelines.deploy --params params.yaml $(if $(strip $(WORKDIR)),--workdir '$(strip $(WORKDIR))')

worker: $(STAMP)
	DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pipelines.deploy worker --params params.yaml

# The MLflow UI over the embedded store that `make repro` tracks into (params.yaml `mlflow`):
# runs, metrics, artifacts and the registered model, at http://127.0.0.1:5000 (this machine only).
mlflow-ui: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db \
	  --default-artifact-root ./mlartifacts --host 127.0.0.1 --port 5000

bench: $(STAMP)
	$(BIN)/python benchmarks/scan.py

clean:
	rm -rf $(VENV) .pytest_cache
