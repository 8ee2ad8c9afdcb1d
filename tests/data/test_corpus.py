"""The general-English corpus builder: parsing, decontamination, manifest and its errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from flextron.data.blocks import read_texts
from flextron.data.corpus import (
    Source,
    build_corpus,
    check_sources,
    genre_files,
    read_fortunes,
    read_gcide,
    read_paragraphs,
    read_wordnet,
)

GCIDE = """00-database-short
   The Collaborative International Dictionary of English

Affect \\Af*fect"\\, v. t. [L. affectus, p. p. of afficere.]
   1. To act upon; to produce an effect or change upon.
      [1913 Webster]

            As might affect the earth with cold heat. --Milton.
      [1913 Webster]

Noun \\Noun\\, n.
   [1913 Webster]

"""

WORDNET = """  1 This software and database is being provided to you
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known to exist
00001930 03 n 02 physical_entity 0 thing 0 001 @ 00001740 n 0000 | an entity that exists; "a thing"
"""

FORTUNES = (
    "A bore is a man who talks so much about himself that you can't talk.\n%\nShort.\n%\n"
    "The quick brown fox jumps over the lazy dog while the cat sleeps under the warm sun today.\n"
)


MANUAL = """2.3 Trademarks
==============

Please do not include any trademark acknowledgments in GNU software
packages or documentation, since there is no legal requirement for them.

     int
     main (void)
     { return 0; }

   The quick brown fox jumps over the lazy dog while the cat sleeps under the warm sun
today, as the validation text says.

   What is legally required is to avoid using them in ways which a reader might
reasonably understand as naming our own programs.
"""


@pytest.fixture
def sources(tmp_path):
    gcide = tmp_path / "gcide.dict.dz"
    with gzip.open(gcide, "wt") as file:
        file.write(GCIDE)
    wordnet = tmp_path / "data.noun"
    wordnet.write_text(WORDNET)
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "people").write_text(FORTUNES)
    manual = tmp_path / "manual.text.gz"
    with gzip.open(manual, "wt") as file:
        file.write(MANUAL)
    return (
        Source("gcide", "dict-gcide", str(gcide), "GPL-2.0-or-later", "train", read_gcide, "dictionary"),
        Source("wordnet-noun", "wordnet-base", str(wordnet), "WordNet-3.0", "train", read_wordnet, "glosses"),
        Source("fortunes", "fortunes", str(fortunes), "BSD-4-Clause", "validation", read_fortunes, "quips"),
        Source("manual", "gnu-standards", str(manual), "GFDL-1.3", "test", read_paragraphs, "manual"),
    )


def test_readers_turn_each_source_into_prose(sources) -> None:
    gcide, wordnet, fortunes, manual = sources
    entries = list(read_gcide(Path(gcide.path)))
    assert entries[0].startswith("Affect: v. t. 1. To act upon;")
    assert "As might affect the earth with cold heat." in entries[0] + " ".join(entries)
    assert all("1913 Webster" not in e and "--Milton" not in e and "\\" not in e for e in entries)
    assert not any(e.startswith("Noun") for e in entries)  # labels only: no prose
    glosses = list(read_wordnet(Path(wordnet.path)))
    assert glosses == [
        "entity (noun): that which is perceived or known to exist",
        'physical entity, thing (noun): an entity that exists; "a thing"',
    ]
    assert len(list(read_fortunes(Path(fortunes.path)))) == 2  # "Short." is dropped
    paragraphs = list(read_paragraphs(Path(manual.path)))
    assert paragraphs[0] == (
        "Please do not include any trademark acknowledgments in GNU software packages or "
        "documentation, since there is no legal requirement for them."
    )
    assert len(paragraphs) == 3  # the heading and the indented example are dropped


def test_build_writes_jsonl_a_manifest_and_drops_overlapping_training_text(sources, tmp_path) -> None:
    gcide, wordnet, fortunes, manual = sources
    # A training document repeating a held-out sentence must be dropped.
    with open(wordnet.path, "a") as file:
        file.write(
            "00002000 03 n 01 fox 0 000 | the quick brown fox jumps over the lazy dog while the cat "
            "sleeps under the warm sun\n"
        )
    manifest = build_corpus(tmp_path / "corpus", sources)
    files = manifest["files"]
    assert files["train/wordnet-noun.jsonl"]["dropped_overlapping"] == 1
    assert files["train/wordnet-noun.jsonl"]["documents"] == 2
    assert files["validation/fortunes.jsonl"]["licence"] == "BSD-4-Clause"
    assert files["test/manual.jsonl"] == {
        **files["test/manual.jsonl"],
        "genre": "manual",
        "dropped_overlapping": 1,
    }
    assert json.loads((tmp_path / "corpus" / "corpus.json").read_text()) == manifest
    train = read_texts(tmp_path / "corpus" / "train")
    assert not any("quick brown fox" in text for text in train)
    assert len(read_texts(tmp_path / "corpus" / "validation")) == 2
    assert genre_files(tmp_path / "corpus", "test") == {
        "manual": [tmp_path / "corpus" / "test" / "manual.jsonl"]
    }


def test_no_document_of_one_split_appears_in_another(sources, tmp_path) -> None:
    """Validation, test and training text share no 13-word sequence: a test paragraph quoting
    the validation text, and training glosses quoting either, are dropped."""
    from flextron.data.corpus import NGRAM, _ngrams

    with open(sources[1].path, "a") as file:
        file.write(
            "00002001 03 n 01 law 0 000 | what is legally required is to avoid using them in ways "
            "which a reader might reasonably understand as naming our own programs\n"
        )
    build_corpus(tmp_path / "corpus", sources)
    splits = {
        split: [text for text in read_texts(tmp_path / "corpus" / split)]
        for split in ("train", "validation", "test")
    }
    grams = {split: {gram for text in texts for gram in _ngrams(text)} for split, texts in splits.items()}
    assert NGRAM == 13
    assert not grams["validation"] & grams["test"]
    assert not grams["train"] & (grams["validation"] | grams["test"])
    assert len(splits["test"]) == 2  # of 3 paragraphs: the one quoting the validation text is gone
    assert len(splits["train"]) == 4 and not any("legally required" in text for text in splits["train"])


def test_clear_errors_for_missing_sources_empty_text_and_an_existing_output(sources, tmp_path) -> None:
    missing = Source(
        "gcide", "dict-gcide", str(tmp_path / "nope.dz"), "GPL", "train", read_gcide, "dictionary"
    )
    with pytest.raises(
        ValueError,
        match=r"corpus source not found: .*nope.dz \(install with: apt-get install "
        r"dict-gcide",
    ):
        check_sources((missing,))
    empty = tmp_path / "empty"
    empty.mkdir()
    no_text = (
        *sources[:2],
        Source("fortunes", "fortunes", str(empty), "BSD", "validation", read_fortunes, "quips"),
    )
    with pytest.raises(ValueError, match="fortunes.jsonl: the source gave no text"):
        build_corpus(tmp_path / "out", no_text)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        build_corpus(tmp_path / "taken", sources)
