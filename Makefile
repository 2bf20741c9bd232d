# lattice_lab — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# CPU build by default (CI and laptops). A GPU user: make install TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
# Overrides passed to every entrypoint, e.g. make train ARGS="model=gnn_small trainer.max_epochs=5"
ARGS ?=
SEARCH ?= enn_optuna
# make paper's four models (conf/experiment/paper_force_accuracy.yaml: run_name paper_<family>), scored on an
# independent 40 x 40 build (seed 1: new hot starts and bath noise; the validation third shares trajectories)
PAPER_MODELS := checkpoint=runs/checkpoints/paper_enn,runs/checkpoints/paper_gnn,runs/checkpoints/paper_gnn_energy,runs/checkpoints/paper_mlp

.PHONY: help install test demo data train evaluate simulate analyze sweep ui bench paper lint clean

# Generate a dataset unless its file is already there ($(1): generate's overrides). A finished build is never
# partial (an interrupted one lives in <path>.partial.pt and is resumed), and make demo builds holstein_L16
# first; with overwrite=true it always rebuilds.
define generate_once
	@path=$$($(PY) -m lattice_lab.generate $(1) --cfg job --resolve --package dataset.path) || exit; \
	if [ -z "$(filter overwrite=true,$(1))" ] && [ -f "$$path" ]; then \
	  echo "$$path exists, nothing to generate (overwrite=true rebuilds it)"; \
	else echo "$(PY) -m lattice_lab.generate $(1)" && $(PY) -m lattice_lab.generate $(1); fi
endef

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq $(TORCH_SPEC) $(TORCH_INDEX)
	$(PY) -m pip install -qq -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install lattice_lab (editable) with pinned dependencies

test: $(STAMP)  ## run the test suite (tiny lattices, CPU)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 tests

demo: $(STAMP)  ## end to end on a small default: data -> enn_small -> 96x96 quench -> analysis
	$(PY) -m lattice_lab.demo $(ARGS)

data: $(STAMP)  ## generate an ED dataset unless it exists (default holstein_L16; ARGS="dataset=holstein_L40")
	$(call generate_once,$(ARGS))

train: $(STAMP)  ## train a force field (ARGS="model=enn dataset=holstein_L40")
	$(PY) -m lattice_lab.train $(ARGS)

evaluate: $(STAMP)  ## score a trained force field on a dataset (ARGS="checkpoint=runs/checkpoints/<run> dataset=holstein_L24")
	$(PY) -m lattice_lab.evaluate $(ARGS)

simulate: $(STAMP)  ## Langevin quench with ML or ED forces (ARGS="force=ml force.checkpoint=...")
	$(PY) -m lattice_lab.simulate $(ARGS)

analyze: $(STAMP)  ## analyse a trajectory (ARGS="trajectory=runs/trajectories/.../trajectory.h5")
	$(PY) -m lattice_lab.analyze $(ARGS)

sweep: $(STAMP)  ## Optuna sweep through Hydra multirun (enn_small; SEARCH=gnn_optuna / mlp_optuna for the other families)
	$(PY) -m lattice_lab.train -m hparams_search=$(SEARCH) $(ARGS)

UI_PORT ?= 5000
ui: $(STAMP)  ## MLflow UI on the local store (http://127.0.0.1:5000; UI_PORT=5001 for another port)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///runs/mlflow.db --default-artifact-root runs/mlartifacts --host 127.0.0.1 --port $(UI_PORT)

bench: $(STAMP)  ## speed benchmark: matmul ceiling, models, Langevin step, ED crossover
	$(PY) -m lattice_lab.bench $(ARGS)

paper: $(STAMP)  ## full reproduction of both papers' figures, models scored on an independent test build (GPU recommended, hours)
	$(call generate_once,dataset=holstein_L40)
	$(PY) -m lattice_lab.train -m +experiment=paper_force_accuracy
	$(call generate_once,dataset=holstein_L40 seed=1 dataset.name=holstein_L40_test)
	$(PY) -m lattice_lab.evaluate -m $(PAPER_MODELS) dataset=holstein_L40 dataset.path=runs/data/holstein_L40_test.h5
	$(PY) -m lattice_lab.simulate --config-name simulate_compare +experiment=paper_ed_vs_ml
	$(PY) -m lattice_lab.simulate -m +experiment=paper_coarsening

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check lattice_lab tests

clean:  ## remove caches; runs/ outputs too (datasets, checkpoints, MLflow/Optuna stores) after asking, or YES=1
	rm -rf outputs multirun .pytest_cache .ruff_cache
	@outputs="find runs -mindepth 1 -maxdepth 1 ! -name README.md"; [ -n "$$($$outputs 2>/dev/null)" ] || exit 0; \
	if [ "$(YES)" != 1 ]; then $$outputs -exec du -sh {} +; \
	  read -r -p "delete these from runs/ (keeps runs/README.md)? [y/N] " answer || true; \
	  case "$$answer" in [yY]*) ;; *) echo "runs/ kept (make clean YES=1 deletes without asking)"; exit 0;; esac; fi; \
	$$outputs -exec rm -rf {} +
