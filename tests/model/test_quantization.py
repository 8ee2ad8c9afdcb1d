"""Weight-only int8 (flextron.model.quantization): the int8 model computes exactly the sub-network of
its dequantized weights at every budget, stays close to fp32, and refuses what it cannot do."""

from __future__ import annotations

import copy

import pytest
import torch

from flextron.eval.generation import stream_tokens
from flextron.model.checkpoint import save_pretrained
from flextron.model.config import ArchConfig
from flextron.model.mixed_widths import ForcedSession
from flextron.model.quantization import quantize_int8_, quantize_rows, row_scales


@pytest.fixture(scope="module")
def models(tiny_flextron, int8_pair):
    """(fp32 model, its int8 copy, the fp32 model holding the int8 model's dequantized weights)."""
    model = tiny_flextron(kv_heads=2)
    return (model, *int8_pair(model))


ARCHS = {
    "full": lambda model: model.full_arch(),
    "budget 0.5": lambda model: model.arch_for_budget(0.5),
    "per-layer, odd widths": lambda _: ArchConfig((37, 101), (4, 2)),
}


def test_row_scales_are_fp16_and_values_use_the_full_int8_range():
    weight = torch.randn(6, 50) * torch.logspace(-3, 2, 6)[:, None]
    weight[3] = 0
    scale = row_scales(weight)
    assert torch.equal(scale, scale.half().float()) and scale[3] == 1
    values = quantize_rows(weight, scale)
    assert values.dtype == torch.int8 and values.abs().max() == 127 and not values[3].any()
    # Round to nearest: within half a step of the weight (plus the fp16 rounding of the scale).
    assert ((values.float() * scale[:, None] - weight).abs() <= 0.51 * scale[:, None]).all()


def dequantized_twin(models):
    """The float model holding the int8 model's dequantized weights, its head too (the int8
    head's values), and the float embedding."""
    model, int8, dequantized = models
    head = int8.int8_head
    twin = copy.deepcopy(dequantized)
    twin.embed_tokens.weight.data = model.embed_tokens.weight.detach().clone()
    twin.int8_head = None
    twin.logits = lambda hidden: torch.nn.functional.linear(
        twin.norm(hidden), head.qweight.float() * head.weight_scale[:, None]
    )
    return twin


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_every_sub_network_is_the_dequantized_one(models, assert_logits_close, monkeypatch, arch_name):
    """Prefill and decode at any budget compute exactly what the float model holding the
    dequantized weights computes (its head too: the int8 head's values): every prefix of an
    int8 row keeps the full row's scale, so one quantization serves every budget.  Decode on the
    kernels' float path: the VNNI path's int16 rounding of x is bounded in the op's tests."""
    monkeypatch.setenv("FLEXTRON_INT8_DOT", "portable")
    model, int8, _ = models
    twin = dequantized_twin(models)
    arch = ARCHS[arch_name](model)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_logits_close(int8(ids, arch), twin(ids, arch))
        caches = [m.new_kv_cache(2, 16) for m in (int8, twin)]
        for m, cache in zip((int8, twin), caches, strict=True):
            m(ids[:, :10], arch, cache)
        assert_logits_close(int8(ids[:, 10:], arch, caches[0]), twin(ids[:, 10:], arch, caches[1]))


def test_int8_stays_close_to_fp32_and_generates_the_same_first_tokens(models):
    """The logits of the int8 model stay within 3% of the fp32 logits' scale on the tiny model
    (random weights, so a harsher test than a trained model), and greedy decoding agrees on the
    first 4 tokens."""
    model, int8, _ = models
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = int8(ids), model(ids)
    assert (ours - theirs).abs().max() <= 0.03 * theirs.abs().max()
    prompt = ids[0, :8]
    first = [list(stream_tokens(m, prompt, max_new_tokens=4)) for m in (int8, model)]
    assert first[0] == first[1]


def test_int8_model_refuses_saving_and_quantizing_twice(models, tmp_path):
    _, int8, _ = models
    with pytest.raises(ValueError, match="int8 model is for inference"):
        save_pretrained(int8, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="already int8"):
        quantize_int8_(int8)


def test_int8_per_token_widths_are_the_dequantized_models(models, assert_logits_close, monkeypatch):
    """Per-token MLP widths (dynamic routing, forced here) on int8 weights: each width's tokens
    through the nested int8 kernels give the dequantized float model's routed logits."""
    _, int8, _ = models
    twin = dequantized_twin(models)
    monkeypatch.setenv("FLEXTRON_INT8_DOT", "portable")  # float x, as the twin's kernels
    size = int8.config.intermediate_size
    widths = [size, size // 2, size // 4]  # widest first
    choice = torch.randint(0, 3, (int8.config.num_layers, 7), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 300, (1, 7))
    with torch.no_grad():
        logits = [
            m(ids, session=ForcedSession.shared(widths, choice, int8.full_arch().heads)) for m in (int8, twin)
        ]
    assert_logits_close(*logits)
