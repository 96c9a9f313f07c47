"""Subcommands of the ``unweight`` CLI, one module each (see ``unweight.cli``)."""


def add_threads(p) -> None:
    """``--threads N``: torch's intra-op threads for the command (``unweight.cli.main`` applies it)."""
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; 1 is much faster on a busy machine)")
