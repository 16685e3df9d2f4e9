"""The one exception type users see.

Every error a user can cause (a bad config, a missing file, an unknown model,
dataset or algorithm name) is raised as :class:`FedtuneError` with a single
line that says what is wrong and how to fix it. The CLI prints that line and
exits with status 2; it never shows a traceback for these.
"""


class FedtuneError(Exception):
    """A user-facing error: one line, what is wrong and how to fix it.

    ``public``: the line a deployed node may send to the server for this error. Without it the node sends
    only the kind of problem (:func:`fedtune.runtime.flower_node.public_reason`), because an error's text can
    quote the node's rows (a label value, a sentence); give it for errors about configuration alone.
    """

    def __init__(self, message: str = "", *, public: str | None = None):
        super().__init__(message)
        self.public = public


def public_error(message: str) -> FedtuneError:
    """A :class:`FedtuneError` whose whole text may travel to the server (it quotes no data)."""
    return FedtuneError(message, public=message)
