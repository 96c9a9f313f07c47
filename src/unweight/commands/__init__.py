"""Subcommands of the ``unweight`` CLI, one module each (see ``unweight.cli``)."""


def add_threads(p) -> None:
    """``--threads N``: torch's intra-op threads for the command (``unweight.cli.main`` applies it), which
    the lossless codec follows too."""
    p.add_argument("--threads", type=int, default=None,
                   help="torch's and the lossless codec's threads (default: torch's choice; 1 is much faster on "
                        "a busy machine)")
