"""The one exception type a user can cause.

Every error that bad input can trigger (a wrong path, an unknown model name, a corrupt or truncated
stream, an unsupported dtype or architecture, a pickle we refuse to open) is raised as
:class:`UnweightError` with the file, and where it applies the tensor and chunk, named in the message.
The CLI prints it on one line and exits non-zero; it never shows a traceback for bad input.
"""


class UnweightError(Exception):
    """A problem with the user's input, stated in one line that names the file (and tensor)."""
