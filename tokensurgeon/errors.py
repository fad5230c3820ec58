"""User-facing errors.

Boundary: a ``UsageError`` is bad input the user can fix. Its message is one line that says
what was wrong and names the fix; the CLI prints it without a traceback and exits with 2.
"""


class UsageError(Exception):
    """Bad input that the user can fix; the message is one line naming the fix."""
