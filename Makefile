# prism: the two set-up commands are `make demo` (main job on the built-in model) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    := runs/demo
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench-executors executor-bounds executor-bounds-n8 serving-export-n8 bench-decode-n8 profile-moe bench-allocator test-all test-slow tables tables-n8 bench-stability bench-stability-n8 bench-profile bench-partition bench-fingerprint compare-solvers gate-ablation model gpu-check lint clean serving-export cost-model schedule-sweep schedule-high load-test families down-bias tune-gate tune-gate-n8 bench-scale plan-costs offload-builtin offload-deepseek offload bench-settle bench-kv-cache bench-router-modes decode-bound runtime-memory bench-decision

# torch is pinned to the CPU build in the same pip command, so pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on the built-in model and data: profile -> partition -> export -> bench,
# with the settings of configs/builtin.yaml (bench at batch 8 only); ends with the Pareto table (runs/demo/bench/).
demo: executor-bounds
	mkdir -p $(RUN)
	$(BIN)/prism profile --config configs/builtin.yaml --out $(RUN)/profile.h5
	$(BIN)/prism partition $(RUN)/profile.h5 --config configs/builtin.yaml --out $(RUN)/partition.h5
	$(BIN)/prism export builtin $(RUN)/partition.h5 --config configs/builtin.yaml --out $(RUN)/export --force
	$(BIN)/prism rank-layers $(RUN)/export --config configs/builtin.yaml
	$(BIN)/prism bench $(RUN)/export --config configs/builtin.yaml --batch 8 --min-quality 45 --out $(RUN)/bench

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# Regenerate the committed operating-point tables (tables/builtin/, N = 4; tables/builtin-n8/, N = 8).
# Timing wants a quiet machine: every point is timed side by side with the original in one run.
tables: executor-bounds
	$(BIN)/prism tables --config configs/builtin.yaml --out tables

tables-n8: executor-bounds executor-bounds-n8
	$(BIN)/prism tables --config configs/builtin-n8.yaml --out tables

# The built-in table's timing three times from its committed partition: the count of each run.
bench-stability: executor-bounds
	$(BIN)/python -m prism_cli.pipeline.stability --config configs/builtin.yaml --runs 3 --out results/bench_stability

# The same at N = 8, from tables/builtin-n8's committed partition.
bench-stability-n8: executor-bounds executor-bounds-n8
	$(BIN)/python -m prism_cli.pipeline.stability --config configs/builtin-n8.yaml --runs 3 --out results/bench_stability_n8

# Benchmarks that write their numbers to files under results/.
bench-profile: $(STAMP)
	$(BIN)/python -m prism_cli.profiling.benchmark --out results/bench_profile.json

# Writes an 8 GB synthetic checkpoint to the temp folder (removed afterwards).
bench-fingerprint: $(STAMP)
	$(BIN)/python -m prism_cli.models.fingerprint_benchmark --size-gb 8 --out results/bench_fingerprint

bench-partition: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python -m prism_cli.solvers.benchmark --out results/bench_partition.json

# Every MoE family of the installed transformers through profile -> partition -> export (both gates),
# each export's exactness measured: results/families.{md,csv,json} (a few minutes on 2 cores).
families: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m prism_cli.evaluation.families --out results/families

# How sub-experts carry a down_proj bias (GPT-OSS): perplexity at small K -> results/down_bias.{md,csv,json}
# (trains a small GPT-OSS first; about 15 min on 2 cores).
down-bias: $(STAMP)
	$(BIN)/python scripts/down_bias.py --out results/down_bias

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

# One MoE layer's experts call under each executor, by tokens per call (bounds of runtime/grouped_mm.py).
# Prefill step time under glibc's default allocator and prism's reuse setting (prism_cli/allocator.py).
bench-allocator: $(STAMP)
	test -f runs/builtin/export/config.json || $(BIN)/prism export builtin tables/builtin/partition.h5 --gate neurons --out runs/builtin/export --force
	$(BIN)/python scripts/bench_allocator.py --export runs/builtin/export --out results/allocator

# Times the experts executors on this machine and saves the size bounds the runtime reads (runtime/bounds.py).
bench-executors: serving-export serving-export-n8
	$(BIN)/python scripts/bench_executors.py --export $(SERVE)/export --save-bounds --out results/executors
	$(BIN)/python scripts/bench_executors.py --export $(SERVE)/export-n8 --points 4,8,12,16 --save-bounds --out results/executors-n8

# The same measurement, only where this machine has no bounds yet for the export's sub-expert width
# (written under runs/, not results/); timing targets depend on it so that they run under this machine's bounds.
executor-bounds: serving-export
	$(BIN)/python scripts/bench_executors.py --export $(SERVE)/export --if-missing --save-bounds --out runs/executors

executor-bounds-n8: serving-export-n8
	$(BIN)/python scripts/bench_executors.py --export $(SERVE)/export-n8 --points 4,8,12,16 --if-missing --save-bounds --out runs/executors-n8

gate-ablation: $(STAMP)
	mkdir -p $(RUN)
	test -f $(RUN)/profile.h5 || $(BIN)/prism profile --config configs/builtin.yaml --out $(RUN)/profile.h5
	$(BIN)/python scripts/gate_ablation.py --profile $(RUN)/profile.h5 --partition tables/builtin/partition.h5 --out results/gate_ablation
	$(BIN)/python scripts/gate_ablation.py --profile $(RUN)/profile.h5 --partition tables/builtin-n8/partition.h5 --settings 1:mass,2:coact,2:mass,4:mass,8:mass --points 2,4,8 --out results/gate_ablation_n8

compare-solvers: $(STAMP)
	mkdir -p $(RUN)
	test -f $(RUN)/profile.h5 || $(BIN)/prism profile --config configs/builtin.yaml --out $(RUN)/profile.h5
	$(BIN)/prism partition compare $(RUN)/profile.h5 --out results/partition_compare

# Router-only fine-tuning of the built-in export (SPEC 3.4b, `prism tune-gate`, settings in configs/builtin.yaml):
# the two K schedules, distillation, and the mass-probe initialisation at three learning rates and three weights,
# each compared on validation text (results/tune_gate.*; the lowest geometric mean over K gives prism tune-gate's
# defaults). No run wins at every K, so `prism select-routers` keeps, at each K, the router of lowest validation
# perplexity among all of them (results/tune_gate_bank.*), and that export is benchmarked with the untuned export's
# linear points into tables/tuned/. Finished runs are kept (delete runs/tune/ to start over); an interrupted run
# continues from its checkpoint.
TUNE := runs/tune
# $(call TUNE_IN,folder,config,run,options): one tune-gate run of folder/export into folder/run (kept when done).
TUNE_IN = test -d $(1)/$(3) || $(BIN)/prism tune-gate $(1)/export --config $(2) --out $(1)/$(3) $(4) \
	$$(test -f $(1)/$(3).tune-checkpoint.pt && echo --resume)
TUNE_RUN = $(call TUNE_IN,$(TUNE),configs/builtin.yaml,$(1),$(2))
TUNE_RUNS := linear uniform distill probe probe-1e-4 probe-3e-5 probe-a05 probe-a025
LINEAR_POINTS := linear:1;linear:2;linear:3;linear:4;linear:5;linear:6;linear:7;linear:8
# The tuned table is about quality at each K; its timing (for the counts) at batch 8 only, 30 repeats at most.
TUNE_BENCH := --batch 8 --max-repeats 30
tune-gate: $(STAMP)
	mkdir -p $(TUNE)
	test -d $(TUNE)/export || $(BIN)/prism export builtin tables/builtin/partition.h5 --config configs/builtin.yaml --out $(TUNE)/export
	$(call TUNE_RUN,linear,--schedule linear --init copies --lr 1e-3)
	$(call TUNE_RUN,uniform,--schedule uniform --init copies --lr 1e-3)
	$(call TUNE_RUN,distill,--distill 1 --init copies --lr 1e-3)
	$(call TUNE_RUN,probe,--init probe --init-alpha 1 --lr 3e-4)
	$(call TUNE_RUN,probe-1e-4,--init probe --init-alpha 1 --lr 1e-4)
	$(call TUNE_RUN,probe-3e-5,--init probe --init-alpha 1 --lr 3e-5)
	$(call TUNE_RUN,probe-a05,--init probe --init-alpha 0.5 --lr 3e-5)
	$(call TUNE_RUN,probe-a025,--init probe --init-alpha 0.25 --lr 3e-5)
	$(BIN)/python -m prism_cli.tuning.benchmark validate --run untuned=$(TUNE)/export \
		$(foreach r,$(TUNE_RUNS),--run $(r)=$(TUNE)/$(r)) --out results/tune_gate --winner $(TUNE)/winner
	$(BIN)/prism select-routers untuned=$(TUNE)/export $(foreach r,$(TUNE_RUNS),$(TUNE)/$(r)) --out $(TUNE)/bank --force
	for ext in md csv json; do cp $(TUNE)/bank/prism/router_bank.$$ext results/tune_gate_bank.$$ext; done
	$(BIN)/prism bench $(TUNE)/export --config configs/builtin.yaml $(TUNE_BENCH) --points "$(LINEAR_POINTS)" --out $(TUNE)/bench-untuned
	$(BIN)/prism bench $(TUNE)/bank --config configs/builtin.yaml $(TUNE_BENCH) --out $(TUNE)/bench-bank
	$(BIN)/python -m prism_cli.tuning.benchmark table --tuned-bench $(TUNE)/bench-bank/bench.json \
		--untuned-bench $(TUNE)/bench-untuned/bench.json --out tables/tuned
	cp $(TUNE)/bench-bank/bench.json tables/tuned/bench_tuned.json
	cp $(TUNE)/bench-untuned/bench.json tables/tuned/bench_untuned.json
	cp $(TUNE)/bench-bank/bench.png tables/tuned/frontier.png

# A tuned router's linear gate in its two modes (ranked: top-(K+1), no sort; rule: two sorts) on the bank above.
bench-router-modes: $(STAMP)
	test -d $(TUNE)/bank || $(MAKE) tune-gate
	$(BIN)/python scripts/bench_router_modes.py --export $(TUNE)/bank --out results/router_modes

# The same at N = 8 (configs/builtin-n8.yaml), with the three runs the N = 4 bank chose from: is the gate's quality
# at small K what limits the N = 8 count? -> results/tune_gate_bank_n8.*, tables/tuned-n8/ (about 25 minutes).
TUNE8 := runs/tune-n8
LINEAR_POINTS_N8 := linear:1;linear:2;linear:3;linear:4;linear:5;linear:6;linear:7;linear:8;linear:9;linear:10;linear:11;linear:12;linear:13;linear:14;linear:15;linear:16
tune-gate-n8: $(STAMP)
	mkdir -p $(TUNE8)
	test -d $(TUNE8)/export || $(BIN)/prism export builtin tables/builtin-n8/partition.h5 --config configs/builtin-n8.yaml --out $(TUNE8)/export
	$(call TUNE_IN,$(TUNE8),configs/builtin-n8.yaml,probe-3e-5,--init probe --init-alpha 1 --lr 3e-5)
	$(call TUNE_IN,$(TUNE8),configs/builtin-n8.yaml,probe-a05,--init probe --init-alpha 0.5 --lr 3e-5)
	$(call TUNE_IN,$(TUNE8),configs/builtin-n8.yaml,probe-a025,--init probe --init-alpha 0.25 --lr 3e-5)
	$(BIN)/prism select-routers untuned=$(TUNE8)/export $(TUNE8)/probe-3e-5 $(TUNE8)/probe-a05 $(TUNE8)/probe-a025 --out $(TUNE8)/bank --force
	for ext in md csv json; do cp $(TUNE8)/bank/prism/router_bank.$$ext results/tune_gate_bank_n8.$$ext; done
	$(BIN)/prism bench $(TUNE8)/export --config configs/builtin-n8.yaml $(TUNE_BENCH) --points "$(LINEAR_POINTS_N8)" --out $(TUNE8)/bench-untuned
	$(BIN)/prism bench $(TUNE8)/bank --config configs/builtin-n8.yaml $(TUNE_BENCH) --out $(TUNE8)/bench-bank
	$(BIN)/python -m prism_cli.tuning.benchmark table --tuned-bench $(TUNE8)/bench-bank/bench.json \
		--untuned-bench $(TUNE8)/bench-untuned/bench.json --out tables/tuned-n8
	cp $(TUNE8)/bench-bank/bench.json tables/tuned-n8/bench_tuned.json
	cp $(TUNE8)/bench-untuned/bench.json tables/tuned-n8/bench_untuned.json
	cp $(TUNE8)/bench-bank/bench.png tables/tuned-n8/frontier.png

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

# The online half (issue 16) on the built-in model: export, cost model, policy sweeps, load test.
SERVE := runs/serving
serving-export: $(STAMP)
	mkdir -p $(SERVE)
	test -f $(SERVE)/export/config.json || $(BIN)/prism export builtin tables/builtin/partition.h5 --gate neurons --out $(SERVE)/export --force

# The N = 8 export of the committed partition (sub-experts of 64 neurons): its executor bounds and decode timing.
serving-export-n8: $(STAMP)
	mkdir -p $(SERVE)
	test -f $(SERVE)/export-n8/config.json || $(BIN)/prism export builtin tables/builtin-n8/partition.h5 --gate neurons --out $(SERVE)/export-n8 --force

POINTS := linear:2;linear:4;linear:6;linear:8;topk:4
cost-model: serving-export executor-bounds
	$(BIN)/prism bench $(SERVE)/export --mode decode --batch 1,8,16,32 --seq-len 128 --tokens 4096 --repeats 8 --warmup 2 --points '$(POINTS)' --out $(SERVE)/bench-decode
	$(BIN)/prism bench $(SERVE)/export --mode prefill --batch 1,4,16 --seq-len 64 --tokens 2048 --repeats 5 --warmup 1 --points '$(POINTS)' --out $(SERVE)/bench-prefill
	$(BIN)/prism schedule cost-model $(SERVE)/export --decode $(SERVE)/bench-decode --prefill $(SERVE)/bench-prefill --out results/serving_cost_model.json
	cp $(SERVE)/bench-decode/bench.json results/serving_bench_decode.json
	cp $(SERVE)/bench-decode/bench.md results/serving_bench_decode.md
	cp $(SERVE)/bench-prefill/bench.json results/serving_bench_prefill.json

# How many steps a model needs after the other ran before its steps take their steady time (bench's --settle default).
bench-settle: serving-export executor-bounds
	$(BIN)/python scripts/bench_settle.py --export $(SERVE)/export --out results/bench_settle

# The engine's decode step over its reserved KV cache against the concatenating cache it replaced, side by side.
bench-kv-cache: serving-export executor-bounds
	$(BIN)/python scripts/bench_kv_cache.py --export $(SERVE)/export --out results/kv_cache

# Decode steps of the N = 8 export (sub-experts of 64 neurons) against the original, side by side.
bench-decode-n8: executor-bounds-n8
	$(BIN)/prism bench $(SERVE)/export-n8 --mode decode --batch 1,8,32 --seq-len 128 --tokens 4096 --repeats 8 --warmup 2 --points 'linear:4;linear:8;linear:12;linear:16' --out $(SERVE)/bench-decode-n8
	cp $(SERVE)/bench-decode-n8/bench.json results/bench_decode_n8.json
	cp $(SERVE)/bench-decode-n8/bench.md results/bench_decode_n8.md

# Where an MoE layer's time goes: the training-free gate's parts, and every block against the original's (N = 8).
profile-moe: serving-export serving-export-n8 executor-bounds executor-bounds-n8
	$(BIN)/python scripts/profile_moe_layers.py --out results/moe_layer_profile

schedule-sweep: serving-export
	$(BIN)/prism schedule sweep $(SERVE)/export --cost-model results/serving_cost_model.json --sim --duration 300 --out results/schedule_sweep_sim
	$(BIN)/prism schedule sweep $(SERVE)/export --cost-model results/serving_cost_model.json --loads high --duration 60 --out results/schedule_sweep_real

# What any policy could gain over FIFO on the original with every request at its own floor: measured steps and
# ideal elasticity, from make cost-model's decode bench (no timing of its own).
# What an elastic model holds on the CPU against its source model, after every kind of point ran.
runtime-memory: serving-export
	$(BIN)/python scripts/runtime_memory.py --export $(SERVE)/export --out results/runtime_memory

decode-bound: $(STAMP)
	$(BIN)/python scripts/decode_bound.py --bench results/serving_bench_decode.json --out results/decode_bound

# One scheduling decision of every policy, warm and right after a decode step, against the decode step (high load).
bench-decision: serving-export executor-bounds
	$(BIN)/python scripts/bench_decision.py --export $(SERVE)/export --cost-model results/serving_cost_model.json --out results/decision_time

# The real engine's high-load sweep alone, written apart: three rounds of every policy in alternating order
# (about 30 minutes), the gain taken round by round against the same round's baseline.
schedule-high: serving-export
	$(BIN)/prism schedule sweep $(SERVE)/export --cost-model results/serving_cost_model.json --loads high --duration 60 --rounds 3 --out results/schedule_sweep_real_repeat

load-test: serving-export
	cp results/serving_cost_model.json $(SERVE)/export/prism/cost_model.json
	$(BIN)/python -m prism_cli.serving.loadtest $(SERVE)/export --duration 60 --out results/load_test

gpu-check:
	bash scripts/gpu_check.sh results/gpu

lint: $(STAMP)
	$(BIN)/pip install --quiet "ruff==0.17.6"
	$(BIN)/ruff check prism_cli tests scripts

clean:
	rm -rf runs results/local .pytest_cache
