"""An exception as the one line that an error row, a log line or the console shows."""
from __future__ import annotations

import re
from typing import Mapping


def error_text(err: BaseException) -> str:
    """'Type: message', with the message's whitespace folded to single spaces: libraries end
    messages with newlines or spread them over lines, and an error row stays one line."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


_STATUS = re.compile(r"\d{3}\b")


def error_kind(message: str) -> str:
    """What an error row's message says went wrong, without what is particular to the
    record: its stage and exception type ('read failed: FileNotFoundError'), with an HTTP
    status where the type carries one ('read failed: ClientResponseError 429'); else the
    text before its first ':' ('file too large', 'no uri', 'decode failed')."""
    head, _, rest = message.partition(": ")
    name, _, detail = rest.partition(": ")
    if head.endswith(" failed") and name[:1].isupper() and name.isidentifier():
        status = _STATUS.match(detail)
        return f"{head}: {name}" + (f" {status.group()}" if status else "")
    return head


def by_frequency(counts: Mapping[str, int]) -> dict[str, int]:
    """Counts per kind, the most frequent first (ties by name): as summaries report them."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def most_frequent_kinds(counts: Mapping[str, int], shown: int = 3) -> str:
    """Error counts per kind as the console's short phrase, the most frequent first:
    'read failed: FileNotFoundError 3, opted out 1, 2 more kinds' ('' for none)."""
    kinds = list(by_frequency(counts).items())
    more = len(kinds) - shown
    return ", ".join([f"{kind} {n:,}" for kind, n in kinds[:shown]]
                     + ([f"{more} more kind{'s' * (more > 1)}"] if more > 0 else []))
