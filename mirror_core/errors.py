"""An exception as the one line that an error row, a log line or the console shows."""
from __future__ import annotations


def error_text(err: BaseException) -> str:
    """'Type: message', with the message's whitespace folded to single spaces: libraries end
    messages with newlines or spread them over lines, and an error row stays one line."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
