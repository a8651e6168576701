# prism: the two set-up commands are `make demo` (main job on the built-in model) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    := runs/demo
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-all test-slow tables bench-profile bench-partition bench-scale plan-costs compare-solvers gate-ablation model gpu-check lint clean

# torch is pinned to the CPU build in the same pip command, so pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on the built-in model and data: profile -> partition -> export -> bench,
# with the settings of configs/builtin.yaml (bench at batch 8 only); ends with the Pareto table (runs/demo/bench/).
demo: $(STAMP)
	mkdir -p $(RUN)
	$(BIN)/prism profile --config configs/builtin.yaml --out $(RUN)/profile.h5
	$(BIN)/prism partition $(RUN)/profile.h5 --config configs/builtin.yaml --out $(RUN)/partition.h5
	$(BIN)/prism export builtin $(RUN)/partition.h5 --config configs/builtin.yaml --out $(RUN)/export --force
	$(BIN)/prism bench $(RUN)/export --config configs/builtin.yaml --batch 8 --min-quality 45 --out $(RUN)/bench

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# Regenerate the committed operating-point tables (tables/builtin/).
tables: $(STAMP)
	$(BIN)/prism tables --config configs/builtin.yaml --out tables

# Benchmarks that write their numbers to files under results/.
bench-profile: $(STAMP)
	$(BIN)/python -m prism_cli.profiling.benchmark --out results/bench_profile.json

bench-partition: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python -m prism_cli.solvers.benchmark --out results/bench_partition.json

# Per-unit costs of this machine for `prism plan` (partition by solver and width, export, loading,
# disk), single-threaded like bench-scale; the committed file is what `prism plan` uses on machines
# that have not run `prism plan calibrate` themselves.
plan-costs: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(BIN)/prism plan calibrate --out prism_cli/data/plan_costs.json

# Synthetic checkpoints at OLMoE-1B-7B's expert shapes (2 and 4 layers, about 5 GB in runs/scale/):
# profile memory, kill + resume, partition resume and merge, export, and `prism plan` against them
# (about an hour on 2 shared cores). Steps already measured in runs/scale/measurements.json are skipped.
bench-scale: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python scripts/bench_scale.py --work runs/scale --out results/scale

gate-ablation: $(STAMP)
	mkdir -p $(RUN)
	test -f $(RUN)/profile.h5 || $(BIN)/prism profile --config configs/builtin.yaml --out $(RUN)/profile.h5
	test -f $(RUN)/partition.h5 || $(BIN)/prism partition $(RUN)/profile.h5 --config configs/builtin.yaml --out $(RUN)/partition.h5
	$(BIN)/python scripts/gate_ablation.py --profile $(RUN)/profile.h5 --partition $(RUN)/partition.h5 --out results/gate_ablation

compare-solvers: $(STAMP)
	mkdir -p $(RUN)
	test -f $(RUN)/profile.h5 || $(BIN)/prism profile --config configs/builtin.yaml --out $(RUN)/profile.h5
	$(BIN)/prism partition compare $(RUN)/profile.h5 --out results/partition_compare

# Retrain the built-in model exactly as shipped (about 2 hours on 2 CPU cores); see its card,
# prism_cli/data/builtin-model/README.md.
model: $(STAMP)
	$(BIN)/python scripts/train_builtin_model.py --out prism_cli/data/builtin-model --steps 2600 --stop-step 1622 --minutes 1000

gpu-check:
	bash scripts/gpu_check.sh results/gpu

lint: $(STAMP)
	$(BIN)/pip install --quiet "ruff==0.17.6"
	$(BIN)/ruff check prism_cli tests scripts

clean:
	rm -rf runs results/local .pytest_cache
