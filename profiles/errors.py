"""The one exception type every user-facing failure raises.

The CLI turns a ``DDiTError`` into a single line on stderr (no traceback) and exit status 2; anything else is a bug.
"""


class DDiTError(Exception):
    """Bad input or a broken engines folder: the message says what was wrong and what to do."""
