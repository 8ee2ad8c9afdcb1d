"""Elastic (nested-width) layers and rotary embeddings the Flextron model is built from."""
