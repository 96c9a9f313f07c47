"""transformers integration: importing unweight registers its on-disk formats (see DESIGN.md).

Formats register themselves here as they are built; until then this module is a no-op.
"""
