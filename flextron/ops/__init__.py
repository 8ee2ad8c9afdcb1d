"""The kernels: `torch.ops.flextron.*` with their autograd, fakes and Python signatures (wrappers),
the pure-PyTorch semantics that are the tests' oracle (reference), the compiled extension
(extension) and a report of what was built (info: `python -m flextron.ops.info`).

Layer 1: imports no other flextron package.
"""

from flextron.ops.wrappers import (
    OP_NAMES,
    backends,
    decoder_layer,
    nested_linear,
    nested_linear_int8,
    nested_mlp,
    route,
    routed_nested_mlp,
    varhead_attention,
)

__all__ = [
    "OP_NAMES",
    "backends",
    "decoder_layer",
    "nested_linear",
    "nested_linear_int8",
    "nested_mlp",
    "route",
    "routed_nested_mlp",
    "varhead_attention",
]
