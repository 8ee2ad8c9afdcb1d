"""Text data: the built-in corpus, text sources on disk, tokenization and packing.

Built-in corpus: Python's own documentation topics (`pydoc_data.topics`, in every CPython
install), split deterministically by topic: every fifth distinct topic text (in sorted
topic-name order) is held out for evaluation, the rest is for calibration and training.

Sources: a text file, a JSONL file (one object per line with a "text" field), a
directory (its .txt/.md/.jsonl files, recursively, in sorted order), or a Hugging Face
`datasets` dataset saved with save_to_disk (a "text" column).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SPLITS = ("train", "eval")
HELD_OUT_EVERY = 5  # every fifth topic is evaluation text


def builtin_texts(split: str = "train") -> list[str]:
    """The built-in corpus: "train" (calibration/training) or "eval" (held out) topics."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from pydoc_data.topics import topics

    # Some topics share a text: deduplicate (in sorted-name order) before splitting.
    texts = list(dict.fromkeys(topics[name] for name in sorted(topics)))
    held_out = split == "eval"
    return [text for index, text in enumerate(texts) if (index % HELD_OUT_EVERY == 0) == held_out]


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error})") from error
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number}: expected an object with a string \"text\" field")
        texts.append(record["text"])
    return texts


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _dataset_texts(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError as error:
        raise ValueError(f"{path} is a saved `datasets` dataset: install the datasets package") from error
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        split = "train" if "train" in dataset else sorted(dataset)[0]
        dataset = dataset[split]
    if "text" not in dataset.column_names:
        raise ValueError(f"{path}: dataset has no \"text\" column (columns: {dataset.column_names})")
    return list(dataset["text"])


def read_texts(source: str | os.PathLike | None, split: str = "train") -> list[str]:
    """Texts from a source (see the module docstring); None or "builtin" = the built-in corpus.

    Raises ValueError when the source holds no text at all.
    """
    if source is None or str(source) == "builtin":
        return builtin_texts(split)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"text source not found: {path}")
    if path.is_dir():
        if _is_saved_dataset(path):
            texts = _dataset_texts(path)
        else:
            texts = []
            for file in sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl")):
                texts += _jsonl_texts(file) if file.suffix == ".jsonl" else [file.read_text(encoding="utf-8")]
    elif path.suffix == ".jsonl":
        texts = _jsonl_texts(path)
    else:
        texts = [path.read_text(encoding="utf-8")]
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ValueError(f"no text found in {path}")
    return texts


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """One stream of token ids (N,) int64: each text followed by the EOS token."""
    if not texts:
        raise ValueError("no texts to tokenize")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
    if not ids:
        raise ValueError("the texts tokenized to nothing (empty text?)")
    return torch.tensor(ids, dtype=torch.int64)


def pack(ids: torch.Tensor, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Cut a token stream (N,) into consecutive blocks (num_blocks, block_size); the tail is dropped."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    num_blocks = ids.numel() // block_size
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    if num_blocks == 0:
        raise ValueError(f"only {ids.numel()} tokens: not enough text for one block of {block_size}")
    return ids[: num_blocks * block_size].view(num_blocks, block_size)


def load_blocks(
    tokenizer,
    source: str | os.PathLike | None = None,
    block_size: int = 512,
    max_blocks: int | None = None,
    split: str = "train",
) -> torch.Tensor:
    """Tokenized, packed blocks (num_blocks, block_size) from a source (default: built-in)."""
    return pack(tokenize(tokenizer, read_texts(source, split)), block_size, max_blocks)
