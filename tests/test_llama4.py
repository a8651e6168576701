"""Llama-4: its MoE blocks in transformers v5's protocol (prism_cli.models.llama4), checked against the
stock block, the profiler's per-token records against a stock forward pass, and the flat export against
the source model (in plain transformers and in prism's runtime).

The oracle is always transformers' own, unconverted Llama-4 code: a fresh model loaded without prism.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
import torch
from conftest import logits_of, original_logits, token_batch, write_random_partition
from transformers import AutoModelForCausalLM

import prism_cli
from prism_cli.data import load_text
from prism_cli.data.windows import token_windows
from prism_cli.export.builder import ExportSettings, export_model
from prism_cli.models.llama4 import convert_llama4
from prism_cli.models.loading import load_model
from prism_cli.models.tiny import build_tiny_model
from prism_cli.profiling.profiler import ProfileSettings, profile_model

WIDTH = 32  # the tiny model's expert width


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_tiny_model("llama4_text", tmp_path_factory.mktemp("llama4") / "source")


def _stock(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=True).eval()


def test_a_converted_block_computes_what_the_stock_block_does(source):
    stock, converted = _stock(source), _stock(source)
    assert convert_llama4(converted) == convert_llama4(converted) >= 1  # idempotent
    x = torch.randn(2, 9, stock.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for a, b in zip(stock.model.layers, converted.model.layers, strict=True):
        if not a.is_moe_layer:
            continue
        assert type(b.feed_forward).__name__ == "PrismLlama4TextMoe"
        with torch.inference_mode():
            (want, want_logits), (got, got_logits) = a.feed_forward(x), b.feed_forward(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_logits, want_logits)
    assert converted.state_dict().keys() == stock.state_dict().keys()


def test_profile_records_the_activations_of_each_tokens_scaled_input(source, tmp_path):
    """Rows, tokens and weights of the profile against a stock forward pass: expert e of token t sees
    ``s x`` with ``s`` the sigmoid of its router logit, and the recorded weight is ``s``."""
    settings = ProfileSettings(tokens=1024, seq_len=32, max_rows=256, row_dtype="float32")
    text, name = load_text(None, "calibration")
    loaded = load_model(str(source))
    path = tmp_path / "profile.h5"
    profile_model(loaded, text, name, settings, path)

    stock = _stock(source)
    seen: dict[int, dict[str, list[torch.Tensor]]] = {}
    handles = []
    for i, layer in enumerate(stock.model.layers):
        if not layer.is_moe_layer:
            continue
        store = seen.setdefault(i, {"x": [], "scores": []})
        handles.append(layer.feed_forward.register_forward_hook(
            lambda _m, args, _out, store=store: store["x"].append(args[0].reshape(-1, args[0].shape[-1]).detach())))
        handles.append(layer.feed_forward.router.register_forward_hook(
            lambda _m, _args, out, store=store: store["scores"].append(out[0].detach())))
    windows = token_windows(loaded.tokenizer, text, settings.seq_len, settings.tokens)
    with torch.inference_mode():
        for first in range(0, windows.shape[0], settings.batch_size):
            stock(input_ids=windows[first : first + settings.batch_size], use_cache=False)
    for h in handles:
        h.remove()
    checked = 0
    with h5py.File(path, "r") as h5:
        for index, store in seen.items():
            x, scores = torch.cat(store["x"]), torch.cat(store["scores"]).float()
            experts = stock.model.layers[index].feed_forward.experts
            for e in range(experts.num_experts):
                group = h5[f"layers/{index}/experts/{e}"]
                tokens = torch.from_numpy(group["fit_token"][()])
                rows = torch.from_numpy(group["fit_rows"][()])
                weights = torch.from_numpy(group["fit_weight"][()])
                if tokens.numel() == 0:
                    continue
                s = scores[tokens, e]
                assert bool((s > 0).all())  # every recorded token was routed to e
                torch.testing.assert_close(weights, s, rtol=1e-5, atol=1e-6)
                gate_up = experts.gate_up_proj[e].detach()  # [H, 2I], gate columns first
                scaled = x[tokens] * s[:, None]
                want = torch.nn.functional.silu(scaled @ gate_up[:, :WIDTH]) * (scaled @ gate_up[:, WIDTH:])
                torch.testing.assert_close(rows, want, rtol=1e-4, atol=1e-5)
                checked += 1
    assert checked >= 4


@pytest.mark.parametrize("gate", ["linear", "neurons"])
def test_the_flat_export_reproduces_the_source(source, tmp_path, gate):
    partition = write_random_partition(source, tmp_path / "part.h5")
    out = tmp_path / "export"
    export_model(str(source), partition, out, ExportSettings(gate=gate))
    ids = token_batch(seed=5)
    want = original_logits(source, ids)
    full = 8  # 2 experts of 4 sub-experts
    stock = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, trust_remote_code=True,
                                                 num_experts_per_tok=full).eval()
    assert type(stock.model.layers[0].feed_forward).__name__ == "Llama4TextMoe"  # transformers' own block
    elastic = prism_cli.load_elastic(str(out), operating_point=f"linear:{full}")
    for got in (logits_of(stock, ids), logits_of(elastic, ids)):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    for point in ("linear:1", "linear:3") + (("topk:2", "threshold:0.8") if gate == "neurons" else ()):
        prism_cli.set_operating_point(elastic, point)
        assert torch.isfinite(logits_of(elastic, ids)).all(), point
