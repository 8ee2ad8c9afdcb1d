"""Other libraries' entry points: transformers' Auto classes (hf_model, registered by
auto_registration) and the lm-evaluation-harness backend (lm_eval_backend, lm_eval_tasks).

Layer 5: may import every library package (not flextron.cli).
"""
