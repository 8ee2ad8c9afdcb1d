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
from collections.abc import Iterable, Iterator
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


def _jsonl_texts(path: Path) -> Iterator[str]:
    # Streamed line by line: a large JSONL corpus is never read into memory at once.
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from error
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{number}: expected an object with a string "text" field')
            yield record["text"]


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
        raise ValueError(f'{path}: dataset has no "text" column (columns: {dataset.column_names})')
    return list(dataset["text"])


def iter_texts(source: str | os.PathLike | None, split: str = "train") -> Iterator[str]:
    """Texts from a source (see the module docstring), one at a time; None or "builtin" = the
    built-in corpus.  Raises ValueError when the source holds no text at all."""
    if source is None or str(source) == "builtin":
        yield from builtin_texts(split)
        return
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"text source not found: {path}")
    if path.is_dir() and _is_saved_dataset(path):
        texts: Iterator[str] = iter(_dataset_texts(path))
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl"))
        texts = (text for file in files for text in _file_texts(file))
    else:
        texts = _file_texts(path)
    empty = True
    for text in texts:
        if text.strip():
            empty = False
            yield text
    if empty:
        raise ValueError(f"no text found in {path}")


def _file_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        return _jsonl_texts(path)
    return iter([path.read_text(encoding="utf-8")])


def read_texts(source: str | os.PathLike | None, split: str = "train") -> list[str]:
    """All texts of a source as a list (see iter_texts)."""
    return list(iter_texts(source, split))


TOKENIZE_BATCH = 256  # texts per tokenizer call: fast batched encoding, bounded memory


def tokenize(tokenizer, texts: Iterable[str]) -> torch.Tensor:
    """One stream of token ids (N,) int64: each text followed by the EOS token.

    Texts are consumed lazily and ids kept as int32 chunks, so memory stays near 4 bytes
    per token (a Python list of ints costs about ten times that).
    """
    eos = tokenizer.eos_token_id
    chunks: list[torch.Tensor] = []
    batch: list[str] = []

    def flush() -> None:
        # One int32 chunk per batch of texts (a tensor per text would cost more than its ids).
        end = [eos] if eos is not None else []
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        flat = [token for ids in encoded for token in ids + end]
        chunks.append(torch.tensor(flat, dtype=torch.int32))
        batch.clear()

    seen = False
    for text in texts:
        seen = True
        batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            flush()
    if not seen:
        raise ValueError("no texts to tokenize")
    if batch:
        flush()
    ids = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int32)
    if ids.numel() == 0:
        raise ValueError("the texts tokenized to nothing (empty text?)")
    return ids.to(torch.int64)


def pack(ids: torch.Tensor, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Cut a token stream (N,) into consecutive blocks (num_blocks, block_size); the tail is dropped.

    With max_blocks, at most that many blocks, evenly spaced over the stream: a sample of a
    large source covers all of it, not just its first documents.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    num_blocks = ids.numel() // block_size
    if num_blocks == 0:
        raise ValueError(f"only {ids.numel()} tokens: not enough text for one block of {block_size}")
    blocks = ids[: num_blocks * block_size].view(num_blocks, block_size)
    return blocks if max_blocks is None else evenly_spaced(blocks, max_blocks)


def evenly_spaced(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """At most `count` of blocks (N, S), evenly spaced: a sample covers all of them, not just
    the first ones."""
    if count >= blocks.shape[0]:
        return blocks
    return blocks[torch.linspace(0, blocks.shape[0] - 1, count).round().long()]


def load_blocks(
    tokenizer,
    source: str | os.PathLike | None = None,
    block_size: int = 512,
    max_blocks: int | None = None,
    split: str = "train",
) -> torch.Tensor:
    """Tokenized, packed blocks (num_blocks, block_size) from a source (default: built-in)."""
    return pack(tokenize(tokenizer, iter_texts(source, split)), block_size, max_blocks)
