"""Turning a pretrained model into a Flextron model: importance ranking and permutation (ranking),
per-layer sensitivities (layer_sensitivity) and the choice of each budget's configuration
(budget_search).

Layer 4: may import flextron.eval, flextron.model and the layers below them.
"""
