"""Weight-only int8 for inference (`--dtype int8`): every linear weight as int8 values with one
fp32 scale per output row.

Why per row: the scale factors out of each dot product (the kernel multiplies once per output,
ops.nested_linear_int8), and it covers the whole row, so every prefix q[:out, :in] -- every
budget's sub-network -- holds the same numbers as the full matrix: one quantization serves all
budgets.  The scale is max |row| / 127 rounded to fp16, the type a GGUF q8_0 block stores its
scale in, so the q8_0 export (flextron.export.gguf) writes exactly these numbers.

The embedding table stays in float: a lookup reads one row per token.  The output head, which
every decoding step streams whole, gets an int8 copy (FlextronModel.int8_head).  Norms and
activations keep the model's float dtype.  An int8 model is for inference: it is not trained,
saved or exported (export the float model with --gguf-type q8_0 for the same numbers).
"""

from __future__ import annotations

import torch

from flextron.model.elastic_model import FlextronModel
from flextron.model.layers import ElasticLinear

INT8_MAX = 127


def row_scales(weight: torch.Tensor) -> torch.Tensor:
    """(O, I) float weight -> (O,) fp32 scales: max |row| / 127, fp16-representable; 1 for a
    row of zeros (its int8 values are zeros whatever the scale)."""
    scale = (weight.detach().float().abs().amax(dim=1) / INT8_MAX).half().float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(O, I) float weight, (O,) scales -> (O, I) int8, round to nearest, clamped to +-127."""
    return torch.round(weight.detach().float() / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def int8_linear(weight: torch.Tensor) -> ElasticLinear:
    """An ElasticLinear whose (O, I) weight is replaced by int8 rows and their scales."""
    layer = ElasticLinear(weight.shape[1], weight.shape[0], device="meta")
    quantize_linear_(layer, weight)
    return layer


def quantize_linear_(layer: ElasticLinear, weight: torch.Tensor | None = None) -> None:
    """Replace `layer`'s float weight (or `weight`) by the buffers qweight (int8) and weight_scale."""
    weight = layer.weight if weight is None else weight
    scale = row_scales(weight)  # (O,)
    layer.register_buffer("qweight", quantize_rows(weight, scale))
    layer.register_buffer("weight_scale", scale)
    layer.weight = None


def quantize_int8_(model: FlextronModel) -> FlextronModel:
    """Quantize every linear weight of `model` in place, and give it an int8 output head."""
    if model.is_int8:
        raise ValueError("the model is already int8")
    for module in model.modules():
        if isinstance(module, ElasticLinear):
            quantize_linear_(module)
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight  # (V, D)
    model.int8_head = int8_linear(head)
    return model
