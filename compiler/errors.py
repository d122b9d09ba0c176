"""The one error type for mistakes a user can make.

Anything the user got wrong (bad file, unsupported op, bad budget, bad data,
unknown option) is raised as :class:`EdgeqError` with a one-line message. The
CLI turns it into exit code 2 without a traceback; every other exception is an
internal error and keeps its traceback.
"""


class EdgeqError(Exception):
    """A user-facing error: the message is one line that names the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
