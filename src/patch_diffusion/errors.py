"""The one exception type for user mistakes.

Anything a user can fix (a wrong path, a bad option, a corrupt file) raises
``UserError`` with a one-line message that names the problem and the fix. The CLI
prints it without a traceback and exits non-zero; library users can catch it.
"""


class UserError(Exception):
    """A problem with the user's input, with a message that says how to fix it."""
