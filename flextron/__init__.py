"""Flextron: many-in-one elastic LLMs (Cai et al., ICML 2024).

One set of weights serves every sub-network: load a model, pick the configuration for a
parameter budget, run or generate with it, or export it as an ordinary smaller model.

    import flextron
    model = flextron.load_model("default")       # the packaged SmolLM2-135M-Instruct
    half = model.arch_for_budget(0.5)             # the sub-network with half the parameters
    print(flextron.generate_text(model, "What is the capital of France?", arch=half))

Public names (each imported on first use, so `import flextron` is fast):
    FlextronModel   the elastic decoder; `model(ids, arch)` runs one sub-network
    load_model      a model from "default", a .gguf file, a Flextron or HF directory
    ModelConfig     the full model's sizes;  ArchConfig: one sub-network (per-layer widths)
    BudgetConfigs   each budget's configuration, chosen by calibration loss at conversion
    generate_text   answer a prompt with a sub-network
    ops             the compiled kernels (torch.ops.flextron.*) with autograd and fakes

The package's layers and what each may import: docs/design.md, "Layers".  Importing the
package also arranges for the Hugging Face classes (flextron.integrations.hf_model) to be
registered with transformers' AutoConfig and AutoModelForCausalLM as soon as transformers is
imported, so a Flextron directory loads there too.
"""

from flextron._lazy import lazy_attributes
from flextron._version import __version__  # noqa: F401  (the public version)
from flextron.integrations.auto_registration import register_when_transformers_loads

__all__ = [
    "ArchConfig",
    "BudgetConfigs",
    "FlextronModel",
    "ModelConfig",
    "generate_text",
    "load_model",
    "ops",
]
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "ArchConfig": "flextron.model.config",
        "ModelConfig": "flextron.model.config",
        "BudgetConfigs": "flextron.model.budget_configs",
        "FlextronModel": "flextron.model.elastic_model",
        "load_model": "flextron.model.loading",
        "generate_text": "flextron.eval.generation",
        "ops": "flextron.ops",
    },
)
register_when_transformers_loads()
