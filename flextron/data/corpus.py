"""A general-English corpus built from text that ships in Debian packages.

Training and calibration text (`OUT/train/*.jsonl`, one {"text": ...} document per line):
    gcide     GNU Collaborative International Dictionary of English (package dict-gcide,
              GPL-2+): definitions and the literary quotations that illustrate them
    wordnet   WordNet 3.0 glosses and example sentences (package wordnet-base, WordNet 3.0
              licence: free use, copy and distribution with the notice)
Held-out evaluation text (`OUT/heldout/fortunes.jsonl`):
    fortunes  the prose files of the BSD fortune cookie collection (package fortunes, BSD):
              quotations, jokes, aphorisms, short stories

The two sides come from different works and genres.  To keep them disjoint, every training
document that shares a 13-word sequence with the held-out text is dropped (the usual
n-gram decontamination).  The builder streams each source (never the whole text in memory)
and writes `OUT/corpus.json`: sources, licences, documents and words per file.

    make corpus                                    # apt-get install the packages, then build
    flextron corpus --out data/general             # build from already installed packages
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flextron.io.outputs import staged_output

NGRAM = 13  # words shared with the held-out text that mark a training document as contaminated
FORMAT = "flextron-corpus"


@dataclass(frozen=True)
class Source:
    name: str
    package: str  # the Debian package that ships it
    path: str
    licence: str
    split: str  # "train" or "heldout"
    reader: Callable[[Path], Iterator[str]]


# ---- readers: a source file -> documents (plain prose, one paragraph or entry each)

_GCIDE_DROP = re.compile(
    r"\[(?:1913 Webster|Webster 1913 Suppl\.|WordNet[^\]]*|PJC|Century Dict\.|"
    r"Obs\.|R\.|Colloq\.|Archaic)\]"
)
_GCIDE_PRONUNCIATION = re.compile(r"\\[^\\]*\\,?")
_GCIDE_ETYMOLOGY = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]")  # bracketed notes, one nesting level
_GCIDE_ATTRIBUTION = re.compile(r"--\s*[A-Z][\w. ]*\.?")
_SPACES = re.compile(r"\s+")


def _clean_gcide(entry: str) -> str:
    # An entry starts 'Headword \\Pro*nun"ci*a`tion\\, n. [etymology]'; later senses of the
    # same word follow as separate paragraphs with no headword.
    first, _, rest = entry.partition("\n")
    headword, slash, after = first.partition("\\")
    text = f"\\{after} {rest}" if slash else entry
    text = _GCIDE_DROP.sub(" ", text)
    text = _GCIDE_PRONUNCIATION.sub(" ", text)
    text = _GCIDE_ETYMOLOGY.sub(" ", text)
    text = _GCIDE_ATTRIBUTION.sub(" ", text)
    text = _SPACES.sub(" ", text.replace("{", "").replace("}", "")).strip(" ,;")
    # Paragraphs that are only grammar labels ("n.", "v. t.") carry no prose.
    if len(text.split()) < 6:
        return ""
    return f"{headword.strip()}: {text}" if slash else text


def read_gcide(path: Path) -> Iterator[str]:
    """Dictionary entries (blank-line separated in the dictd file) as prose paragraphs."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as file:
        entry: list[str] = []
        started = False
        for line in file:
            if not line.strip():
                if entry and started:
                    text = _clean_gcide("\n".join(entry))
                    if text:
                        yield text
                entry = []
                continue
            if not line.startswith(" ") and re.match(r"^[A-Z][^\s\\]*.* \\", line):
                started = True  # past the licence preamble: headword lines start entries
            entry.append(line.rstrip())


def read_wordnet(path: Path) -> Iterator[str]:
    """One document per synset of a WordNet data.* file: "lemma, lemma: gloss; "example"."."""
    part = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}[path.name.split(".")[1]]
    with open(path, encoding="utf-8", errors="replace") as file:
        for line in file:
            if line.startswith(" ") or " | " not in line:
                continue  # licence header lines start with spaces
            fields, gloss = line.split(" | ", 1)
            words = fields.split()
            count = int(words[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in words[4 : 4 + 2 * count : 2]]
            yield f"{', '.join(lemmas)} ({part}): {gloss.strip()}"


HELDOUT_FORTUNES = (
    "art",
    "cookie",
    "education",
    "food",
    "fortunes",
    "humorists",
    "kids",
    "law",
    "literature",
    "love",
    "medicine",
    "men-women",
    "miscellaneous",
    "news",
    "people",
    "pets",
    "platitudes",
    "politics",
    "riddles",
    "science",
    "songs-poems",
    "sports",
    "wisdom",
    "work",
)


def read_fortunes(path: Path) -> Iterator[str]:
    """The prose fortune files of a directory, one fortune per document ("%" lines separate)."""
    for name in HELDOUT_FORTUNES:
        file = path / name
        if not file.is_file():
            continue
        fortune: list[str] = []
        with open(file, encoding="utf-8", errors="replace") as handle:
            for line in [*handle, "%\n"]:
                if line.strip() == "%":
                    text = "\n".join(fortune).strip()
                    if len(text.split()) >= 5:
                        yield text
                    fortune = []
                else:
                    fortune.append(line.rstrip())


SOURCES = (
    Source("gcide", "dict-gcide", "/usr/share/dictd/gcide.dict.dz", "GPL-2.0-or-later", "train", read_gcide),
    *(
        Source(
            f"wordnet-{part}",
            "wordnet-base",
            f"/usr/share/wordnet/data.{part}",
            "WordNet-3.0",
            "train",
            read_wordnet,
        )
        for part in ("noun", "verb", "adj", "adv")
    ),
    Source("fortunes", "fortunes", "/usr/share/games/fortunes", "BSD-4-Clause", "heldout", read_fortunes),
)


# ---- decontamination


def _ngrams(text: str) -> Iterator[int]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    for start in range(len(words) - NGRAM + 1):
        yield hash(tuple(words[start : start + NGRAM]))


# ---- the builder


def _write_jsonl(path: Path, documents: Iterator[str]) -> tuple[int, int]:
    count = words = 0
    with open(path, "w", encoding="utf-8") as file:
        for text in documents:
            file.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            count, words = count + 1, words + len(text.split())
    if count == 0:
        raise ValueError(f"{path.name}: the source gave no text")
    return count, words


def check_sources(sources: tuple[Source, ...] = SOURCES) -> None:
    """ValueError naming every missing source file and the package that installs it."""
    missing = [s for s in sources if not Path(s.path).exists()]
    if missing:
        packages = " ".join(sorted({s.package for s in missing}))
        raise ValueError(
            f"corpus source not found: {', '.join(s.path for s in missing)} "
            f"(install with: apt-get install {packages}, or run `make corpus`)"
        )


def build_corpus(out: str | os.PathLike, sources: tuple[Source, ...] = SOURCES) -> dict:
    """Write the corpus under `out` (which must not exist yet) and return its manifest."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists: choose a new directory (or delete it)")
    check_sources(sources)
    manifest: dict = {"format": FORMAT, "version": 1, "decontamination_ngram": NGRAM, "files": {}}
    with staged_output(out) as staging:  # the corpus appears only once complete
        (staging / "train").mkdir(parents=True)
        (staging / "heldout").mkdir()
        heldout_ngrams: set[int] = set()
        for source in (s for s in sources if s.split == "heldout"):
            documents = list(source.reader(Path(source.path)))  # small (under 1 MB of text)
            for text in documents:
                heldout_ngrams.update(_ngrams(text))
            count, words = _write_jsonl(staging / "heldout" / f"{source.name}.jsonl", iter(documents))
            manifest["files"][f"heldout/{source.name}.jsonl"] = _describe(source, count, words)
        for source in (s for s in sources if s.split == "train"):
            dropped = [0]

            def clean(documents: Iterator[str], dropped: list[int] = dropped) -> Iterator[str]:
                for text in documents:
                    if any(gram in heldout_ngrams for gram in _ngrams(text)):
                        dropped[0] += 1
                    else:
                        yield text

            count, words = _write_jsonl(
                staging / "train" / f"{source.name}.jsonl", clean(source.reader(Path(source.path)))
            )
            manifest["files"][f"train/{source.name}.jsonl"] = {
                **_describe(source, count, words),
                "dropped_overlapping": dropped[0],
            }
        (staging / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _describe(source: Source, documents: int, words: int) -> dict:
    return {
        "package": source.package,
        "path": source.path,
        "licence": source.licence,
        "documents": documents,
        "words": words,
    }
