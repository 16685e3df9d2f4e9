"""The one exception type users see.

Every error a user can cause (a bad config, a missing file, an unknown model,
dataset or algorithm name) is raised as :class:`FedtuneError` with a single
line that says what is wrong and how to fix it. The CLI prints that line and
exits with status 2; it never shows a traceback for these.
"""


class FedtuneError(Exception):
    """A user-facing error: one line, what is wrong and how to fix it."""
