"""The one exception type users see, and the one way an exception becomes a line of a message."""


class LoraboundError(Exception):
    """A problem the user can fix. The message is one line: what is wrong, then how to fix it.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """


def first_line(err: BaseException, limit: int = 200, *, typed: bool = False) -> str:
    """The first line of an exception's message, cut to `limit` characters; `typed` puts the exception's type in
    front ("OSError: ..."). A message with no text gives the type's name."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    text = lines[0] if len(lines[0]) <= limit else lines[0][: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if typed else text
