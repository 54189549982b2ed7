"""Answer ids: the inbox row of an answer, and the user's message it replies to.

An answer to a user's message is the inbox row of that message (its Feishu id, ``om_...``). A
"Try again" on an answer card adds a row of its own, ``<message id>~<n>`` (n = 2, 3, ...): the
next number after the answer whose card was pressed. Because that id is derived from the
pressed card only, a card spawns at most one new answer, however many times (and on however
many services) its button is pressed or its event delivered: the inbox keeps the first.
Feishu message ids never contain ``~``.
"""

from __future__ import annotations

SEPARATOR = "~"


def reply_target(answer_id: str) -> str:
    """The user's message an answer replies to (the id itself for a first answer)."""
    return answer_id.split(SEPARATOR, 1)[0]


def retry_of(answer_id: str) -> str:
    """The id of the answer a "Try again" on *answer_id*'s card asks for."""
    base, _, number = answer_id.partition(SEPARATOR)
    return f"{base}{SEPARATOR}{int(number or 1) + 1}"


def is_retry(answer_id: str) -> bool:
    return SEPARATOR in answer_id
