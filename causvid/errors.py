"""The error for what a user got wrong: a bad config, file, size, flag or message.

The command line shows a `UserError` as one line that names the problem and the fix; every
other exception is a bug and keeps its traceback. It is a `ValueError`, so library callers
that catch those keep working.
"""


class UserError(ValueError):
    """Something the user asked for cannot be done as asked. The message is one line with the fix."""
