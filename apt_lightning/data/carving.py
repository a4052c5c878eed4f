"""A validation split carved from the training set (honest model selection: docs/method.md section 13).

Two ways to carve. By row: a fixed-seed random draw of training rows. By sentence, for single-text datasets
whose training rows include phrases of their sentences: GLUE SST-2 trains on the sentences and their
distinct non-neutral parse-tree phrases (67,349 rows from 6,885 sentences, about ten rows each) while its
dev set holds whole sentences. Carved by row, most validation rows are phrases whose sentence stays in
training, so validation rewards fitting the training sentences. Carved by sentence, each drawn sentence
leaves training with every phrase of its group and validates as a whole sentence, as the dev set does.
Grouping enumerates the token runs of each sentence, so it suits short texts (phrases, sentences).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

__all__ = ["CARVE_BY", "CarveBy", "carve_sentences", "carve_size", "carve_validation", "sentence_groups"]

CarveBy = Literal["row", "sentence"]
CARVE_BY: tuple[str, ...] = get_args(CarveBy)


def carve_size(size, unit: str = "row") -> int | float:
    """`size` checked: a count of `unit`s (an int, or a whole float > 1: some jsonargparse versions parse
    an `int | float` option as a float) or a fraction in (0, 1)."""
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise ValueError(f"val_from_train must be a {unit} count or a fraction in (0, 1), got {size!r}")
    if isinstance(size, float) and size > 1.0:
        if not size.is_integer():
            raise ValueError(
                f"val_from_train must be a whole {unit} count or a fraction in (0, 1), got {size}"
            )
        size = int(size)
    if isinstance(size, float) and not 0.0 < size < 1.0:
        raise ValueError(f"val_from_train as a fraction must be in (0, 1), got {size}")
    if isinstance(size, int) and size < 1:
        raise ValueError(f"val_from_train as a {unit} count must be 1 or more, got {size}")
    return size


def _draw(size: int | float, total: int, seed: int, unit: str) -> tuple[list[int], list[int]]:
    """(the rest, the drawn) of `total` items, `size` of them (or that fraction) drawn with `seed`."""
    size = carve_size(size, unit)
    count = round(size * total) if isinstance(size, float) else size
    if not 0 < count < total:
        raise ValueError(
            f"val_from_train={size!r} takes {count} of the {total} training {unit}s for validation; "
            "it must leave at least one on each side"
        )
    order = np.random.default_rng(seed).permutation(total)
    return sorted(order[count:].tolist()), sorted(order[:count].tolist())


def carve_validation(size: int | float, total: int, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, validation rows) of a training set of `total` rows with `size` rows (an int) or
    that fraction of them (a float in (0, 1)) drawn at random for validation: the same split for the
    same seed and total, each list in row order."""
    return _draw(size, total, seed, "row")


def sentence_groups(texts: Sequence[str]) -> list[int]:
    """For each text, the row of its group's sentence: the longest text that holds it as a run of whole
    tokens (split on whitespace), the earliest row among equally long ones. A text no other text holds is a
    sentence, its own group; duplicates share one."""
    tokens = [text.split() for text in texts]
    normal = [" ".join(t) for t in tokens]
    known = set(normal)
    lengths: dict[str, set[int]] = {}  # first token -> the token counts of the rows it starts
    for words in tokens:
        if words:
            lengths.setdefault(words[0], set()).add(len(words))
    owner: dict[str, int] = {}
    for row in sorted(range(len(texts)), key=lambda i: (-len(tokens[i]), i)):
        if normal[row] in owner:
            continue
        # A new sentence: claim every run of its tokens that is some row's text and has no longer owner
        # (only runs as long as a row starting with the same token can be one).
        words = tokens[row]
        for start, first in enumerate(words):
            for size in lengths.get(first, ()):
                if start + size <= len(words):
                    run = " ".join(words[start : start + size])
                    if run in known:
                        owner.setdefault(run, row)
        owner.setdefault(normal[row], row)  # an empty text holds no run
    return [owner[text] for text in normal]


def carve_sentences(size: int | float, texts: Sequence[str], seed: int) -> tuple[list[int], list[int]]:
    """(training rows, validation rows) carved by sentence: `size` sentences (an int) or that fraction of
    them (a float in (0, 1)) drawn with `seed` (:func:`sentence_groups`); every row of a drawn sentence's
    group leaves training and the sentence alone validates. Each list in row order."""
    groups = sentence_groups(texts)
    sentences = sorted(set(groups))
    _, drawn = _draw(size, len(sentences), seed, "sentence")
    held_out = {sentences[i] for i in drawn}
    return [row for row, group in enumerate(groups) if group not in held_out], sorted(held_out)
