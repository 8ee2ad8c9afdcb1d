"""Files and model sources: atomic writes, output-path checks, safetensors/GGUF weight readers,
local Hugging Face directories and hub ids.

Layer 0: imports no other flextron package.
"""
