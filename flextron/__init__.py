"""Flextron: many-in-one elastic LLMs (Cai et al., ICML 2024).

`flextron.ops` holds the compiled ops (torch.ops.flextron.*); the model, conversion,
training and routing layers build on them.
"""

__version__ = "0.1.0"
