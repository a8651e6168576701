"""The family matrix: every MoE model type of the installed transformers through profile -> partition ->
export, each export's measured exactness checked against whole-model outputs, refusals one line each.

The matrix itself (``prism_cli.evaluation.families``) records what ``prism export`` measured block by
block; the tests here check it independently, on the whole model: the linear export loaded by stock
transformers and the neurons export loaded by prism's runtime at the full operating point reproduce
the source model's logits, and every export runs at its smallest operating points.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prism_cli.evaluation.families import (
    EXACT_BOTH,
    EXACT_LINEAR,
    EXACT_NEURONS,
    NOT_BUILT,
    REFUSED,
    STATUSES,
    FamilyRow,
    run_matrix,
    write_matrix,
)
from prism_cli.models.tiny import moe_model_types

TOLERANCE = 1e-4  # max |difference| relative to max |logit|

#: The families the issue names, by model type, and the status each must reach.
TARGETS = {
    "olmoe": EXACT_BOTH,
    "qwen2_moe": EXACT_BOTH,
    "qwen3_moe": EXACT_BOTH,
    "qwen3_next": EXACT_BOTH,
    "qwen3_5_moe": EXACT_BOTH,
    "qwen3_5_moe_text": EXACT_BOTH,
    "mixtral": EXACT_BOTH,
    "deepseek_v2": EXACT_BOTH,
    "deepseek_v3": EXACT_NEURONS,  # group-limited routing scored by the sum of two experts (tiny: 1 of 2 groups)
    "glm4_moe": EXACT_NEURONS,  # the same router as DeepSeek-V3
    "phimoe": EXACT_NEURONS,  # sparsemixer routing
    "granitemoe": EXACT_BOTH,
    "ernie4_5_moe": EXACT_BOTH,
    "lfm2_moe": EXACT_BOTH,  # its block passes the router a correction bias (bound by the adapter)
    "minimax_m2": EXACT_BOTH,
    # Their experts' width field also sizes a shared MLP (Hunyuan) or the dense MLPs (Jamba): those are
    # rebuilt at the source width (prism_cli.models.source_sized).
    "hunyuan_v1_moe": EXACT_BOTH,
    "jamba": EXACT_BOTH,
    # Llama-4 scales each expert's input by its score; its blocks are converted to the v5 protocol.
    "llama4_text": EXACT_BOTH,
}
#: Expert layouts other than the standard one, which prism's grouped executor honours (both gates exact).
OTHER_LAYOUTS = {
    "gpt_oss": "transposed, interleaved gate/up, biases, clamped SwiGLU",
    "aria_text": "transposed experts",
    "minimax_m3_vl_text": "clamped SwiGLU (the module's own _apply_gate)",
}
#: Families whose experts no split can reproduce: refused, with why.
REFUSED_TARGETS = {
    "nemotron_h": "no gate projection",
    "ergo": "no gate projection",
}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> tuple[dict[str, FamilyRow], Path]:
    workdir = tmp_path_factory.mktemp("families")
    rows = run_matrix(workdir=workdir)
    write_matrix(rows, workdir / "families")
    return {row.model_type: row for row in rows}, workdir


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_every_moe_model_type_has_a_row(matrix) -> None:
    rows, workdir = matrix
    assert sorted(rows) == moe_model_types()
    for row in rows.values():
        assert row.status in STATUSES
        if row.status in (REFUSED, NOT_BUILT):
            assert row.reason and "\n" not in row.reason and "Traceback" not in row.reason, row
        if row.status in (EXACT_BOTH, EXACT_LINEAR):
            assert row.linear is not None and row.linear <= TOLERANCE, row
        if row.status in (EXACT_BOTH, EXACT_NEURONS):
            assert row.neurons is not None and row.neurons <= TOLERANCE, row
        if row.status in (EXACT_LINEAR, EXACT_NEURONS):
            assert row.reason, row  # the refused gate says why
    assert (workdir / "families.md").read_text().count("\n| ") == len(rows) + 1


@pytest.mark.parametrize("model_type", sorted(TARGETS))
def test_target_families_are_exact(matrix, model_type: str) -> None:
    row = matrix[0][model_type]
    assert row.status == TARGETS[model_type], row


@pytest.mark.parametrize("model_type", sorted(OTHER_LAYOUTS))
def test_neurons_gate_of_every_layout(matrix, model_type: str) -> None:
    assert matrix[0][model_type].status == EXACT_BOTH, matrix[0][model_type]


@pytest.mark.parametrize("model_type", sorted(REFUSED_TARGETS))
def test_families_prism_cannot_split_are_refused_with_the_reason(matrix, model_type: str) -> None:
    row = matrix[0][model_type]
    assert row.status == REFUSED and REFUSED_TARGETS[model_type] in row.reason, row


def test_whole_models_reproduce_the_source_at_the_full_point(matrix) -> None:
    """Independent of the export's own block-level check: whole-model logits, every exact family."""
    from prism_cli import load_elastic, set_operating_point

    rows, workdir = matrix
    checked = 0
    for model_type, row in sorted(rows.items()):
        if row.status not in (EXACT_BOTH, EXACT_LINEAR, EXACT_NEURONS):
            continue
        folder = workdir / model_type
        ids = _ids()
        ref = _logits(AutoModelForCausalLM.from_pretrained(str(folder / "source"), dtype=torch.float32).eval(), ids)
        if row.status in (EXACT_BOTH, EXACT_LINEAR):
            # trust_remote_code: an export that rebuilds a source-sized module ships its modeling file (Hunyuan, Jamba)
            flat = AutoModelForCausalLM.from_pretrained(str(folder / "linear"), dtype=torch.float32,
                                                        trust_remote_code=True).eval()
            assert _relative(_logits(flat, ids), ref) <= TOLERANCE, (model_type, "linear")
            checked += 1
        if row.status in (EXACT_BOTH, EXACT_NEURONS):
            model = load_elastic(str(folder / "neurons"))  # its default point: every sub-expert of the top-k
            assert _relative(_logits(model, ids), ref) <= TOLERANCE, (model_type, "neurons")
            # and the runtime runs at the smallest points of each gate
            for point in ("topk:1", "threshold:0.5") + (("linear:1",) if row.status == EXACT_BOTH else ()):
                set_operating_point(model, point)
                assert torch.isfinite(_logits(model, ids)).all(), (model_type, point)
            checked += 1
    assert checked >= 2 * len([t for t in TARGETS if TARGETS[t] == EXACT_BOTH])


BENCH = ("--batch", "2", "--seq-len", "16", "--tokens", "256", "--repeats", "1", "--warmup", "0", "--mode", "prefill")


@pytest.mark.slow
def test_bench_runs_on_every_exported_family(matrix, cli):
    """`prism bench` on every export the matrix wrote: the neurons export of each family where it is
    exact, else its linear export (run through prism's runtime)."""
    import json

    rows, workdir = matrix
    ran = []
    for model_type, row in sorted(rows.items()):
        if row.status in (EXACT_BOTH, EXACT_NEURONS):
            gate, points = "neurons", "topk:1;linear:1;threshold:0.8"
        elif row.status == EXACT_LINEAR:
            gate, points = "linear", "linear:1;linear:8"
        else:
            continue
        out = workdir / model_type / "bench"
        result = cli("bench", workdir / model_type / gate, "--points", points, *BENCH, "--out", out)
        assert result.code == 0, (model_type, result)
        data = json.loads((out / "bench.json").read_text())
        assert all(p["perplexity"] > 0 for p in data["points"]), model_type
        ran.append(model_type)
    assert set(TARGETS) <= set(ran)
