"""The one exception type users see."""


class LoraboundError(Exception):
    """A problem the user can fix. The message is one line: what is wrong, then how to fix it.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """
