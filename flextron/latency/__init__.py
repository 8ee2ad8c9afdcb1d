"""Latency: the shapes budgets refer to (shape), lookup tables of measured component costs (table),
their measurement (profiling) and interpolation between budgets (interpolation).

Layer 3: may import flextron.model and the layers below it.
"""
