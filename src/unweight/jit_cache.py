"""Keys for numba's disk cache that follow the code a cached kernel inlines.

Numba's disk cache watches only the source file of the cached function. A kernel that inlines
intrinsics or functions from other modules (the rANS loops, the AVX512-BF16 tiles) would load stale
machine code after those modules change. A closure variable's value is part of the cache key, so each
such kernel closes over :func:`source_stamp` of every module it depends on (and uses it, e.g. in an
``assert stamp != 0``, so that numba keeps it).
"""

import hashlib
from pathlib import Path
from types import ModuleType


def source_stamp(*modules: ModuleType) -> int:
    """A 56-bit number that changes whenever the source of any of ``modules`` (hashed in this order)
    changes."""
    h = hashlib.sha256()
    for mod in modules:
        h.update(Path(mod.__file__).read_bytes())
    return int.from_bytes(h.digest()[:7], "little")
