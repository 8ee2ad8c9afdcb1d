"""pack_weights_: every CPU weight moves into one block on a 2 MiB boundary, with the same
values, types, shapes and requires_grad; shared tensors stay shared; outputs are unchanged."""

from __future__ import annotations

import torch
from torch import nn

from flextron.model.quantization import quantize_int8_
from flextron.model.weight_block import ALIGNMENT, HUGE_PAGE, huge_page_block, pack_weights_


def storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}


def test_huge_page_block_starts_on_a_huge_page_and_is_zeroed():
    block = huge_page_block(3 * HUGE_PAGE + 5)
    assert block.data_ptr() % HUGE_PAGE == 0 and block.numel() == 3 * HUGE_PAGE + 5
    assert block.dtype == torch.uint8 and not block.any()
    block[-1] = 7  # writable
    assert int(block[-1]) == 7


def test_model_outputs_are_unchanged_and_weights_share_one_block(tiny_flextron):
    model = tiny_flextron(seed=2).eval()
    ids = torch.randint(3, 300, (2, 7))
    arch = model.arch_for_budget(0.5)
    names = {name: (p.dtype, p.shape, p.requires_grad) for name, p in model.named_parameters()}
    with torch.no_grad():
        before = model(ids, arch)
        pack_weights_(model)
        after = model(ids, arch)
    assert torch.equal(before, after)
    assert {name: (p.dtype, p.shape, p.requires_grad) for name, p in model.named_parameters()} == names
    assert len(storages(model)) == 1
    assert all(p.data_ptr() % ALIGNMENT == 0 and p.is_contiguous() for p in model.parameters())
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_int8_buffers_move_too_and_decode_matches(tiny_flextron):
    model = quantize_int8_(tiny_flextron(seed=3)).eval()
    ids = torch.randint(3, 300, (1, 6))
    with torch.no_grad():
        cache = model.new_kv_cache(1, 8)
        before = [model(ids, kv_cache=cache), model(ids[:, :1], kv_cache=cache)]
        pack_weights_(model)
        cache = model.new_kv_cache(1, 8)
        after = [model(ids, kv_cache=cache), model(ids[:, :1], kv_cache=cache)]
    for ours, theirs in zip(after, before, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert len(storages(model)) == 1


def test_a_shared_tensor_stays_shared():
    shared = nn.Parameter(torch.randn(4, 3))
    first, second = nn.Linear(3, 4, bias=False), nn.Linear(3, 4, bias=False)
    first.weight = second.weight = shared
    model = nn.Sequential(first, second)
    pack_weights_(model)
    assert model[0].weight is model[1].weight
    torch.testing.assert_close(model[0].weight, shared, rtol=0, atol=0)
