"""Hugging Face calls on a user's files: local only, and never the files' own code.

Every transformers `from_pretrained` on a user path goes through `LOCAL_ONLY`:
trust_remote_code=False (a directory's Python files are never imported, and transformers
never asks "Do you wish to run the custom code?") and local_files_only=True (a path that
vanished is an error, not a Hugging Face Hub repository id to download).  A directory that
asks for its own code (an `auto_map` in config.json or tokenizer_config.json) is refused
outright rather than loaded with a substitute class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LOCAL_ONLY = {"trust_remote_code": False, "local_files_only": True}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def refuse_custom_code(directory: str | os.PathLike) -> None:
    """ValueError when the directory's config or tokenizer config names code to run (auto_map)."""
    for name in ("config.json", "tokenizer_config.json"):
        file = Path(directory) / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"{file}: not valid JSON ({error})") from error
        if isinstance(data, dict) and data.get("auto_map"):
            raise ValueError(
                f"{file} asks to run the model directory's own Python code (auto_map); "
                "flextron never runs code shipped with a model"
            )


def existing_dir(path: str | os.PathLike) -> str:
    """`path` as an absolute directory name; FileNotFoundError when it is not a directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    return str(path.absolute())


def load_local_tokenizer(path: str | os.PathLike, gguf_file: str | None = None):
    """The tokenizer saved in directory `path` (or inside its GGUF file), or None if it has none."""
    from transformers import AutoTokenizer

    directory = existing_dir(path)
    if gguf_file is None and not any((Path(directory) / n).is_file() for n in TOKENIZER_FILES):
        return None
    refuse_custom_code(directory)
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, **LOCAL_ONLY)
