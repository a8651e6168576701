#!/usr/bin/env python3
"""One device call for prism's CUDA kernels: build, check, measure the device, time the MoE layer.

Run from the repository root on a CUDA machine (``scripts/gpu_check.sh`` wraps it):

    PYTHONPATH=. python scripts/gpu_check.py --out results/gpu

Needs torch, transformers, nvcc and ninja; pytest is optional (without it the correctness checks run
in-process). Steps, each recorded in ``<out>/gpu_check.json`` and summarised in ``<out>/gpu_check.md``:

1. build the kernels for this device and run ``prism_cli.cuda.self_check``;
2. correctness: ``pytest -m gpu tests/test_cuda.py`` (every op against the float32 reference on the
   real models' shapes, outputs poisoned);
3. the device's own ceilings: a 1 GiB device-to-device copy (bandwidth) and an 8192^3 bf16 matmul;
4. one MoE layer per model (OLMoE, Qwen3-30B-A3B, DeepSeek-V2-Lite, Mixtral; N = 4 sub-experts per
   expert, random bf16 weights in the flat sub-expert layout) at every operating point K = 1 .. N k,
   for decode batches of 1, 16 and 128 tokens and a prefill of 4096: prism's kernels against
   transformers' ``grouped_mm`` and ``eager`` experts implementations on the same weights.

Timing: each repeat first overwrites a 256 MiB buffer, so weights never come from L2 (and the
device is busy while the host enqueues the op), then CUDA events bracket the op; median and p90 over
the repeats. "graph" replays the op captured in a CUDA graph (device time only); "stream" launches
it from Python as a model would without graphs (host launch overhead included where the op is
host-bound). The eager implementation synchronises with the host and has no graph mode; at prefill
it is timed at K = N k only. A time budget keeps the whole run under 8 minutes on one H200.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prism_cli import cuda

N_SUB = 4
BATCHES = (1, 16, 128, 4096)
PREFILL = 4096
TARGETS = {
    "decode_bandwidth": 0.60,  # of the measured copy bandwidth, on the active weight bytes
    "prefill_matmul": 0.50,  # of the measured bf16 matmul rate
    "proportional_within": 0.15,  # latency proportional to K
    "speedup_vs_grouped_mm": 1.5,  # at decode batches 1 to 16
}
FLUSH_BYTES = 256 << 20
MEASURE_S = 0.04  # device time spent on one measurement (before clamping the repeats)
REPS = (5, 50)
EAGER_REPS = (3, 10)
ROOT = Path(__file__).resolve().parents[1]


class Budget:
    """Wall-clock deadline of the whole run."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ---------------------------------------------------------------------------------------------
# Timing.


def timed_runs(run: Callable[[], Any], flush: torch.Tensor, reps: int) -> list[float]:
    """Microseconds of ``reps`` runs, each after overwriting ``flush`` (L2 cold, device kept busy)."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e3 for start, end in events]


def captured(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured in a CUDA graph (after warm-up on a side stream); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(fn: Callable[[], Any], mode: str, flush: torch.Tensor, reps_range: tuple[int, int]) -> dict[str, Any]:
    """Median and p90 latency of ``fn`` in ``mode`` ("graph" or "stream"), repeats sized to MEASURE_S."""
    try:
        run = captured(fn) if mode == "graph" else fn
        run()  # warm-up (the graph was warmed up before its capture)
        one = timed_runs(run, flush, 1)[0]
        flush_us = timed_runs(lambda: None, flush, 1)[0]
        reps = int(min(max(MEASURE_S * 1e6 / (one + flush_us), reps_range[0]), reps_range[1]))
        samples = sorted(timed_runs(run, flush, reps))
    except Exception as exc:  # noqa: BLE001 - recorded: one failing baseline must not end the run
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"p50_us": statistics.median(samples), "p90_us": samples[int(0.9 * (len(samples) - 1))], "reps": reps}


def device_ceilings(flush: torch.Tensor) -> dict[str, float]:
    """The device's own ceilings: device-to-device copy bandwidth and bf16 matmul rate."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").fill_(7)
    dst = torch.empty_like(src)
    copy_us = statistics.median(timed_runs(lambda: dst.copy_(src), flush, 10)[2:])
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    mm_us = statistics.median(timed_runs(lambda: torch.mm(a, b, out=c), flush, 12)[2:])
    return {
        "copy_bytes": 2 * src.numel(),
        "copy_us": copy_us,
        "copy_GBps": 2 * src.numel() / copy_us / 1e3,  # read + write
        "matmul_n": n,
        "matmul_us": mm_us,
        "matmul_TFLOPs": 2 * n**3 / mm_us / 1e6,
    }


# ---------------------------------------------------------------------------------------------
# The layer and its baselines.


def transformers_experts(gate_up: torch.Tensor, down: torch.Tensor, implementation: str) -> torch.nn.Module:
    """transformers' OLMoE experts module over the flat sub-expert layout (G experts of width Is),
    sharing prism's weight tensors, dispatching to ``implementation`` ("grouped_mm" or "eager")."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    groups, two_width, hidden = gate_up.shape
    config = OlmoeConfig(
        hidden_size=hidden, intermediate_size=two_width // 2, num_experts=groups, num_experts_per_tok=1
    )
    config._experts_implementation = implementation
    with torch.device("meta"):
        module = OlmoeExperts(config)
    module.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    module.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return module.eval()


def layer_metrics(row: dict[str, Any], shape: dict[str, int], ceilings: dict[str, float]) -> None:
    """Achieved bandwidth (decode) or matmul rate (prefill) of prism's graph latency, and speedups."""
    hidden, width = shape["hidden"], shape["inter"] // N_SUB
    prism = row["prism"].get("graph", {}).get("p50_us")
    row["active_weight_bytes"] = row["unique_sub_experts"] * 3 * hidden * width * 2
    row["bytes"] = row["active_weight_bytes"] + 2 * row["tokens"] * hidden * 2  # weights + x in + out
    row["flops"] = 2 * 3 * hidden * width * row["tokens"] * row["K"]
    if prism:
        row["bandwidth_frac"] = row["bytes"] / prism / 1e3 / ceilings["copy_GBps"]
        row["matmul_frac"] = row["flops"] / prism / 1e6 / ceilings["matmul_TFLOPs"]
    for impl in ("grouped_mm", "eager"):
        for mode in ("graph", "stream"):
            theirs = row.get(impl, {}).get(mode, {}).get("p50_us")
            ours = row["prism"].get(mode, {}).get("p50_us")
            if theirs and ours:
                row.setdefault("speedup", {})[f"{impl}_{mode}"] = theirs / ours


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def bench_model(
    name: str, shape: dict[str, int], ceilings: dict[str, float], flush: torch.Tensor, budget: Budget, seconds: float
) -> dict[str, Any]:
    """Every operating point of one model's layer at every batch, prism against transformers."""
    stop = time.monotonic() + seconds
    hidden, width, experts, top_k = shape["hidden"], shape["inter"] // N_SUB, shape["experts"], shape["top_k"]
    groups, k_max = experts * N_SUB, N_SUB * shape["top_k"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = (torch.randn(groups, 2 * width, hidden, generator=gen, device="cuda") * hidden**-0.5).bfloat16()
    down = (torch.randn(groups, hidden, width, generator=gen, device="cuda") * width**-0.5).bfloat16()
    ops = cuda.get_ops("cuda")
    result: dict[str, Any] = {"shape": shape, "n_sub": N_SUB, "groups": groups, "width": width, "rows": []}
    baselines: dict[str, torch.nn.Module] = {}
    for impl in ("grouped_mm", "eager"):
        try:
            baselines[impl] = transformers_experts(gate_up, down, impl)
        except Exception as exc:  # noqa: BLE001 - recorded: a missing transformers implementation is a result
            result.setdefault("baseline_errors", {})[impl] = f"{type(exc).__name__}: {exc}"[:300]
    graphs_work = {"prism": True, **dict.fromkeys(baselines, True)}  # a failed capture is not retried
    for tokens in BATCHES:
        x = torch.randn(tokens, hidden, generator=gen, device="cuda").bfloat16()
        for active in range(1, k_max + 1):
            if time.monotonic() > stop or budget.left() < 20:
                result.setdefault("skipped", []).append({"tokens": tokens, "K": active, "why": "time budget"})
                continue
            indices, weights, _ = cuda.random_routing(tokens, experts, N_SUB, top_k, active, gen)
            weights = weights.bfloat16()
            row: dict[str, Any] = {"tokens": tokens, "K": active, "unique_sub_experts": indices.unique().numel()}
            calls = {"prism": lambda x=x, i=indices, w=weights: ops.experts_forward(x, gate_up, down, i, w)}
            calls |= {impl: (lambda m=module, x=x, i=indices, w=weights: m(x, i, w)) for impl, module in baselines.items()}
            for impl, call in calls.items():
                if impl == "eager" and tokens == PREFILL and active != k_max:
                    continue
                modes = ("graph", "stream") if impl != "eager" and graphs_work[impl] else ("stream",)
                reps = EAGER_REPS if impl == "eager" else REPS
                row[impl] = {mode: measure(call, mode, flush, reps) for mode in modes}
                graphs_work[impl] &= "error" not in row[impl].get("graph", {})
            if active in (1, k_max):  # the baselines compute the same layer: their outputs must agree
                ours = calls["prism"]()
                row["agreement_rel_err"] = {impl: rel_err(calls[impl](), ours) for impl in baselines if impl in row}
            layer_metrics(row, shape, ceilings)
            result["rows"].append(row)
        print(f"  {name} batch {tokens}: {time.monotonic() - stop + seconds:.0f} s", flush=True)
    baselines.clear()
    gate_up = down = None  # free the weights before the next model (the closures above are done)
    torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------
# Targets.


def proportionality(ks: list[float], lat: list[float]) -> dict[str, float]:
    """Fit latency = slope * K through the origin: max relative deviation; and the affine fit's
    intercept (the fixed cost) with its own max deviation."""
    slope = sum(k * t for k, t in zip(ks, lat, strict=True)) / sum(k * k for k in ks)
    n = len(ks)
    mean_k, mean_t = sum(ks) / n, sum(lat) / n
    var = sum((k - mean_k) ** 2 for k in ks)
    b = sum((k - mean_k) * (t - mean_t) for k, t in zip(ks, lat, strict=True)) / var if var else 0.0
    a = mean_t - b * mean_k
    return {
        "max_dev_proportional": max(abs(t / (slope * k) - 1) for k, t in zip(ks, lat, strict=True)),
        "affine_intercept_us": a,
        "affine_slope_us": b,
        "max_dev_affine": max(abs(t / (a + b * k) - 1) if a + b * k > 0 else float("inf") for k, t in zip(ks, lat, strict=True)),
    }


def summarise(model: dict[str, Any]) -> dict[str, Any]:
    """Per batch: each target of the issue, computed from prism's graph latencies."""
    summary: dict[str, Any] = {}
    for tokens in BATCHES:
        rows = [r for r in model["rows"] if r["tokens"] == tokens and r["prism"].get("graph", {}).get("p50_us")]
        if len(rows) < 2:
            continue
        lat = [r["prism"]["graph"]["p50_us"] for r in rows]
        s: dict[str, Any] = {
            "K": [r["K"] for r in rows],
            "vs_K": proportionality([r["K"] for r in rows], lat),
            "vs_unique_sub_experts": proportionality([r["unique_sub_experts"] for r in rows], lat),
        }
        s["proportional_pass"] = s["vs_K"]["max_dev_proportional"] <= TARGETS["proportional_within"]
        if tokens == PREFILL:
            fracs = [r["matmul_frac"] for r in rows]
            s["matmul_frac"] = {"min": min(fracs), "median": statistics.median(fracs), "max": max(fracs)}
            s["matmul_pass_share"] = sum(f >= TARGETS["prefill_matmul"] for f in fracs) / len(fracs)
        else:
            fracs = [r["bandwidth_frac"] for r in rows]
            s["bandwidth_frac"] = {"min": min(fracs), "median": statistics.median(fracs), "max": max(fracs)}
            s["bandwidth_pass_share"] = sum(f >= TARGETS["decode_bandwidth"] for f in fracs) / len(fracs)
        for key in ("grouped_mm_graph", "grouped_mm_stream", "eager_stream"):
            speedups = [r["speedup"][key] for r in rows if key in r.get("speedup", {})]
            if speedups:
                s[f"speedup_{key}"] = {"min": min(speedups), "median": statistics.median(speedups)}
        if tokens <= 16 and "speedup_grouped_mm_graph" in s:
            s["speedup_pass"] = s["speedup_grouped_mm_graph"]["min"] >= TARGETS["speedup_vs_grouped_mm"]
        summary[str(tokens)] = s
    return summary


# ---------------------------------------------------------------------------------------------
# Steps and report.


def run_tests(budget: Budget) -> dict[str, Any]:
    """The GPU tests of tests/test_cuda.py with pytest, else the same checks in-process (fewer)."""
    torch.cuda.empty_cache()
    if importlib.util.find_spec("pytest") is not None:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_cuda.py", "-q", "--noconftest"]
        cmd += ["-p", "no:cacheprovider"]
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                timeout=max(60.0, min(240.0, budget.left() - 150)),
            )
        except subprocess.TimeoutExpired as exc:
            return {"runner": "pytest", "passed": False, "summary": "timed out", "tail": str(exc.stdout)[-3000:]}
        lines = proc.stdout.strip().splitlines()
        return {"runner": "pytest", "passed": proc.returncode == 0, "summary": lines[-1] if lines else "",
                "tail": "\n".join(lines[-40:])}
    ops, failures, checked = cuda.get_ops("cuda"), [], 0
    for name, shape in cuda.MODEL_SHAPES.items():
        experts = min(shape["experts"], 4) if name.startswith("Mixtral") else shape["experts"]
        for tokens in (1, 7, 64, 4096):
            for active in sorted({1, N_SUB * shape["top_k"]}):
                case = cuda.random_case(shape["hidden"], shape["inter"] // N_SUB, experts, N_SUB, shape["top_k"],
                                        tokens, active, unused_slots=0.1, seed=tokens + active)
                errors = cuda.check_case(ops, case)
                checked += 1
                if any(err > cuda.TOLERANCE for err in errors.values()):
                    failures.append({"model": name, "tokens": tokens, "K": active, "errors": errors})
    return {"runner": "in-process", "passed": not failures, "summary": f"{checked} cases, {len(failures)} failed",
            "failures": failures}


def fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def lat(row: dict[str, Any], impl: str, mode: str) -> float | None:
    return row.get(impl, {}).get(mode, {}).get("p50_us")


def markdown(report: dict[str, Any]) -> str:
    env, ceil = report["environment"], report.get("ceilings", {})
    checks = report.get("self_check", {})
    errors = ", ".join(f"{op} {v['max_rel_err']:.1e}" for op, v in checks.get("ops", {}).items())
    tests = report.get("tests", {})
    out = [
        "# prism CUDA kernels: GPU check",
        "",
        f"Device {env.get('device')} (capability {env.get('capability')}), torch {env.get('torch')} "
        f"(CUDA {env.get('torch_cuda')}), transformers {env.get('transformers')}, {env.get('nvcc_version')}. "
        f"Run took {report.get('elapsed_s', 0):.0f} s; build {fmt(report.get('build_s'))} s.",
        "",
        f"- Self-check: {'passed' if checks.get('passed') else 'FAILED'} ({errors or checks.get('error')})",
        f"- Correctness ({tests.get('runner')}): {'passed' if tests.get('passed') else 'FAILED'}: "
        f"{tests.get('summary')}",
        f"- Ceilings: copy {fmt(ceil.get('copy_GBps'), '.0f')} GB/s (1 GiB device-to-device, read + write), "
        f"bf16 matmul {fmt(ceil.get('matmul_TFLOPs'), '.0f')} TFLOP/s (8192^3 torch.mm).",
        "",
        "Latencies are medians in microseconds. *graph*: CUDA-graph replay (device time); *stream*: launched "
        "from Python. Bandwidth counts the unique active sub-experts' weights plus x and the output; FLOPs "
        "count 2 x 3 H Is per (token, sub-expert) pair. Targets: decode >= 60 % of copy bandwidth, prefill "
        ">= 50 % of matmul rate, latency proportional to K within 15 %, >= 1.5x grouped_mm at batch 1-16.",
        "",
        "## Targets (prism, graph mode)",
        "",
        "| model | batch | bandwidth or matmul share (min / median / max) | share of K at target | "
        "dev. from latency ∝ K | fixed cost (affine fit) | speedup vs grouped_mm graph (min / median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, model in report.get("models", {}).items():
        for tokens, s in model.get("summary", {}).items():
            frac = s.get("bandwidth_frac") or s.get("matmul_frac")
            share = s.get("bandwidth_pass_share", s.get("matmul_pass_share"))
            sp = s.get("speedup_grouped_mm_graph", {})
            out.append(
                f"| {name} | {tokens} | {frac['min']:.0%} / {frac['median']:.0%} / {frac['max']:.0%} | {share:.0%} | "
                f"{s['vs_K']['max_dev_proportional']:.0%} | {s['vs_K']['affine_intercept_us']:.1f} us | "
                f"{fmt(sp.get('min'), '.2f')}x / {fmt(sp.get('median'), '.2f')}x |"
            )
    for name, model in report.get("models", {}).items():
        out += ["", f"## {name}", "", f"Shape {model['shape']}, N = {N_SUB}: {model['groups']} sub-experts of "
                f"width {model['width']}."]
        for key, err in model.get("baseline_errors", {}).items():
            out.append(f"- baseline {key} unavailable: {err}")
        if model.get("skipped"):
            out.append(f"- {len(model['skipped'])} points skipped (time budget).")
        for tokens in BATCHES:
            rows = [r for r in model["rows"] if r["tokens"] == tokens]
            if not rows:
                continue
            share = "matmul" if tokens == PREFILL else "copy BW"
            out += ["", f"### batch {tokens}", "",
                    f"| K | unique | prism graph (p90) | prism stream | grouped_mm graph | grouped_mm stream | "
                    f"eager stream | speedup vs grouped_mm graph | % {share} |",
                    "|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                p90 = r["prism"].get("graph", {}).get("p90_us")
                frac = r.get("matmul_frac") if tokens == PREFILL else r.get("bandwidth_frac")
                out.append(
                    f"| {r['K']} | {r['unique_sub_experts']} | {fmt(lat(r, 'prism', 'graph'))} ({fmt(p90)}) | "
                    f"{fmt(lat(r, 'prism', 'stream'))} | {fmt(lat(r, 'grouped_mm', 'graph'))} | "
                    f"{fmt(lat(r, 'grouped_mm', 'stream'))} | {fmt(lat(r, 'eager', 'stream'))} | "
                    f"{fmt(r.get('speedup', {}).get('grouped_mm_graph'), '.2f')} | {fmt(frac, '.0%')} |"
                )
    return "\n".join(out) + "\n"


def save(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu"), help="folder for gpu_check.json/.md")
    parser.add_argument("--budget-s", type=float, default=360.0, help="wall-clock budget of the whole run")
    parser.add_argument("--skip-tests", action="store_true", help="skip step 2 (pytest)")
    args = parser.parse_args()
    started = time.monotonic()
    budget = Budget(args.budget_s)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"environment": cuda.toolkit_info(), "targets": TARGETS, "models": {}}
    try:
        import transformers

        report["environment"]["transformers"] = transformers.__version__
    except ImportError:
        report["environment"]["transformers"] = None
    props = torch.cuda.get_device_properties(0)
    report["environment"] |= {"sms": props.multi_processor_count, "memory_GiB": props.total_memory / 2**30}

    print("building kernels ...", flush=True)
    t0 = time.monotonic()
    try:
        cuda.build(verbose=os.environ.get("PRISM_VERBOSE_BUILD") == "1")
    except Exception as exc:  # noqa: BLE001 - a failed build is the result: saved, then the run ends
        report["build_error"] = f"{type(exc).__name__}: {exc}"[-4000:]
        save(report, args.out)
        print(report["build_error"], file=sys.stderr)
        return 1
    report["build_s"] = time.monotonic() - t0
    report["environment"]["built"] = cuda.is_built()
    report["self_check"] = cuda.self_check("cuda")
    print(f"built in {report['build_s']:.0f} s; self-check passed: {report['self_check']['passed']}", flush=True)
    if not args.skip_tests:
        report["tests"] = run_tests(budget)
        print(f"tests: {report['tests']['summary']}", flush=True)
    save(report, args.out)

    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    with torch.inference_mode():
        report["ceilings"] = device_ceilings(flush)
        print(f"ceilings: {report['ceilings']}", flush=True)
        order = ["OLMoE-1B-7B", "Qwen3-30B-A3B", "DeepSeek-V2-Lite", "Mixtral-8x7B"]
        for i, name in enumerate(order):
            seconds = max(budget.left() - 15, 0) / (len(order) - i)
            print(f"{name}: {seconds:.0f} s allowed", flush=True)
            model = bench_model(name, cuda.MODEL_SHAPES[name], report["ceilings"], flush, budget, seconds)
            model["summary"] = summarise(model)
            report["models"][name] = model
            report["elapsed_s"] = time.monotonic() - started
            save(report, args.out)
    report["elapsed_s"] = time.monotonic() - started
    save(report, args.out)
    print(f"done in {report['elapsed_s']:.0f} s: {args.out / 'gpu_check.md'}", flush=True)
    ok = report["self_check"]["passed"] and report.get("tests", {}).get("passed", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
