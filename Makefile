SHELL := /bin/bash
# lmlab's front door. Every target that needs Python depends on .venv, which `make setup` builds.
# Targets are one-liners calling `lm ...` or pytest; the logic lives in the packages.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
EXP     ?= experiments/tiny.yaml
ARGS    ?=
export THP_MEM_ALLOC_ENABLE ?= 1

.PHONY: setup browser train train-local sweep scaling eval generate data config bench bench-serve test test-fast lint format mlflow-ui job job-sweep cluster-up cluster-down mlflow-server serve serve-stop clean

setup: $(VENV)/.installed ## create .venv and install lmlab with its dev tools

# One line per phase: pip -q is silent for the minutes the install takes. The PYTHONWARNINGS filter drops only
# setuptools' 10-line "Editable installation" notice, printed on every editable install.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || { echo "creating $(VENV) with $$($(PY) --version)"; $(PY) -m venv $(VENV); }
	@echo "upgrading pip in $(VENV)"
	@$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	@echo "installing lmlab and its dependencies (torch, ray, mlflow; about 2 minutes on a fresh machine)..."
	@PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0
	@touch $@
	@echo "installed: run .venv/bin/lm, or \`source .venv/bin/activate\` to put lm on the PATH"

train: setup ## train the tiny preset for 2 minutes, evaluate it and print a sample
	$(BIN)/lm train $(EXP) $(ARGS)

train-local: setup ## the same in this process without Ray (still tracked in MLflow), in runs/<name>-local
	$(BIN)/lm train --local $(EXP) $(ARGS)

# A re-run of the same sweep resumes it (finished trials are kept); SWEEP=experiments/sweep-tiny.yaml for another.
SWEEP ?= experiments/sweep.yaml
sweep: setup ## search sizes, LR schedules and peak LRs with Ray Tune (ASHA), tracked in MLflow; see README "Sweeps"
	$(BIN)/lm sweep $(SWEEP) $(ARGS)

scaling: setup ## iso-time study: the compute-optimal model size per training budget (about 23 min)
	$(BIN)/lm sweep experiments/scaling.yaml $(ARGS)

data: setup ## prepare the tokenizer and token cache for EXP
	$(BIN)/lm data prepare --config $(EXP) $(ARGS)

config: setup ## print every setting of EXP with its value: make config ARGS='optim.lr=3e-3'
	@$(BIN)/lm config show $(EXP) $(ARGS)

eval: setup ## evaluate a checkpoint or a run's best one: make eval CKPT=runs/tiny
	$(BIN)/lm eval $(CKPT) $(ARGS)

generate: setup ## sample from a checkpoint: make generate CKPT=runs/tiny ARGS='--prompt "ROMEO:"'
	$(BIN)/lm generate $(CKPT) $(ARGS)

# `make serve` stays in the foreground (Ctrl-C stops it); detached: `nohup make serve > runs/serve.log 2>&1 &`, then
# `make serve-stop` (SIGTERM to the pid in serve.pid_file, runs/serve.pid). Another model: ARGS='--model runs/tiny'.
SERVE ?= experiments/serve.yaml
serve: setup ## serve the best tiny model over HTTP on 127.0.0.1:8000 (OpenAI-compatible; see README "Serving")
	$(BIN)/lm serve $(SERVE) $(ARGS)

serve-stop: setup ## stop a server started with make serve (runs/serve.pid)
	$(BIN)/lm serve $(SERVE) --stop $(ARGS)

mlflow-ui: setup ## browse runs, metrics and artifacts at http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port 5000

# Past one machine (README "Scaling out"; lmplatform/cluster.py). `make cluster-up` starts a Ray head here with token
# auth and records it in runs/cluster/; `make job` / `make job-sweep` find it (RAY_ADDRESS overrides), upload the
# checkout less git-ignored files, follow the logs and print the MLflow run; `make cluster-down` stops that head only.
# Options go in ARGS: make cluster-up ARGS='--num-cpus 2'; make job ARGS='--storage s3://bucket/runs ray.num_workers=2'.
cluster-up: setup ## start a local Ray head (token auth, this venv on its PATH); prints dashboard and job addresses
	$(BIN)/lm cluster up $(ARGS)

cluster-down: setup ## stop the head make cluster-up started (only its processes; never `ray stop`)
	$(BIN)/lm cluster down

job: setup ## submit `lm train EXP` as a Ray job to the head of make cluster-up (or RAY_ADDRESS); follows its logs
	$(BIN)/lm job train $(EXP) $(ARGS)

job-sweep: setup ## submit `lm sweep SWEEP` as a Ray job, like make job
	$(BIN)/lm job sweep $(SWEEP) $(ARGS)

mlflow-server: setup ## a shared MLflow tracking server on 127.0.0.1:5000 (ARGS='--host 0.0.0.0' for a cluster)
	$(BIN)/lm mlflow-server $(ARGS)

bench: setup ## throughput, generation, MFU, serving-load and time-to-first-step benchmarks (tables; bench/results/*.json); ARGS='--only train' for one, '--only share' for Ray's share of the steps (20 min)
	$(BIN)/python -m bench.run $(ARGS)

bench-serve: setup ## lm serve under load per batching mode (minutes; bench/results/serve.json); ARGS='--soak-seconds 300' soaks
	$(BIN)/python -m bench.serve_load $(ARGS)

test: setup browser ## the whole test suite (unit + integration with real Ray/MLflow, the playground in Chromium)
	$(BIN)/python -m pytest -q $(ARGS)

# The playground's browser test drives Debian's chromium through chromium-driver (selenium downloads nothing).
browser: ## install chromium + chromium-driver with apt if they are missing (the playground test needs them)
	@command -v chromedriver >/dev/null || { echo "installing chromium and chromium-driver (apt)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

test-fast: setup ## the unit tests only (no Ray)
	$(BIN)/python -m pytest -q -m "not ray" $(ARGS)

lint: setup ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf runs data mlartifacts mlflow.db .pytest_cache .ruff_cache
