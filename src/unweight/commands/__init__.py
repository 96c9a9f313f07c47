"""Subcommands of the ``unweight`` CLI, one module each (see ``unweight.cli``)."""
