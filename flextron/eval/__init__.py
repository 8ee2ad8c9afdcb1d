"""Measuring a model: perplexity per configuration (perplexity), tokens per second (speed) and
text generation with a KV cache (generation).

Layer 3: may import flextron.model and the layers below it.
"""
