"""Where the class name sits in the tokenized prompt: alpha(T) of Eq. 3."""

from __future__ import annotations

from typing import List, Sequence

from .errors import G4SegError


def find_token_positions(prompt_ids: Sequence[int], label_ids: Sequence[int],
                         label: str = "", prompt: str = "") -> List[int]:
    """Positions of the label's token ids as a contiguous sub-sequence of the prompt's ids.

    The last occurrence wins (the template's own words come first, the class name last).
    """
    prompt_ids = [int(i) for i in prompt_ids]
    label_ids = [int(i) for i in label_ids]
    if not label_ids:
        raise G4SegError(f"class name {label!r} is empty after tokenization: give a word such as 'cat'")
    n = len(label_ids)
    starts = [s for s in range(len(prompt_ids) - n + 1) if prompt_ids[s:s + n] == label_ids]
    if not starts:
        raise G4SegError(
            f"class name {label!r} was not found in the tokenized prompt {prompt!r}: "
            "the prompt template must contain '{}' where the class name goes, and the prompt must fit "
            "in 77 tokens (shorten the template or the class name)")
    start = starts[-1]
    return list(range(start, start + n))
