"""The engine's reserved KV cache against the plain concatenation it replaces."""

from __future__ import annotations

import torch

from prism_cli.runtime.kvcache import ReservedLayer, cache_from_rows, reserved_cache


def _kv(rows: int, columns: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, 2, columns, 3, generator=generator), torch.randn(rows, 2, columns, 3, generator=generator)


def test_updates_equal_concatenation_across_reallocations():
    """Steps of 5 columns, then 1 at a time past two reallocations (reserve 2): every returned view equals
    ``torch.cat`` of everything written so far, and within the reserve a step writes into the same buffer."""
    g = torch.Generator().manual_seed(0)
    layer = ReservedLayer(reserve=2)
    written_k, written_v = [], []
    pointers = []
    for columns in [5, 1, 1, 1, 1, 1]:
        k, v = _kv(4, columns, g)
        written_k.append(k)
        written_v.append(v)
        keys, values = layer.update(k, v)
        assert torch.equal(keys, torch.cat(written_k, dim=-2)) and torch.equal(values, torch.cat(written_v, dim=-2))
        assert layer.get_seq_length() == sum(t.shape[-2] for t in written_k)
        pointers.append(keys.data_ptr())
    # capacity 5 + 2: steps 2 and 3 fit, step 4 reallocates (8 + 2), steps 5 and 6 fit again
    assert pointers[0] == pointers[1] == pointers[2] != pointers[3] == pointers[4] == pointers[5]


def test_rows_are_right_aligned_with_zero_padding_in_order():
    g = torch.Generator().manual_seed(1)
    a, b = _kv(2, 3, g), _kv(3, 5, g)
    cache = cache_from_rows([[a, b]], width=5)
    keys, values = cache.layers[0].keys, cache.layers[0].values
    pad = torch.zeros(2, 2, 2, 3)
    assert torch.equal(keys, torch.cat([torch.cat([pad, a[0]], dim=2), b[0]]))
    assert torch.equal(values, torch.cat([torch.cat([pad, a[1]], dim=2), b[1]]))
    # a decode step over the rebuilt cache appends in place, as over a prefill's
    step = _kv(5, 1, g)
    ptr = keys.data_ptr()
    keys2, _ = cache.layers[0].update(*step)
    assert keys2.data_ptr() == ptr and torch.equal(keys2[:, :, -1:], step[0])


def test_transformers_edits_start_a_new_buffer():
    """``batch_select_indices`` (transformers' own row selection) replaces the tensors: the next update must
    append to the selected rows, not to the old buffer."""
    g = torch.Generator().manual_seed(2)
    layer = ReservedLayer(reserve=4)
    first = _kv(3, 2, g)
    layer.update(*first)
    layer.batch_select_indices(torch.tensor([2, 0]))
    step = _kv(2, 1, g)
    keys, _ = layer.update(*step)
    assert torch.equal(keys, torch.cat([first[0][[2, 0]], step[0]], dim=-2))


def test_a_prefill_cache_reserves_the_plain_layers_only(tiny_export):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_export)
    cache = reserved_cache(config)
    assert cache.layers and all(isinstance(layer, ReservedLayer) for layer in cache.layers)


def test_the_engine_decodes_in_place_and_copies_only_when_rows_change(served):
    """Through the serving executor: decode steps write into the prefill's buffers (no copy of the cache),
    and the cache after a row leaves and another joins holds exactly the rows it should."""
    from prism_cli.serving.engine import Batch
    from prism_cli.serving.executor import ModelExecutor
    from prism_cli.serving.requests import Request, SamplingParams

    executor = ModelExecutor(served)
    full = served.space.full()
    requests = [Request(ids, SamplingParams(temperature=0.0), full, 0.0) for ids in ([5, 6, 7, 8], [9, 10])]
    kv, _, _ = executor.prefill(requests, [full] * 2)
    batch = Batch(requests, kv)
    layer = kv.cache.layers[0]
    assert isinstance(layer, ReservedLayer)
    before = layer.keys.data_ptr()
    prompt_keys = layer.keys.clone()
    for _ in range(3):
        executor.decode(batch, [full] * 2)
    after = batch.kv.cache.layers[0]
    assert after.keys.data_ptr() == before and after.get_seq_length() == 4 + 3
    assert torch.equal(after.keys[:, :, :4], prompt_keys)  # the prompt's columns were not moved
    executor.keep(batch, [1])
    kept = batch.kv.cache.layers[0]
    # row 1 was padded by two columns, which were cut off with the row that needed them
    assert isinstance(kept, ReservedLayer) and kept.get_seq_length() == 2 + 3
    assert torch.equal(kept.keys, after.keys[1:, :, 2:])


def test_crop_keeps_the_buffer_and_the_next_step_overwrites_the_cropped_column():
    """The bench's rewind (``crop(-1)`` after each timed decode step): the buffer stays, and the next step's
    column replaces the cropped one: the keys equal the prompt's followed by the new step's."""
    g = torch.Generator().manual_seed(3)
    layer = ReservedLayer(reserve=4)
    prompt = _kv(2, 6, g)
    layer.update(*prompt)
    ptr = layer.keys.data_ptr()
    for _ in range(10):  # more steps than the reserve: a crop gives each step's column back
        step = _kv(2, 1, g)
        keys, values = layer.update(*step)
        assert keys.data_ptr() == ptr
        assert torch.equal(keys, torch.cat([prompt[0], step[0]], dim=-2))
        assert torch.equal(values, torch.cat([prompt[1], step[1]], dim=-2))
        layer.crop(-1)
        assert layer.get_seq_length() == 6
