# prism: the two set-up commands are `make demo` (main job on the built-in model) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    := runs/demo
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-all test-slow tables bench-profile bench-partition compare-solvers gate-ablation offload-builtin offload-deepseek offload model gpu-check lint clean

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

gate-ablation: $(STAMP)
	mkdir -p $(RUN)
	test -f $(RUN)/profile.h5 || $(BIN)/prism profile --config configs/builtin.yaml --out $(RUN)/profile.h5
	test -f $(RUN)/partition.h5 || $(BIN)/prism partition $(RUN)/profile.h5 --config configs/builtin.yaml --out $(RUN)/partition.h5
	$(BIN)/python scripts/gate_ablation.py --profile $(RUN)/profile.h5 --partition $(RUN)/partition.h5 --out results/gate_ablation

compare-solvers: $(STAMP)
	mkdir -p $(RUN)
	test -f $(RUN)/profile.h5 || $(BIN)/prism profile --config configs/builtin.yaml --out $(RUN)/profile.h5
	$(BIN)/prism partition compare $(RUN)/profile.h5 --out results/partition_compare

# Offloading (SPEC 4.3): sub-experts against whole experts at the same budget and quality -> results/offload/.
OFFLOAD_EXPORT := runs/offload/export
OFFLOAD_POLICIES := lru,lfu,prefetch
$(OFFLOAD_EXPORT): $(STAMP)
	mkdir -p runs/offload
	$(BIN)/prism export builtin tables/builtin/partition.h5 --gate neurons --out $(OFFLOAD_EXPORT) --force

# The built-in model at the cached share of DeepSeek-V2-Lite's 16 GB and 24 GB: live (compute measured on
# this CPU, simulated link) and replayed with a modelled GPU's compute (its own recorded routing).
offload-builtin: $(OFFLOAD_EXPORT)
	$(BIN)/prism offload-bench $(OFFLOAD_EXPORT) --device-memory 16GB@deepseek-v2-lite,24GB@deepseek-v2-lite \
		--points topk:4,linear:4,topk:5,topk:6,threshold:0.9 --policy $(OFFLOAD_POLICIES) --reserve 8% \
		--out results/offload/builtin-live
	$(BIN)/prism offload-bench $(OFFLOAD_EXPORT) --shape source --compute gpu \
		--device-memory 16GB@deepseek-v2-lite,24GB@deepseek-v2-lite --points topk:4,linear:4,topk:5,topk:6 \
		--policy $(OFFLOAD_POLICIES) --pin 0,0.25 --trace-tokens 8192 --out results/offload/builtin-gpu-model

# DeepSeek-V2-Lite's shapes, 16 GB and 24 GB: routing recorded from the built-in model (mapped) or a
# load-balanced routing calibrated on it; compute modelled (gpu) or measured on this CPU.
DSV2_POINTS := topk:24,topk:20,topk:17,topk:13,linear:17
offload-deepseek: $(OFFLOAD_EXPORT)
	for routing in trace balanced; do \
		$(BIN)/prism offload-bench $(OFFLOAD_EXPORT) --shape deepseek-v2-lite --routing $$routing --compute gpu \
			--device-memory 16GB,24GB --points $(DSV2_POINTS) --policy $(OFFLOAD_POLICIES) --pin 0,0.25 \
			--trace-tokens 1536 --out results/offload/deepseek-v2-lite-$$routing || exit $$?; \
	done
	$(BIN)/prism offload-bench $(OFFLOAD_EXPORT) --shape deepseek-v2-lite --routing balanced --compute cpu \
		--device-memory 16GB,24GB --points $(DSV2_POINTS) --policy lru --trace-tokens 1536 \
		--out results/offload/deepseek-v2-lite-balanced-cpu

offload: offload-builtin offload-deepseek

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
