"""Flextron: many-in-one elastic LLMs (Cai et al., ICML 2024).

`flextron.ops` holds the compiled ops (torch.ops.flextron.*); the model, conversion,
training and routing layers build on them.  Importing the package registers the
Hugging Face classes (flextron.hf_model) with transformers' AutoConfig and
AutoModelForCausalLM.
"""

__version__ = "0.1.0"

from flextron import hf_model as _hf_model  # noqa: E402, F401  (registers the Auto classes)
