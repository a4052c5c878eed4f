"""The zero-shot prompt of each task, following lm-eval-harness's task definitions (named in each function;
docs/zero_shot.md shows every format). Each function turns a question's fields into a `MultipleChoiceItem`."""

from __future__ import annotations

import re

from apt_lightning.evaluation.items import MultipleChoiceItem

LETTERS = ("A", "B", "C", "D")

# lm-eval-harness `truthfulqa_mc1`: six fixed question/answer pairs before the question (its num_fewshot is 0;
# the primer is part of the prompt)
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def arc(question: str, choices: list[str], gold: int) -> MultipleChoiceItem:
    """lm-eval `arc_easy` / `arc_challenge`."""
    return MultipleChoiceItem.shared_context(f"Question: {question}\nAnswer:", choices, gold)


def piqa(goal: str, solutions: list[str], gold: int) -> MultipleChoiceItem:
    """lm-eval `piqa`."""
    return MultipleChoiceItem.shared_context(f"Question: {goal}\nAnswer:", solutions, gold)


def boolq(passage: str, question: str, answer: bool) -> MultipleChoiceItem:
    """lm-eval `boolq` (super_glue): the choices are "no" and "yes"."""
    return MultipleChoiceItem.shared_context(
        f"{passage}\nQuestion: {question}?\nAnswer:", ["no", "yes"], int(answer)
    )


def openbookqa(question_stem: str, choices: list[str], gold: int) -> MultipleChoiceItem:
    """lm-eval `openbookqa`: the bare question stem, no "Question:" prefix."""
    return MultipleChoiceItem.shared_context(question_stem, choices, gold)


def hellaswag_clean(text: str) -> str:
    """lm-eval `hellaswag`'s text clean-up: WikiHow's " [title]" becomes a sentence end, other bracketed
    markers go, a doubled space becomes one."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(context: str, endings: list[str], gold: int) -> MultipleChoiceItem:
    """lm-eval `hellaswag`: `context` is "<activity label>: <ctx>"; the endings are the choices."""
    return MultipleChoiceItem.shared_context(
        hellaswag_clean(context), [hellaswag_clean(e) for e in endings], gold
    )


def winogrande(sentence: str, options: list[str], gold: int) -> MultipleChoiceItem:
    """lm-eval `winogrande` (partial evaluation): each option replaces the blank `_` in the part of the
    sentence before it, and the part after the blank is the continuation scored for every option."""
    blank = sentence.index("_")
    target = sentence[blank + 1 :].strip()
    return MultipleChoiceItem.shared_continuation([sentence[:blank] + o for o in options], target, gold)


def mmlu(subject: str, question: str, choices: list[str], gold: int) -> MultipleChoiceItem:
    """lm-eval `mmlu_<subject>` at 0 shots: the subject's description line, the question, the lettered choices
    and "Answer:"; the continuations are the letters."""
    if len(choices) != len(LETTERS):
        raise ValueError(f"MMLU questions have {len(LETTERS)} choices, got {len(choices)}")
    lines = [question.strip()] + [f"{letter}. {c}" for letter, c in zip(LETTERS, choices, strict=True)]
    header = (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )
    return MultipleChoiceItem.shared_context(header + "\n".join(lines) + "\nAnswer:", list(LETTERS), gold)


def truthfulqa_mc1(question: str, choices: list[str], gold: int) -> MultipleChoiceItem:
    """lm-eval `truthfulqa_mc1`: the six-pair QA primer, then "Q: <question>\\nA:"."""
    return MultipleChoiceItem.shared_context(f"{TRUTHFULQA_PRIMER}\n\nQ: {question}\nA:", choices, gold)
