"""A general-English corpus built from text that ships in Debian packages, in three splits.

`OUT/<split>/*.jsonl`, one {"text": ...} document per line:
train       calibration and training text, two genres:
    gcide       GNU Collaborative International Dictionary of English (dict-gcide, GPL-2+):
                definitions and the literary quotations that illustrate them
    wordnet-*   WordNet 3.0 glosses and example sentences (wordnet-base, WordNet 3.0 licence)
validation  the text every recipe choice (weights, rates, steps) is made on:
    fortunes    the prose files of the BSD fortune collection (fortunes, BSD): quips, jokes,
                aphorisms, short stories
test        the text results are reported on and nothing is tuned on, three other genres:
    licence-*   legal text: the free-software licences in /usr/share/common-licenses (base-files)
    manual-*    technical manuals: the GNU Coding Standards and Information for Maintainers of
                GNU Software (gnu-standards, GFDL)
    charter-*   organisational prose: Debian's constitution, social contract and manifesto
                (doc-debian)

Every split is a different set of works and genres.  To keep them disjoint, a test document that
shares a 13-word sequence with the validation text is dropped, and so is a training document
that shares one with either (the usual n-gram decontamination).  The builder streams each
training source (never the whole text in memory) and writes `OUT/corpus.json`: sources,
genres, licences, documents and words per file.

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
    split: str  # one of SPLITS
    reader: Callable[[Path], Iterator[str]]
    genre: str


SPLITS = ("validation", "test", "train")  # the order they are built in (decontamination)


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


PROSE_FORTUNES = (
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
    for name in PROSE_FORTUNES:
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


def read_paragraphs(path: Path) -> Iterator[str]:
    """Prose paragraphs of a plain-text document (gzip-compressed or not), blank-line separated:
    lines joined, headings and fragments (under 8 words) and indented examples dropped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as file:
        paragraph: list[str] = []
        for line in [*file, "\n"]:
            if line.strip():
                paragraph.append(line.rstrip())
                continue
            # Texinfo's text output indents examples and code by five spaces or more.
            example = all(len(row) - len(row.lstrip()) >= 5 for row in paragraph)
            text = _SPACES.sub(" ", " ".join(paragraph)).strip()
            if paragraph and not example and len(text.split()) >= 8:
                yield text
            paragraph = []


LICENCES = ("GPL-3", "LGPL-2.1", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic", "CC0-1.0")
MANUALS = ("standards", "maintain")
CHARTERS = ("constitution.txt", "social-contract.txt", "debian-manifesto")


SOURCES = (
    Source(
        "gcide",
        "dict-gcide",
        "/usr/share/dictd/gcide.dict.dz",
        "GPL-2.0-or-later",
        "train",
        read_gcide,
        "dictionary",
    ),
    *(
        Source(
            f"wordnet-{part}",
            "wordnet-base",
            f"/usr/share/wordnet/data.{part}",
            "WordNet-3.0",
            "train",
            read_wordnet,
            "glosses",
        )
        for part in ("noun", "verb", "adj", "adv")
    ),
    Source(
        "fortunes",
        "fortunes",
        "/usr/share/games/fortunes",
        "BSD-4-Clause",
        "validation",
        read_fortunes,
        "quips",
    ),
    *(
        Source(
            f"licence-{name}",
            "base-files",
            f"/usr/share/common-licenses/{name}",
            "verbatim copies permitted",
            "test",
            read_paragraphs,
            "legal",
        )
        for name in LICENCES
    ),
    *(
        Source(
            f"manual-{name}",
            "gnu-standards",
            f"/usr/share/doc/gnu-standards/{name}.text.gz",
            "GFDL-1.3-or-later",
            "test",
            read_paragraphs,
            "manual",
        )
        for name in MANUALS
    ),
    *(
        Source(
            f"charter-{name.split('.')[0]}",
            "doc-debian",
            f"/usr/share/doc/debian/{name}.gz",
            "OPL-1.0 / GPL (doc-debian)",
            "test",
            read_paragraphs,
            "charter",
        )
        for name in CHARTERS
    ),
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
    manifest: dict = {"format": FORMAT, "version": 2, "decontamination_ngram": NGRAM, "files": {}}
    with staged_output(out) as staging:  # the corpus appears only once complete
        seen: set[int] = set()  # the n-grams of the splits built so far
        for split in SPLITS:
            (staging / split).mkdir(parents=True)
            grams: set[int] = set()
            for source in (s for s in sources if s.split == split):
                dropped = [0]
                documents = _decontaminated(source.reader(Path(source.path)), seen, dropped)
                if split != "train":  # small (under 1 MB of text); its n-grams guard later splits
                    documents = list(documents)
                    grams.update(gram for text in documents for gram in _ngrams(text))
                count, words = _write_jsonl(staging / split / f"{source.name}.jsonl", iter(documents))
                manifest["files"][f"{split}/{source.name}.jsonl"] = {
                    **_describe(source, count, words),
                    "dropped_overlapping": dropped[0],
                }
            seen |= grams
        (staging / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _decontaminated(documents: Iterator[str], seen: set[int], dropped: list[int]) -> Iterator[str]:
    """The documents that share no n-gram with `seen`; dropped[0] counts the others."""
    for text in documents:
        if any(gram in seen for gram in _ngrams(text)):
            dropped[0] += 1
        else:
            yield text


def genre_files(corpus: str | os.PathLike, split: str) -> dict[str, list[Path]]:
    """A built corpus's files of one split, by genre (from its corpus.json)."""
    manifest = json.loads((Path(corpus) / "corpus.json").read_text())
    genres: dict[str, list[Path]] = {}
    for name, entry in manifest["files"].items():
        if name.startswith(f"{split}/"):
            genres.setdefault(entry["genre"], []).append(Path(corpus) / name)
    return genres


def _describe(source: Source, documents: int, words: int) -> dict:
    return {
        "package": source.package,
        "genre": source.genre,
        "path": source.path,
        "licence": source.licence,
        "documents": documents,
        "words": words,
    }
