"""The causal-LM objective of instruction tuning (``task: instruction``): the loss and the validation metrics.

A batch labels every position with the token it holds, or ``IGNORE_INDEX`` where no loss is taken (the
prompt and the padding; `apt_lightning.data.InstructionDataModule` builds them). Position t's logits
predict the token at t + 1, so the loss compares ``logits[:, :-1]`` with ``labels[:, 1:]``: the
next-token cross-entropy of the response tokens (and the EOS after them) only, averaged over those tokens.

Training computes logits only where they take loss (`logits_at`): the LM head reads the hidden states of
the positions that predict a response token, (n, hidden), and gives (n, vocab) rows instead of
(batch, length, vocab) logits, most of which are prompt and padding that the loss never reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

IGNORE_INDEX = -100  # a label that takes no loss (the prompt and the padding)


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch, length) bool: the positions whose logits predict a response token (t where label t + 1 is
    not ignored; never the last position)."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return positions


def response_targets(labels: torch.Tensor) -> torch.Tensor:
    """(n,): the response tokens, in the order of the rows `response_positions` selects."""
    targets = labels[:, 1:]
    return targets[targets != IGNORE_INDEX]


def next_token_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the labelled next tokens, (n, vocab), and those tokens, (n,): one row per response
    token of the batch."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    return logits[response_positions(labels)], response_targets(labels)


@contextmanager
def logits_at(model: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, `model`'s LM head (its output embeddings) reads only the hidden states at
    `positions` ((batch, length) bool), so a forward returns logits (n, vocab), one row per selected
    position in row-major order, as `next_token_targets` orders them. Every forward in the block counts,
    the teacher's `functional_call` on the same module included. The head is a row-wise Linear after the
    final norm (and its hidden-dim mask), so these rows equal the full logits' rows; the layers, their
    masks and salience hooks see the whole sequence as before."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to compute logits with")

    def gather(module: nn.Module, args: tuple) -> tuple:
        return (args[0][positions], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def response_loss(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (in fp32) of the response rows' logits (n, vocab) against their tokens (n,), averaged
    over the n response tokens (0 when there are none)."""
    return F.cross_entropy(rows.float(), targets, reduction="sum") / max(targets.numel(), 1)


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood (in fp32) of the response tokens, and their number."""
    rows, targets = next_token_targets(logits, labels)
    return F.cross_entropy(rows.float(), targets, reduction="sum"), targets.numel()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over the response tokens of the batch, from full logits
    (batch, length, vocab); 0 when it has none."""
    return response_loss(*next_token_targets(logits, labels))


class ResponseNLL(torchmetrics.Metric):
    """The validation numbers of a causal LM: the next-token loss averaged over every response token of the
    eval set (``loss``; not a mean of batch means, which would weigh a short batch's tokens more) and its
    exponential (``perplexity``)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        total, count = response_nll(logits, labels)
        self.total += total.double()
        self.count += count

    def compute(self) -> dict[str, torch.Tensor]:
        loss = (self.total / self.count.clamp(min=1)).float()
        return {"loss": loss, "perplexity": loss.exp()}


def build_causal_lm_metrics(prefix: str = "val/") -> torchmetrics.MetricCollection:
    """``<prefix>loss`` and ``<prefix>perplexity`` from one `ResponseNLL` (update: ``logits, labels``)."""
    return torchmetrics.MetricCollection({"nll": ResponseNLL()}, prefix=prefix)


__all__ = [
    "IGNORE_INDEX",
    "ResponseNLL",
    "build_causal_lm_metrics",
    "causal_lm_loss",
    "logits_at",
    "next_token_targets",
    "response_loss",
    "response_nll",
    "response_positions",
    "response_targets",
]
