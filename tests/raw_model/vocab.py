"""The text model's tokenizer: a helper beside model.py, which the model server imports with it."""

from __future__ import annotations

import numpy as np

PAD, UNKNOWN = 0, 1
WORDS = ["good", "great", "fine", "love", "bad", "awful", "poor", "hate", "film", "plot", "the", "a"]
IDS = {word: i + 2 for i, word in enumerate(WORDS)}
SIZE = len(WORDS) + 2


def tokenize(texts: list[str]) -> np.ndarray:
    """Lower-cased words as ids, padded to the longest text (at least 2): int64 [batch, length]."""
    rows = [[IDS.get(word, UNKNOWN) for word in text.lower().split()] for text in texts]
    length = max(2, *(len(row) for row in rows))
    ids = np.full((len(rows), length), PAD, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids
