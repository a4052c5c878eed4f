"""argparse value types shared by the project's command-line tools (apt-bench, apt-eval)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer > 0, or an argparse error naming the value given."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (> 0), got {value}")
    return value
