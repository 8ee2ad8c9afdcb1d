"""Writing one sub-network as an ordinary model: Hugging Face or Flextron directories (hf),
GGUF files for llama.cpp (gguf) and their model cards (model_card).

Layer 4: may import flextron.eval, flextron.model and the layers below them.
"""
