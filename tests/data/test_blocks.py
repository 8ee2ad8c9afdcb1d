"""Text sources, the built-in corpus split, tokenization and packing."""

from __future__ import annotations

import json

import pytest
import torch

from flextron.data.blocks import builtin_texts, pack, read_texts, tokenize


class CharTokenizer:
    """A stand-in tokenizer: one id per character, EOS = 0."""

    eos_token_id = 0

    def __call__(self, text: str | list[str], add_special_tokens: bool = False) -> dict:
        if isinstance(text, list):  # batched, as Hugging Face tokenizers accept
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [1 + ord(c) % 200 for c in text]}


def test_builtin_split_is_deterministic_and_disjoint() -> None:
    train, held_out = builtin_texts("train"), builtin_texts("eval")
    assert train == builtin_texts("train") and held_out
    assert not set(train) & set(held_out)
    assert 3 * sum(map(len, held_out)) < sum(map(len, train))
    with pytest.raises(ValueError, match="split"):
        builtin_texts("test")


def test_sources_file_jsonl_directory(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    lines = json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"})
    (tmp_path / "sub" / "b.jsonl").write_text(lines)
    assert read_texts(tmp_path / "a.txt") == ["alpha"]
    assert read_texts(tmp_path / "sub" / "b.jsonl") == ["beta", "gamma"]
    assert read_texts(tmp_path) == ["alpha", "beta", "gamma"]


def test_bad_sources_are_rejected(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text found"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_texts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        read_texts(tmp_path / "missing.txt")


def test_tokenize_and_pack() -> None:
    ids = tokenize(CharTokenizer(), ["abc", "de"])
    assert ids.tolist()[3] == 0 and ids.numel() == 7
    blocks = pack(ids, 3)
    assert blocks.shape == (2, 3) and torch.equal(blocks.flatten(), ids[:6])
    assert pack(ids, 2, max_blocks=1).shape == (1, 2)
    with pytest.raises(ValueError, match="not enough text"):
        pack(ids, 8)


def test_saved_datasets_dataset(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    plain = datasets.Dataset.from_dict({"text": ["alpha", " ", "beta"], "id": [1, 2, 3]})
    plain.save_to_disk(tmp_path / "ds")
    assert read_texts(tmp_path / "ds") == ["alpha", "beta"]  # blank texts dropped

    splits = datasets.DatasetDict(
        validation=datasets.Dataset.from_dict({"text": ["held out"]}),
        train=datasets.Dataset.from_dict({"text": ["train text"]}),
    )
    splits.save_to_disk(tmp_path / "dict")
    assert read_texts(tmp_path / "dict") == ["train text"]  # the train split when there is one

    datasets.Dataset.from_dict({"content": ["x"]}).save_to_disk(tmp_path / "no_text")
    with pytest.raises(ValueError, match='no "text" column'):
        read_texts(tmp_path / "no_text")
