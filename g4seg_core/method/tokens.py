"""Where the class name sits in the tokenized prompt: alpha(T) of Eq. 3."""

from __future__ import annotations

from typing import List, Sequence

from ..errors import G4SegError


def find_token_positions(prompt_ids: Sequence[int], label_ids: Sequence[int],
                         label: str = "", prompt: str = "", occurrences: int = 1) -> List[int]:
    """Positions of the label's token ids as a contiguous sub-sequence of the prompt's ids.

    ``occurrences`` is how many times the template holds '{}': the last that many matches are
    the class name (the template's own words come first), and all of them are injected.
    """
    prompt_ids = [int(i) for i in prompt_ids]
    label_ids = [int(i) for i in label_ids]
    if not label_ids:
        raise G4SegError(f"class name {label!r} is empty after tokenization: give a word such as 'cat'")
    n = len(label_ids)
    starts: List[int] = []
    for s in range(len(prompt_ids) - n + 1):
        if prompt_ids[s:s + n] == label_ids and (not starts or s >= starts[-1] + n):
            starts.append(s)
    if not starts:
        raise G4SegError(
            f"class name {label!r} was not found in the tokenized prompt {prompt!r}: "
            "the prompt template must contain '{}' where the class name goes, the prompt must fit "
            "in 77 tokens (shorten the template or the class name), and the characters around '{}' must "
            "not merge with the name's tokens (e.g. '{}.' after a name ending in ')': write '{} .')")
    return [p for start in starts[-max(1, int(occurrences)):] for p in range(start, start + n)]
