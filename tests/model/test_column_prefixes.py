"""ElasticLinear's operands for decode: column prefixes as contiguous copies (kept until the weight
changes, at most MAX_COLUMN_PREFIXES widths), row prefixes as views; and a narrowed model's cached
decode, which runs on them, against its uncached forward."""

from __future__ import annotations

import torch

from flextron.model.layers import MAX_COLUMN_PREFIXES, ElasticLinear
from flextron.model.quantization import quantize_linear_


def make_linear(seed: int = 0, bias: bool = True) -> ElasticLinear:
    torch.manual_seed(seed)
    linear = ElasticLinear(48, 16, bias)
    linear.requires_grad_(False)
    return linear


def test_a_column_prefix_is_a_contiguous_copy_kept_until_the_weight_changes():
    linear = make_linear()
    weight, scale, bias = linear.column_prefix_operands(20)
    assert weight.is_contiguous() and weight.shape == (16, 20) and scale is None and bias is linear.bias
    torch.testing.assert_close(weight, linear.weight[:, :20], rtol=0, atol=0)
    assert linear.column_prefix_operands(20)[0] is weight  # kept
    linear.weight.mul_(2)  # in place: the copy is taken again
    again = linear.column_prefix_operands(20)[0]
    assert again is not weight
    torch.testing.assert_close(again, linear.weight[:, :20], rtol=0, atol=0)


def test_the_whole_width_and_a_weight_that_records_gradients_are_the_weight_itself():
    linear = make_linear()
    assert linear.column_prefix_operands(48)[0] is linear.weight
    linear.requires_grad_(True)
    assert linear.column_prefix_operands(20)[0] is linear.weight
    with torch.no_grad():
        assert linear.column_prefix_operands(20)[0] is not linear.weight


def test_at_most_max_column_prefixes_widths_are_kept():
    linear = make_linear()
    for width in range(1, 2 * MAX_COLUMN_PREFIXES + 2):
        linear.column_prefix_operands(width)
        assert len(linear._column_prefixes) <= MAX_COLUMN_PREFIXES


def test_int8_rows_keep_their_scales():
    linear = make_linear(bias=False)
    quantize_linear_(linear)
    qweight, scale, _ = linear.column_prefix_operands(20)
    assert qweight.dtype == torch.int8 and scale is linear.weight_scale
    torch.testing.assert_close(qweight, linear.qweight[:, :20], rtol=0, atol=0)


def test_row_prefixes_are_views_of_the_leading_rows():
    linear = make_linear()
    quantized = make_linear(seed=1)
    quantize_linear_(quantized)
    weight, scale, bias = linear.row_prefix_operands(5)
    assert weight.data_ptr() == linear.weight.data_ptr() and weight.shape == (5, 48) and bias.shape == (5,)
    assert scale is None
    qweight, qscale, _ = quantized.row_prefix_operands(5)
    assert qweight.shape == (5, 48) and qscale.shape == (5,)


def test_a_narrowed_cached_decode_matches_the_uncached_forward(tiny_flextron):
    """Prefill and decode steps on the cache (o and down from their column-prefix copies) give the
    uncached forward's logits, at every budget's configuration."""
    model = tiny_flextron(seed=4).eval()
    ids = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        for budget in (1.0, 0.75, 0.5, 0.25):
            arch = model.arch_for_budget(budget)
            cache = model.new_kv_cache(1, 8)
            steps = [model(ids[:, :5], arch, cache)]
            steps += [model(ids[:, t : t + 1], arch, cache) for t in range(5, 8)]
            torch.testing.assert_close(torch.cat(steps, 1), model(ids, arch), rtol=1e-4, atol=1e-4)
