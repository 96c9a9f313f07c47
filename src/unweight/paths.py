"""Where unweight keeps what it fetches and derives: one cache folder, overridable by UNWEIGHT_CACHE."""

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache folder (``$UNWEIGHT_CACHE``, else ``~/.cache/unweight``), joined with ``parts``."""
    root = Path(os.environ.get("UNWEIGHT_CACHE") or Path.home() / ".cache" / "unweight")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
