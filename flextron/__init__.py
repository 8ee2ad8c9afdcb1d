"""Flextron: many-in-one elastic LLMs (Cai et al., ICML 2024).

One set of weights serves every sub-network: load a model, pick the configuration for a
parameter budget, run or generate with it, or export it as an ordinary smaller model.

    import flextron
    model = flextron.load_model("default")       # the packaged SmolLM2-135M-Instruct
    half = model.arch_for_budget(0.5)             # the sub-network with half the parameters
    print(flextron.generate_text(model, "What is the capital of France?", arch=half))

Public names:
    FlextronModel   the elastic decoder; `model(ids, arch)` runs one sub-network
    load_model      a model from "default", a .gguf file, a Flextron or HF directory
    ModelConfig     the full model's sizes;  ArchConfig: one sub-network (per-layer widths)
    BudgetConfigs   each budget's configuration, chosen by calibration loss at conversion
    generate_text   answer a prompt with a sub-network
    ops             the compiled kernels (torch.ops.flextron.*) with autograd and fakes

Importing the package also registers the Hugging Face classes (flextron.hf_model) with
transformers' AutoConfig and AutoModelForCausalLM, so a Flextron directory loads there too.
"""

__version__ = "0.1.0"

from flextron import hf_model as _hf_model  # noqa: F401  (registers the Auto classes)
from flextron import ops
from flextron.budget_configs import BudgetConfigs
from flextron.config import ArchConfig, ModelConfig
from flextron.generate import generate_text
from flextron.loading import load_model
from flextron.model import FlextronModel

__all__ = [
    "ArchConfig",
    "BudgetConfigs",
    "FlextronModel",
    "ModelConfig",
    "generate_text",
    "load_model",
    "ops",
]
