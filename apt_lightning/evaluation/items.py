"""One multiple-choice question as the scorer sees it: a (context, continuation) request per choice."""

from __future__ import annotations

from dataclasses import dataclass

TARGET_DELIMITER = " "  # lm-eval-harness's default: the space between the prompt and each choice


@dataclass(frozen=True)
class MultipleChoiceItem:
    """`contexts[i]` + `continuations[i]` is choice i (one context repeated for most tasks, one per choice for
    WinoGrande's partial evaluation); only the continuation's tokens are scored. `norm_lengths[i]` is what
    acc_norm divides choice i's log-likelihood by: the length in characters of the choice's text without the
    leading delimiter, as lm-eval-harness's acc_norm does."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    norm_lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.continuations)
        if n < 2:
            raise ValueError(f"a multiple-choice item needs at least 2 choices, got {n}")
        if len(self.contexts) != n or len(self.norm_lengths) != n:
            raise ValueError(
                f"{len(self.contexts)} contexts, {n} continuations and {len(self.norm_lengths)} lengths: "
                "need one of each per choice"
            )
        if not 0 <= self.gold < n:
            raise ValueError(f"gold index {self.gold} is not one of the {n} choices (0..{n - 1})")
        if min(self.norm_lengths) <= 0:
            raise ValueError(f"empty choice text (lengths {list(self.norm_lengths)}): acc_norm divides by it")

    @classmethod
    def shared_context(cls, context: str, choices: list[str], gold: int) -> MultipleChoiceItem:
        """The usual layout: one context, each choice scored as `" " + choice`."""
        return cls(
            contexts=(context,) * len(choices),
            continuations=tuple(TARGET_DELIMITER + c for c in choices),
            gold=gold,
            norm_lengths=tuple(len(c) for c in choices),
        )

    @classmethod
    def shared_continuation(cls, contexts: list[str], target: str, gold: int) -> MultipleChoiceItem:
        """Partial evaluation: the choice is in each context, and the same `" " + target` is scored after
        each."""
        return cls(
            contexts=tuple(contexts),
            continuations=(TARGET_DELIMITER + target,) * len(contexts),
            gold=gold,
            norm_lengths=(len(target),) * len(contexts),
        )

    @property
    def num_choices(self) -> int:
        return len(self.continuations)

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pairs to score, in choice order."""
        return list(zip(self.contexts, self.continuations, strict=True))
