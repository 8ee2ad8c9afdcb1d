"""The elastic model: configurations (config, budget_configs), the decoder (elastic_model) and its
layers (layers, rope), sub-network slicing, losses (objectives), and reading and writing models
(checkpoint, loading).

Layer 2: may import flextron.ops, flextron.io and the layer-0 modules (options, timing, limits).
"""
