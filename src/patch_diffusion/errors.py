"""The one exception type for user mistakes.

Anything a user can fix (a wrong path, a bad option, a corrupt file) raises
``UserError`` with a one-line message that names the problem and the fix. The CLI
prints it without a traceback and exits non-zero; library users can catch it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, with a message that says how to fix it.

    ``rank``: in a job of several processes, the one process this failure belongs to
    (it prints the message); None when every process meets it alike (rank 0 prints it).
    """

    def __init__(self, message: str = "", *, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank
