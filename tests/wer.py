"""Word error rate, as the project's issues and bench/embedded.py count it.

Text is lower-cased, hyphens become spaces and other punctuation goes; nothing else is normalised,
so "10" against "ten" or "mr" against "mister" count as errors (the figures are pessimistic).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["normalise", "pooled_wer", "word_errors"]

_PUNCT = re.compile(r"[^\w\s']|_")


def normalise(text: str) -> list[str]:
    text = text.lower().replace("-", " ")
    return [w.strip("'") for w in _PUNCT.sub(" ", text).split() if w.strip("'")]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words): a Levenshtein distance on words."""
    ref, hyp = normalise(reference), normalise(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def pooled_wer(pairs: Iterable[tuple[str, str]]) -> float:
    """All errors over all reference words, for (reference, hypothesis) pairs."""
    errors = words = 0
    for reference, hypothesis in pairs:
        e, n = word_errors(reference, hypothesis)
        errors, words = errors + e, words + n
    return errors / words if words else 0.0
