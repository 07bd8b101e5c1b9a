"""Shared helper for error messages."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to `limit` characters."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
