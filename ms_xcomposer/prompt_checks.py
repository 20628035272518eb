"""What every family's prompt builder checks of a query and a history, with one error type."""
from __future__ import annotations

from typing import List, Sequence, Tuple

History = Sequence[Tuple[str, str]]


class PromptError(ValueError):
    """The query, history and images cannot form a valid prompt (e.g. placeholder / image count mismatch)."""


def check_text(value: object, what: str) -> None:
    """PromptError unless `value` is a str (`what` names it)."""
    if not isinstance(value, str):
        raise PromptError(f"{what} must be a str, got {type(value).__name__}")


def check_history(history: History) -> List[Tuple[str, str]]:
    """The history as a list of (query, response) str pairs; PromptError naming the first bad turn."""
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise PromptError(f"history must be a list of (query, response) pairs, got {type(history).__name__}")
    turns = []
    for i, turn in enumerate(history):
        if isinstance(turn, (str, bytes)) or not isinstance(turn, Sequence) or len(turn) != 2:
            raise PromptError(f"history[{i}] must be a (query, response) pair, got {turn!r:.80}")
        check_text(turn[0], f"history[{i}][0]")
        check_text(turn[1], f"history[{i}][1]")
        turns.append((turn[0], turn[1]))
    return turns
